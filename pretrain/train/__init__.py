"""Layer 4, the loop: the trainer and its callbacks, the optimizer and schedule, metric sinks,
stop signals turned into a save."""
