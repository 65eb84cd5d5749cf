"""lmforge: finetune."""
