"""Weight-space merging of same-architecture models, streamed from the files.

`merge` does the streaming; `methods/` holds one module per merge method.
"""
