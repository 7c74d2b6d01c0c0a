"""Model files: reading, scanning for code, Keras 2 conversion, variable layouts, writing.

Every command that touches a model file goes through this package; nothing else opens one.
"""
