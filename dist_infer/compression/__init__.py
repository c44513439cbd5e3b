"""Offline compression of Hugging Face checkpoints: pruning and weight quantization."""
