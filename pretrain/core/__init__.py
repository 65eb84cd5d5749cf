"""lmforge core -- core: errors, processes and collectives, the world a launcher started, durable files, fault points (tests), stop signals, the run directory's lock, safe unpickling."""
