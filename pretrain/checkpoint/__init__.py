"""lmforge checkpoint -- checkpoints: atomic, verified step directories and their consolidation."""
