"""Files the daemon reads and writes: datasets, spools and results."""
