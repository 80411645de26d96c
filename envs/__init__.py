"""Gymnasium environments that treat layer routing as a Markov decision process (planned: issue "Gymnasium environment and PPO routing policies")."""
