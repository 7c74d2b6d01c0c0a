"""Hostile files: the scan for code, the limits on what a file can make us allocate, the isolated
reader, and the one door through which Keras loads a file."""
