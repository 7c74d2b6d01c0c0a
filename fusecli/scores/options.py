"""The choices and defaults of the score commands, apart from the code that acts on them.

The command line builds its `--help` from these, so this module imports nothing.
"""

# Where scores are taken: the model's output, or its logits (before its final softmax).
AT_CHOICES = ("output", "logits")
DEFAULT_BATCH_SIZE = 256
METRICS = ("accuracy", "top5", "logloss", "mse")
DEFAULT_STEP = 0.1
# How tune chooses: auto picks among the others by their cross-validated estimate.
METHOD_CHOICES = ("auto", "grid", "greedy", "optimize", "stack")
DEFAULT_FOLDS = 5
