"""Keras model configs as JSON: walking their layers and nodes, and their output shapes."""
