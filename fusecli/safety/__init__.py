"""Hostile files: the scan for code, the isolated reader, and the one door through which Keras
loads a file. The size and depth guards every reader applies are in `fusecli/limits.py`."""
