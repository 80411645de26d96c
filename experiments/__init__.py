"""Reproducible runs, benchmarks, results tables and plots. Run a module with ``python -m layerroute.experiments.NAME``."""
