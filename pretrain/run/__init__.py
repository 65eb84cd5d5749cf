"""lmforge run -- the run: the session that assembles a run, the pretraining workload, the checkpoint benchmark."""
