"""lmforge model -- the model: the transformer, its losses and its FLOPs."""
