"""Layer 6, the run: the session that assembles every training command, the pretraining workload,
the checkpoint benchmark."""
