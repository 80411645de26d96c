"""Tasks: datasets, prompts and scoring."""
