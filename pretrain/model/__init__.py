"""Layer 2, the model: the transformer, the losses it is trained on, its FLOPs per token and the
matmul peak they are measured against."""
