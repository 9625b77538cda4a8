"""Typed, user-facing errors; only the CLI turns them into `Error: ...` lines and exit codes."""

import re


class VaeError(Exception):
    """Base class: the message is one line a user can act on."""

    exit_code = 1


class UsageError(VaeError):
    """The command line asks for something impossible (exit code 2)."""

    exit_code = 2


class InputError(VaeError):
    """An input file is missing, unreadable or not what was expected."""


class WeightsError(VaeError):
    """Weights are missing, fail their checksum, or do not fit the model."""


class LatentFormatError(InputError):
    """A latent file is truncated, foreign, or for a different model."""


class ComputeError(VaeError):
    """A model gave unusable numbers (NaN or Inf: an overflow in a low-precision dtype)."""


class OutputError(VaeError):
    """An output cannot be written (or would overwrite an input)."""


DEBUG_HINT = "rerun with --debug for the traceback"


# Other line breaks (\v, \f, \x1c-\x1e, \x85, U+2028/9) and what a terminal acts on (ESC sequences, BEL, ...)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with its line breaks and control characters escaped: a file name, or a model name in a latent file's
    metadata, may hold them; a message must stay one line, and must not drive the user's terminal."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return _CONTROL.sub(lambda m: ascii(m[0])[1:-1], text)


def describe(exc: BaseException) -> str:
    """One line for any exception: a VaeError's own message, else its type and message with a --debug hint."""
    if isinstance(exc, VaeError):
        return one_line(str(exc))
    if isinstance(exc, MemoryError):  # not a bug: an input larger than the free RAM allows
        return "out of memory (free some, lower --max-memory, or refuse such inputs up front with VAE_MAX_PIXELS)"
    text = one_line(" ".join(str(exc).split())) or "no message"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"unexpected {type(exc).__name__}: {text} ({DEBUG_HINT})"
