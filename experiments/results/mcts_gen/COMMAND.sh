# Started 2026-11-30 05:32 UTC in the background (resumable store); stopped at 06:48 UTC after 20 samples and analyzed (see NOTES.md).
# (A first start at 05:12 with --simulations 64 --lockstep 8 was stopped at 05:32 before its first group of 8
#  finished: the shared 2-core machine gave it ~10% of a core.)
OMP_NUM_THREADS=1 nohup .venv/bin/layerroute search mcts --task gen --split search --limit 500 \
    --simulations 32 --space drllm --lambda 1.0 --lockstep 4 \
    --output experiments/results/mcts_gen > experiments/results/mcts_gen/run.log 2>&1 &
.venv/bin/layerroute analyze experiments/results/mcts_gen
