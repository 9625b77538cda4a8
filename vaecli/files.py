"""Atomic output files and output-path planning: nothing half-written, no input overwritten."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from glob import escape as glob_escape
from pathlib import Path

from vaecli.errors import InputError, OutputError, UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale temp files are then removed unconditionally
    fcntl = None


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


def read_error(src: Path, exc: OSError) -> InputError:
    """A one-line InputError saying why input `src` could not be read (no permission, an I/O error), not what is
    wrong with its content."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    else:
        lines = [line for line in (exc.strerror or str(exc)).splitlines() if line.strip()]
        why = " ".join(lines[0].split()) if lines else f"error {exc.errno}"
    return InputError(f"{src}: cannot read: {why}")


def folder_error(src: Path, expected: str) -> InputError:
    """The one-line InputError for a folder given where `expected` (a file) was: one the user may not list (a
    folder walk hands those on as inputs that fail) says so."""
    try:
        os.scandir(src).close()
    except OSError as exc:
        return read_error(src, exc)
    return InputError(f"{src}: is a folder, expected {expected}")


def check_input(src: Path, expected: str, error: type[InputError] = InputError) -> None:
    """A one-line error unless input `src` is a file there to read: `error` 'no such file' (a link to nothing too),
    `folder_error` for a folder, 'not a regular file' for a FIFO, socket or device, or why the system will not
    reach it (a folder on the way that may not be searched, a link loop), where Path.exists() raised or said 'no
    such file'."""
    try:
        mode = os.stat(src).st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in a listed path
        raise error(f"{src}: no such file") from None
    except OSError as exc:
        raise read_error(src, exc) from None
    if stat.S_ISDIR(mode):
        raise folder_error(src, expected)
    if not stat.S_ISREG(mode):  # a FIFO's open() waits for a writer for ever, and inputs are opened more than once
        raise error(f"{src}: not a regular file (a FIFO, socket or device), expected {expected}")


@contextmanager
def reading(src: Path) -> Iterator[None]:
    """Turn an OSError raised while opening or reading input `src` into a one-line InputError."""
    try:
        yield
    except OSError as exc:
        raise read_error(src, exc) from None


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


def output_done(dest: Path, folder: bool = False) -> bool:
    """Whether an earlier run left output `dest` for a rerun to skip: a file there, or a folder where the output is
    one (`decode --as-frames`); a folder in a file output's place is no output, and fails when written."""
    with writing(dest):
        return Path(dest).is_dir() if folder else Path(dest).exists() and not Path(dest).is_dir()


