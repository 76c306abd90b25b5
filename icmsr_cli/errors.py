"""The exceptions a user may see. Each message is one line that names the thing and the reason.

The CLI turns them into a line on stderr and an exit code; library callers catch them by type.
"""

from __future__ import annotations


def unexpected(exc: BaseException, doing: str = "") -> str:
    """How an exception nobody raised on purpose is said: one line (what, and while `doing` what), asking for a report."""
    line = (str(exc).strip().splitlines() or [""])[0]
    kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"  # struct.error, not "error"
    return (f"unexpected {kind}{' while ' + doing if doing else ''}{': ' + line if line else ''} "
            "(this is a bug in icmsr; rerun with --debug for the traceback and report it)")


class IcmsrError(Exception):
    """Base of every error icmsr raises on purpose."""

    #: process exit code the CLI uses for this kind of error (2: usage or setup, 1: processing)
    exit_code = 1


class SetupError(IcmsrError):
    """The run cannot start: bad option, missing or broken model, unusable device."""

    exit_code = 2


class ModelNotFoundError(SetupError):
    """A base model or LoRA checkpoint is not where it was said to be, or cannot be fetched."""


class CheckpointError(SetupError):
    """A LoRA checkpoint is unreadable, unsafe, or does not fit the base model."""


class IntegrityError(SetupError):
    """A downloaded file does not have the registered sha256."""


class ImageError(IcmsrError):
    """One input image cannot be read, or one output cannot be written."""


class NumericalError(IcmsrError):
    """The model produced NaN or Inf (typically fp16 overflow)."""


class ResourceError(IcmsrError):
    """Not enough memory, even after retrying with the smallest tiles."""


class DiskFullError(IcmsrError):
    """No space left where a file had to be written: every later file would fail too, so a batch stops."""


class RanksLostError(IcmsrError):
    """Under torchrun or accelerate, the launcher's store went away (a node or the launcher died):
    finished outputs are complete and a rerun resumes."""
