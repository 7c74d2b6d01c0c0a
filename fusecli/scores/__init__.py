"""Score-level fusion: predictions as arrays on disk, their weighted sum, metrics, weight search."""