def temp_prefix(dest: Path, suffix: str = ".part") -> str:
    """`.<name>.`, the start of the names of `dest`'s temp files (mkstemp's random letters and `suffix` follow);
    a name too long to take those extra bytes is cut and a digest of the whole appended, so that any output name
    the file system takes can be written."""
    dest = Path(dest)
    prefix = f".{dest.name}."
    try:
        name_max = os.pathconf(dest.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # AttributeError: no pathconf (Windows)
        name_max = 255
    room = name_max - 8 - len(os.fsencode(suffix))  # mkstemp adds 8 random letters
    if len(os.fsencode(prefix)) <= room:
        return prefix
    digest = hashlib.sha256(os.fsencode(prefix)).hexdigest()[:12]
    cut = ""
    for ch in prefix:  # whole characters only: a name cut inside a UTF-8 sequence is refused by some file systems
        if len(os.fsencode(cut + ch)) > room - len(digest) - 2:
            break
        cut += ch
    return cut + f"~{digest}."


def _lock(fd: int) -> bool:
    """Take an exclusive advisory lock on an open file without waiting; whether it was free."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True  # a file system without locks: as before locks, the temp file counts as abandoned
    return True


def _remove_abandoned(tmp: Path) -> None:
    """Remove a temp file left by a run that was killed outright (SIGKILL), unless a live writer holds its lock (a
    file this process cannot open, another user's, is left alone)."""
    try:
        if not stat.S_ISREG(os.lstat(tmp).st_mode):  # only files vaecli could have written (a FIFO would block)
            return
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return
    try:
        if _lock(fd):
            with suppress(OSError):  # not ours to remove (a folder, no permission): the write goes on beside it
                tmp.unlink(missing_ok=True)
    finally:
        os.close(fd)


def atomic_write(dest: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temp file beside `dest`, then rename it over `dest`; on any failure remove it.

    OS errors (a parent that is a file, no permission, a full disk) become a one-line OutputError. The temp file
    is locked while it is written, so a second run writing the same output leaves it alone.
    """
    dest = Path(dest)
    with writing(dest):  # is_dir() too: a name too long for the file system raises there first
        if dest.is_dir():
            raise OutputError(f"{dest}: is a folder, expected an output file path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        prefix = temp_prefix(dest)
        for stale in dest.parent.glob(f"{glob_escape(prefix)}*.part"):
            _remove_abandoned(stale)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=dest.parent)
        if fcntl is None:  # no lock to hold; Windows would not rename a file held open
            os.close(fd)
            fd = None
        try:
            if fd is not None:
                _lock(fd)
            write(Path(tmp))
            os.chmod(tmp, output_file_mode())
            os.replace(tmp, dest)
        except BaseException:  # also KeyboardInterrupt/SystemExit: never leave a partial file
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            if fd is not None:
                os.close(fd)


class FolderPath(type(Path())):
    """A path given with a trailing slash (`-o out.v1/`): a folder, whatever its name (a Path drops the slash)."""

    @classmethod
    def parse(cls, text: str) -> Path:
        """`text` as a Path, a FolderPath where it ends in a separator."""
        return cls(text) if text.endswith(("/", os.sep)) else Path(text)


def resolved(path: Path) -> Path:
    """`path` made absolute with its links followed as far as they go; a link loop is left a link (Path.resolve raised
    RuntimeError on one before Python 3.13, failing a whole run over one input that should fail alone)."""
    return Path(os.path.realpath(path))


def is_folder_target(output: Path, n_inputs: int) -> bool:
    """Whether `-o output` names a folder: several inputs, an existing folder, a trailing slash, or no extension."""
    if n_inputs > 1 or isinstance(output, FolderPath):
        return True
    with writing(output):  # a name too long for the file system: its one-line error
        return output.is_dir() or not output.exists() and output.suffix == ""


def plan_outputs(inputs: list[Path], output: Path | None, name: Callable[[Path], str],
                 rels: list[Path] | None = None, option: str = "-o") -> list[Path]:
    """One output path per input: beside it, at `output` (a file), or inside `output` (a folder), where
    each input's relative path in `rels` (from a walked folder) is mirrored; none may be an input or a folder
    holding one, nor be two inputs' (a folder among the inputs fails unread: its output is never written). `option`
    names `output` in messages."""
    if output is not None and str(output) == "-":
        raise UsageError(f"{option} -: writing to stdout is not supported; give a file or folder")
    if output is None:
        outs = [p.parent / name(p) for p in inputs]
    elif is_folder_target(output, len(inputs)):
        if output_exists(output) and not output.is_dir():
            many = f" for {len(inputs)} inputs" if len(inputs) > 1 else ""
            raise UsageError(f"{option} {output}: expected a folder{many}, got a file")
        rels = rels or [Path(p.name) for p in inputs]
        outs = [output / rel.parent / name(p) for p, rel in zip(inputs, rels, strict=True)]
    else:
        outs = [output]
    seen: dict[Path, Path] = {}
    resolved_inputs = {resolved(p): p for p in reversed(inputs)}
    holders = {folder: p for p in reversed(inputs) for folder in resolved(p).parents}  # folder -> an input in it
    for src, out in zip(inputs, outs, strict=True):
        if os.path.isdir(src):  # a folder the walk could not list: an input that fails, writing nothing
            continue
        with writing(out):
            r = resolved(out)
        if r in resolved_inputs:
            other = resolved_inputs[r]
            whose = "" if resolved(other) == resolved(src) else f" (the output of {src})"
            raise OutputError(f"refusing to overwrite input {other}{whose} (choose another {option})")
        if r in holders:  # a folder output (--as-frames) replaces the folder, and the input with it
            raise OutputError(f"refusing to replace {out}: it is a folder holding input {holders[r]} "
                              f"(choose another {option})")
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
