# MCTS labels and the analyze report on 500 search-split samples of `gen` (ORACLE: MCTS reads the labels).
# Budget 0.8 (24 of 30 blocks), margin reward, lambda 0: the same settings as the pipeline's router labels.
# Two Ray workers, one torch thread each (2-core machine).
OMP_NUM_THREADS=1 nohup .venv/bin/layerroute search mcts --task gen --split search --limit 500 \
    --simulations 16 --space drllm --budget 0.8 --lambda 0 --lockstep 8 --workers 2 \
    --output experiments/results/mcts_gen > experiments/results/mcts_gen/run.log 2>&1 &
# then:
.venv/bin/layerroute analyze experiments/results/mcts_gen
