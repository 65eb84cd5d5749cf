"""Layer 5, checkpoints: atomic, verified step directories, and full weights consolidated from
any layout's shards."""
