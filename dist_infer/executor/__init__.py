"""Executors move calls from the engine to its workers, and nothing else."""
