"""Layer 0, the core: user errors, ranks and collectives, the world a launcher started, durable
files, fault injection (tests only), stop signals, the run directory's lock, safe unpickling.
Nothing here imports anything of lmforge above it."""
