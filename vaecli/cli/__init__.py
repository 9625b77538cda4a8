"""The `vae` command line: one module per command; they only parse options, call the library and print."""

import signal
import sys

from typer._click.exceptions import ClickException, NoArgsIsHelpError

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
from vaecli.cli.common import Interrupt, app, fail, failure_record, reflow_help, say

__all__ = ["app", "run"]

reflow_help(app)


def run(held: set | None = None) -> None:
    """The command line: exit 0 on success, 1 when an input or the run failed, 2 for a usage error, 130 when
    interrupted; every failure one `Error:` line (and a JSON record under --json). `held`: the signal mask to
    restore, from `vaecli.console.hold`, once SIGTERM is handled here."""
    from vaecli import console

    allocator.huge_pages()  # before torch's first allocation, which the commands make
    Interrupt.reported = False
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        console.release(held)  # an interrupt held while the command line loaded raises here
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:  # `vae`, `vae weights`: the help, as Typer prints it
        exc.show()
        code = exc.exit_code
    except ClickException as exc:  # a usage error found while parsing: one line, not Typer's framed box
        code = usage_error(exc)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback only with --debug
        code = fail(exc, "--debug" in sys.argv, "--json" in sys.argv).exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == 130 and not Interrupt.reported:  # before any input (loading the model): nothing was written
        say("Interrupted")
        if "--json" in sys.argv:
            failure_record("interrupted")
    sys.exit(code or 0)


def _terminate(signum, frame) -> None:
    # SIGTERM (a scheduler's or `kill`'s stop) stops the way Ctrl-C does: the write in progress finishes, the rest
    # is reported, exit 130; before any input, `Interrupted` and its record.
    raise KeyboardInterrupt


def usage_error(exc: ClickException) -> int:
    """Print a parse-time usage error as one `Error:` line naming the command's help; its exit code."""
    message = " ".join(exc.format_message().replace("Value error, ", "").split())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    say(f"Error: {message}")
    if "--json" in sys.argv:
        failure_record(message)
    return exc.exit_code
