"""Atomic output files and output-path planning: nothing half-written, no input overwritten."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path

from vaecli.errors import OutputError, UsageError


def output_file_mode(folder: bool = False) -> int:
    """Permission bits an ordinary open() (or mkdir, for a `folder`) would give (mkstemp/mkdtemp's are private)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of `path` that is not a folder, if any (why a folder could not be made)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def output_error(dest: Path, exc: OSError) -> OutputError:
    """A one-line OutputError saying why `dest` could not be written."""
    blocker = _blocking_file(Path(dest))
    if blocker is not None:
        why = f"{blocker} is a file, not a folder"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied" if exc.errno != errno.EROFS else "read-only file system"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    else:  # the first line only: some libraries append command lines and logs to the message
        lines = [line for line in (exc.strerror or str(exc)).splitlines() if line.strip()]
        why = " ".join(lines[0].split()) if lines else f"error {exc.errno}"
    return OutputError(f"{dest}: cannot write: {why}")


@contextmanager
def writing(dest: Path) -> Iterator[None]:
    """Turn an OSError raised while writing `dest` into a one-line OutputError."""
    try:
        yield
    except OSError as exc:
        raise output_error(dest, exc) from None


def output_exists(dest: Path) -> bool:
    """Whether an output path exists; a name the file system refuses (too long) is its one-line OutputError."""
    with writing(dest):
        return Path(dest).exists()


def atomic_write(dest: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temp file beside `dest`, then rename it over `dest`; on any failure remove it.

    OS errors (a parent that is a file, no permission, a full disk) become a one-line OutputError.
    """
    dest = Path(dest)
    with writing(dest):  # is_dir() too: a name too long for the file system raises there first
        if dest.is_dir():
            raise OutputError(f"{dest}: is a folder, expected an output file path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in dest.parent.glob(f".{glob_escape(dest.name)}.*.part"):
            stale.unlink(missing_ok=True)  # left by a run that was killed outright (SIGKILL)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            write(Path(tmp))
            os.chmod(tmp, output_file_mode())
            os.replace(tmp, dest)
        except BaseException:  # also KeyboardInterrupt/SystemExit: never leave a partial file
            Path(tmp).unlink(missing_ok=True)
            raise


def is_folder_target(output: Path, n_inputs: int) -> bool:
    """Whether `-o output` names a folder: several inputs, an existing folder, a trailing slash, or no extension."""
    if n_inputs > 1 or output.is_dir() or str(output).endswith(("/", os.sep)):
        return True
    return not output.exists() and output.suffix == ""


def plan_outputs(inputs: list[Path], output: Path | None, name: Callable[[Path], str],
                 rels: list[Path] | None = None) -> list[Path]:
    """One output path per input: beside it, at `output` (a file), or inside `output` (a folder), where
    each input's relative path in `rels` (from a walked folder) is mirrored; none may be an input or a folder
    holding one."""
    if output is not None and str(output) == "-":
        raise UsageError("-o -: writing to stdout is not supported; give a file or folder")
    if output is None:
        outs = [p.parent / name(p) for p in inputs]
    elif is_folder_target(output, len(inputs)):
        if output.exists() and not output.is_dir():
            raise UsageError(f"-o {output}: expected a folder for {len(inputs)} inputs, got a file")
        rels = rels or [Path(p.name) for p in inputs]
        outs = [output / rel.parent / name(p) for p, rel in zip(inputs, rels, strict=True)]
    else:
        outs = [output]
    seen: dict[Path, Path] = {}
    resolved_inputs = {p.resolve() for p in inputs}
    holders = {folder: p for p in reversed(inputs) for folder in p.resolve().parents}  # folder -> an input in it
    for src, out in zip(inputs, outs, strict=True):
        r = out.resolve()
        if r in resolved_inputs:
            raise OutputError(f"refusing to overwrite input {src} (choose another -o)")
        if r in holders:  # a folder output (--as-frames) replaces the folder, and the input with it
            raise OutputError(f"refusing to replace {out}: it is a folder holding input {holders[r]} "
                              f"(choose another -o)")
        if r in seen:
            raise UsageError(f"inputs {seen[r]} and {src} would both write {out}")
        seen[r] = src
    return outs


def strip_suffixes(path: Path, *suffixes: str) -> str:
    """File name of `path` without its extension and without a trailing `.latent`-style marker."""
    stem = path.stem
    for s in suffixes:
        if stem.endswith(s):
            stem = stem[: -len(s)]
    return stem
