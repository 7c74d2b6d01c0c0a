"""The choices a fusion request can make, apart from the code that acts on them.

The command line builds its `--help` from these, so this module imports nothing.
"""

SCALE_MODES = ("rescaling", "lambda")
INPUT_MODES = ("auto", "shared", "separate")
FUSE_AT = ("output", "logits")
ACTIVATIONS = ("softmax", "none")
