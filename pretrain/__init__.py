"""The core every lmforge command builds on, one folder per layer (docs/architecture.md): core (0),
config (1), model and data (2), parallel (3), train (4), checkpoint (5), run (6). A module imports
only its own layer and those below (tests/test_architecture.py)."""
