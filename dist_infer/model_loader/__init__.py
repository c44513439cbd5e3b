"""Finding, converting and loading checkpoints."""
