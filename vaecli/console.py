"""The `vae` console script: Ctrl-C and SIGTERM are held while the command line and torch load, then handled.

A shell loop's Ctrl-C often lands while a `vae` process is still importing: Python printed a traceback there, and
inside torch's C++ initialisation the interrupt aborted the process (`terminate called ... KeyboardInterrupt`) or
left torch half-imported ("cannot load module more than once per process"). Held signals stay pending and are
delivered once the import is whole, where `vaecli.cli.run` turns them into `Interrupted` and exit 130. (A signal
mask is per thread: this holds because the main thread is the process's only one until torch has loaded.)
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import signal
import sys
import threading

HELD = {signal.SIGINT, signal.SIGTERM}
WHOLE_IMPORTS = ("torch",)  # extension packages whose import an interrupt must not cut in two


def hold() -> set | None:
    """Block SIGINT and SIGTERM in this thread; the previous signal mask (None where signals cannot be held)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def release(previous: set | None) -> None:
    """Restore the mask `hold` returned: a held signal is handled now (SIGINT raises KeyboardInterrupt here)."""
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _WholeImport(importlib.abc.MetaPathFinder):
    """Runs the first import of each of `names` with the signals held (an interrupt lands after it, not inside)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        self.names.discard(name)
        if not self.names:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the other finders' answer: this one no longer asks for `name`
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def held_exec_module(module) -> None:
                previous = hold()
                try:
                    exec_module(module)
                finally:
                    release(previous)

            spec.loader.exec_module = held_exec_module
        return spec


def hold_whole_imports(names: tuple[str, ...] = WHOLE_IMPORTS) -> None:
    """Make the first import of each package in `names` (not yet imported) run with SIGINT and SIGTERM held."""
    names = tuple(n for n in names if n not in sys.modules)
    if names and hasattr(signal, "pthread_sigmask"):
        sys.meta_path.insert(0, _WholeImport(names))


def main() -> None:
    """Run the `vae` command line (see `vaecli.cli.run`), with interrupts held until the code it needs is loaded."""
    previous = hold()
    hold_whole_imports()
    from vaecli.cli import run

    run(held=previous)
