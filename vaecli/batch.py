"""Many inputs through one loaded model: input expansion, output mirroring, and a threaded pipeline.

Reading and writing run in background threads with bounded queues, so memory stays flat however many
files there are; same-sized items are computed together in batches. Knows nothing of the CLI: results
are handed to a callback as they complete.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaecli.errors import UsageError, describe
from vaecli.files import resolved

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LATENT_EXTS = (".latent", ".safetensors", ".latent.png")
LATENT_FORMATS = {".latent": "safetensors", ".safetensors": "safetensors", ".png": "png"}  # an output name's format
MANIFEST_EXTS = (".txt", ".parquet")


@dataclass
class Job:
    """One input, its output path (None: report only) and, once done, its result record."""

    src: Path
    dst: Path | None
    status: str = "pending"  # ok | error | skipped
    error: str | None = None
    extra: dict = field(default_factory=dict)
    payload: Any = None
    rel: Path | None = None  # the input's path below its root (folder, list), as an output folder mirrors it
    exc: BaseException | None = None  # what made it fail, for --debug


def _matches(path: Path, exts: tuple[str, ...]) -> bool:
    name = path.name.lower()
    return any(name.endswith(e) for e in exts) and not _latent_png_among_images(path, exts)


def _latent_png_among_images(path: Path, exts: tuple[str, ...]) -> bool:
    # x.latent.png (what `encode --format png` writes beside x.png) is a latent, not a photo: a rerun over the
    # folder or a '*.png' glob must not take it as one.
    return path.name.lower().endswith(".latent.png") and ".latent.png" not in exts


def expand_inputs(args: Iterable[str], recursive: bool, exts: tuple[str, ...],
                  stdin: Iterable[str] | None = None, output: Path | None = None,
                  left_out: list[Path] | None = None, repeated: list[Path] | None = None) -> list[tuple[Path, Path]]:
    """(path, path relative to its root) for every input: files, folders (`recursive` walks), globs, `-` (stdin),
    manifests (`.txt`: one path per line; `.parquet`: a `path` column; relative entries are relative to the manifest).

    Folder entries are filtered by `exts`; named files are taken as given, so a broken file is reported
    rather than silently skipped. The relative path is what an output folder mirrors: for lists, the path
    below the entries' common folder. A walked folder's files inside `output` (an output folder within it: a
    rerun's earlier outputs) are not inputs: they are added to `left_out`. A file found again with the same relative
    path (named twice, or by a glob and by name) is one input: its later finds are added to `repeated`.
    """
    found: list[tuple[Path, Path]] = []
    for arg in args:
        # os.path's tests, not Path's: those raise where a folder on the way may not be searched (an input that fails)
        if arg == "-" or arg.lower().endswith(MANIFEST_EXTS) and os.path.isfile(arg):
            if arg == "-":
                lines = [line.strip().lstrip("\ufeff") for line in (stdin if stdin is not None else sys.stdin)]
                paths = [Path(line) for line in lines if line]
            else:
                paths = [Path(arg).parent / p for p in read_manifest(Path(arg))]
            if not paths and arg != "-":  # an empty stdin is reported when nothing else gave inputs either
                raise UsageError(f"{arg}: the manifest lists no paths")
            root = Path(os.path.commonpath([resolved(p).parent for p in paths])) if paths else Path()
            found += [(p, resolved(p).relative_to(root)) for p in paths]
        elif any(ch in arg for ch in "*?[") and not os.path.exists(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise UsageError(f"no files match {arg}")
            files = [Path(m) for m in matches if _is_file(Path(m)) and not _latent_png_among_images(Path(m), exts)]
            if not files:
                raise UsageError(f"no input files match {arg} ({len(matches)} matches: folders or latent PNGs)")
            found += [(p, Path(p.name)) for p in files]
        elif os.path.isdir(arg):
            root = Path(arg)
            unreadable: list[Path] = []
            files = [p for p in _walk(root, recursive, unreadable) if _matches(p, exts)]
            files = sorted(p for p in files + unreadable if p == root or not p.name.startswith("."))
            inner = _inner_folder(root, output)
            if inner is not None:
                inside = {p for p in files if p.relative_to(root).is_relative_to(inner)}
                files = [p for p in files if p not in inside]
                if left_out is not None:
                    left_out += sorted(inside)
            if not files:
                more = "" if recursive else " (use -r to look in subfolders)"
                raise UsageError(f"no {'/'.join(exts)} files in folder {root}{more}")
            found += [(p, p.relative_to(root)) for p in files]
        else:
            found.append((Path(arg), Path(Path(arg).name)))
    unique: dict[tuple[Path, Path], tuple[Path, Path]] = {}
    for src, rel in found:
        key = (resolved(src), rel)
        if key not in unique:
            unique[key] = (src, rel)
        elif repeated is not None:
            repeated.append(src)
    return list(unique.values())


def check_at_least_one(options: dict[str, int | None]) -> None:
    """A UsageError for the first count option (name -> value, None: not given) below 1."""
    for option, value in options.items():
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")


def _walk(root: Path, recursive: bool, unreadable: list[Path]) -> Iterator[Path]:
    """The files in folder `root` (and, `recursive`, its subfolders but hidden ones; links to folders are not
    followed), adding to `unreadable` each folder that could not be listed (no permission): an input that fails, not
    files left out."""
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        # Hidden ones hold no inputs, as hidden files are none (and `**` globs take neither): .git,
                        # .cache, or a killed `decode --as-frames`' temp folder of frames.
                        if recursive and not entry.name.startswith("."):
                            folders.append(Path(entry.path))
                    elif _is_file_entry(entry):
                        yield Path(entry.path)
        except OSError:
            unreadable.append(folder)


def _is_file_entry(entry: os.DirEntry) -> bool:
    """A folder entry that is a file, a link to nothing, or a link loop: the last two are inputs that fail ('no such
    file', 'too many levels of symbolic links') rather than ones silently left out, or a folder taken as unlistable."""
    try:
        return entry.is_file() or entry.is_symlink() and not os.path.exists(entry.path)
    except OSError:  # is_file() follows a link loop and raises ELOOP
        return True


def _is_file(path: Path) -> bool:
    """A file, or a link to nothing: an input that fails ('no such file') rather than one silently left out."""
    return path.is_file() or path.is_symlink() and not path.exists()


def _inner_folder(root: Path, output: Path | None) -> Path | None:
    """`output` relative to `root` where it is a folder strictly inside it, else None."""
    if output is None:
        return None
    try:
        inner = resolved(output).relative_to(resolved(root))
    except (ValueError, OSError):
        return None
    return inner if inner != Path(".") else None


def read_manifest(path: Path) -> list[str]:
    """The paths a manifest lists: a text file with one per line, or a parquet file's `path` column."""
    if path.suffix.lower() != ".parquet":
        try:
            text = path.read_text(encoding="utf-8-sig")  # the BOM Notepad and PowerShell write is not a path
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: expected a UTF-8 text manifest, found byte 0x{exc.object[exc.start]:02x} at "
                             f"offset {exc.start}") from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading a parquet manifest needs pyarrow: pip install 'vaecli[ray]'") from None
    try:
        table = pq.read_table(path, columns=["path"])
    except Exception as exc:  # pyarrow's errors for a missing column or a foreign file
        raise UsageError(f"{path}: expected a parquet file with a 'path' column ({str(exc)[:100]})") from None
    return [p for p in table.column("path").to_pylist() if p]


IN_FLIGHT_BYTES = 64 << 20  # decoded inputs (or results) waiting between stages, beyond one item


def payload_bytes(obj: Any) -> int:
    """Bytes of the tensors and arrays held in a payload (nested tuples, lists and dicts)."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.element_size() * obj.numel()
    if hasattr(obj, "nbytes") and not isinstance(obj, (bytes, bytearray)):
        return int(obj.nbytes)
    if isinstance(obj, (tuple, list)):
        return sum(map(payload_bytes, obj))
    if isinstance(obj, dict):
        return sum(map(payload_bytes, obj.values()))
    return 0


class _Stage:
    """A FIFO between two stages holding at most `count` items and `limit` payload bytes (one item always fits),
    so memory stays bounded whatever the inputs' sizes."""

    def __init__(self, count: int, limit: int = IN_FLIGHT_BYTES):
        self.items: deque = deque()
        self.bytes, self.count, self.limit = 0, count, limit
        self.cond = threading.Condition()

    def put(self, item: Any, size: int = 0) -> None:
        with self.cond:
            while self.items and (len(self.items) >= self.count or self.bytes + size > self.limit):
                self.cond.wait()
            self.items.append((item, size))
            self.bytes += size
            self.cond.notify_all()

    def get(self) -> Any:
        with self.cond:
            while not self.items:
                self.cond.wait()
            item, size = self.items.popleft()
            self.bytes -= size
            self.cond.notify_all()
            return item

    def drain(self) -> None:
        """Drop everything queued (and wake a producer waiting for room)."""
        with self.cond:
            self.items.clear()
            self.bytes = 0
            self.cond.notify_all()


def run(jobs: list[Job], read: Callable[[Job], Any], compute: Callable[[list[Job]], None],
        write: Callable[[Job], None], on_done: Callable[[Job], None], batch_size: int = 1,
        key: Callable[[Job], Hashable] = id, fail_fast: bool = False,
        skip: Callable[[Job], bool] = lambda job: False) -> None:
    """Run every job through read -> compute (in batches of equal `key`) -> write, reporting each via `on_done`.

    `read` fills `job.payload`; `compute` gets up to `batch_size` jobs whose payloads share a key and
    replaces their payloads with results; `write` stores a result; an exception `on_done` raises stops the run
    as `fail_fast` does, and is raised once it has stopped. Any exception raised for a job, of any
    type, marks only that job failed with a one-line error (or, with `fail_fast`, stops the run): a batch that
    fails is computed again a job at a time; the exception is kept on `job.exc`. Payloads waiting between
    stages are bounded in bytes, not only in count, so large images do not pile up. On KeyboardInterrupt only
    the write in progress is finished.
    """
    check_at_least_one({"--batch-size": batch_size})
    stop, failed = threading.Event(), threading.Event()
    read_q, write_q = _Stage(2 * batch_size + 2), _Stage(2 * batch_size + 2)
    done_lock = threading.Lock()
    unreported: list[Exception] = []  # what `on_done` raised (the reader of its output gone): raised once stopped

    def finish(job: Job, exc: BaseException | None = None) -> None:
        if exc is not None:
            job.status, job.error, job.exc, job.payload = "error", describe(exc), exc, None
            if fail_fast:
                failed.set()
        elif job.status == "pending":
            job.status = "ok"
        with done_lock:
            try:
                on_done(job)
            except Exception as report_exc:  # raised in a stage's thread it ended it, and the run waited forever
                unreported.append(report_exc)
                failed.set()

    def reader() -> None:
        try:
            for job in jobs:
                if stop.is_set() or failed.is_set():
                    break
                try:
                    if skip(job) and not os.path.isdir(job.src):  # a folder the walk could not list fails, always
                        job.status = "skipped"
                        finish(job)
                        continue
                    job.payload = read(job)
                except Exception as exc:
                    finish(job, exc)
                    continue
                read_q.put(job, payload_bytes(job.payload))
        finally:
            read_q.put(_DONE)

    def writer() -> None:
        while (job := write_q.get()) is not _DONE:
            try:
                write(job)
                job.payload = None
                finish(job)
            except Exception as exc:
                finish(job, exc)

    def flush(batch: list[Job]) -> None:
        inputs = [job.payload for job in batch]
        try:
            compute(batch)
        except Exception as exc:
            if len(batch) == 1:
                finish(batch[0], exc)
                return
            # One input's failure (its pixels overflowing) is not its batch-mates': each is computed alone again,
            # so that only the input it was fails, with its own error.
            for job, payload in zip(batch, inputs, strict=True):
                if failed.is_set():  # --fail-fast: the rest stay undone
                    break
                job.payload = payload
                flush([job])
            return
        for job in batch:
            write_q.put(job, payload_bytes(job.payload))

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    pending: dict[Hashable, list[Job]] = {}
    held: dict[Hashable, int] = {}  # payload bytes per pending group
    try:
        while (job := read_q.get()) is not _DONE and not failed.is_set():
            try:
                k = key(job)
            except Exception as exc:
                finish(job, exc)
                continue
            group = pending.setdefault(k, [])
            group.append(job)
            held[k] = held.get(k, 0) + payload_bytes(job.payload)
            if len(group) >= batch_size or held[k] >= IN_FLIGHT_BYTES:
                held.pop(k)
                flush(pending.pop(k))
            elif sum(map(len, pending.values())) >= 2 * batch_size or sum(held.values()) >= IN_FLIGHT_BYTES:
                oldest = next(iter(pending))  # many sizes in flight: don't hold them all
                held.pop(oldest)
                flush(pending.pop(oldest))
        for group in pending.values():
            if not failed.is_set():
                flush(group)
    except BaseException:
        write_q.drain()  # interrupted: finish only the write in progress
        raise
    finally:
        stop.set()
        # Join the reader too: a daemon thread still inside torch or PIL when the interpreter tears down its
        # statics aborts the process ("terminate called without an active exception") instead of exiting 130.
        while threads[0].is_alive():
            read_q.drain()  # unblock a reader waiting for room
            threads[0].join(0.05)
        write_q.put(_DONE)
        threads[1].join()
    if unreported:
        raise unreported[0]


_DONE = object()
