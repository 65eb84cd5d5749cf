"""lmforge data -- data: tokenizers, text sources, preparing shards, reading batches."""
