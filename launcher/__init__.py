"""lmforge: launcher."""
