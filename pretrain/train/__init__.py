"""lmforge train -- the loop: the trainer and its callbacks, optimizer and schedule, metric sinks, stop signals."""
