"""Offline compression of Hugging Face checkpoints (pruning)."""
