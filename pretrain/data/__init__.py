"""Layer 2, the data: tokenizers, text sources, preparing token shards, reading batches."""
