"""RL policy networks and the common routing-policy interface (planned)."""
