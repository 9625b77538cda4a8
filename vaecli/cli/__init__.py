"""The `vae` command line: one module per command; they only parse options, call the library and print."""

import sys

from vaecli import allocator
from vaecli.cli import (  # noqa: F401  (registers the commands)
    compare,
    decode,
    encode,
    info,
    models,
    roundtrip,
    video_cmd,
    weights_cmd,
)
from vaecli.cli.common import app, fail, say

__all__ = ["app", "run"]


def run() -> None:
    """Console-script entry point."""
    allocator.huge_pages()  # before torch's first allocation, which the commands make
    try:
        app()
    except KeyboardInterrupt:
        say("Interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback only with --debug
        sys.exit(fail(exc, "--debug" in sys.argv).exit_code)
