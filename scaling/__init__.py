"""lmforge: scaling-law fits."""
