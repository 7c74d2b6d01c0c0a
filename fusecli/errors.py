"""The one error family fusecli raises on purpose.

The command line turns every `FusecliError` into a single `Error: ...` line on stderr (exit 1), and
every `InvalidRequest` into a usage error (exit 2). Anything else that escapes is a bug.
"""

from __future__ import annotations

from os import PathLike


class FusecliError(Exception):
    """Base of every error fusecli raises on purpose."""


class InvalidRequest(FusecliError):
    """The request itself is wrong (weights, options); nothing was read or written."""


class ModelFileError(FusecliError):
    """A model file is missing, broken, or cannot be used; the message starts with its path."""

    def __init__(self, path: str | PathLike[str], message: str) -> None:
        self.path = str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")

    def __reduce__(self) -> tuple:  # survives a trip between processes (fusecli.safety.isolation)
        return type(self), (self.path, self.reason)


class UnsafeModelError(ModelFileError):
    """A model file holds code that would run when it is loaded (see `--trust`)."""


class VerificationError(FusecliError):
    """A written file does not compute what it should; it has been deleted."""


def known_cause(e: BaseException) -> str | None:
    """What a Keras failure while loading means, for the failures whose own message does not
    say (Python's "bad marshal data" from a Lambda's bytecode); None for the others."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = str(cause)
        if "bad marshal data" in text:
            import sys

            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            return (
                "a Lambda layer's Python bytecode was written by another Python version and "
                f"cannot be loaded by this one (Python {version}); load the file with the Python "
                "version that saved it, or rebuild the model in code and save it without the Lambda"
            )
        cause = cause.__cause__ or cause.__context__
    return None
