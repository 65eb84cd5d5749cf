"""lmforge config -- what a run is: the structured configs, the parallel layout, DeepSpeed JSONs, the shipped presets."""
