"""The choices a fusion request can make, apart from the code that acts on them.

The command line builds its `--help` from these, so this module imports nothing.
"""

SCALE_MODES = ("rescaling", "lambda")
INPUT_MODES = ("auto", "shared", "separate")
FUSE_AT = ("output", "logits")
ACTIVATIONS = ("softmax", "none")


def default_output(models: list[str]) -> str:
    """Where `fuse` writes when not told: in the inputs' format when they agree (`fused.h5` for
    `.h5` files, what a tf.keras 2 user holds), else Keras 3's own `fused.keras`."""
    suffixes = {str(m).rpartition(".")[2].lower() for m in models}
    return "fused.h5" if suffixes and suffixes <= {"h5", "hdf5"} else "fused.keras"
