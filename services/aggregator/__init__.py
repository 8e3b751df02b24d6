"""Windows, targets, pprof building and symbolization."""
