"""Layer 5, the forecast: what a run predicts of itself (memory, step time, wall time, final
loss) before it starts, while it runs, and how far off it was (docs/forecasts.md)."""
