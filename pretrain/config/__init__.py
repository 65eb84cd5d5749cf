"""Layer 1, what a run is: the structured configs and how they load, the parallel layout,
DeepSpeed JSONs, the shipped presets. No torch at load time: the CLI checks a config before any
worker starts."""
