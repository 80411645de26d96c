"""Route search: static baselines, MCTS, Optuna and PPO drivers, and Ray."""
