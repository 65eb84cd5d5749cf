"""lmforge: pretrain."""
