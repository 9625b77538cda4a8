"""Fetching registry weights files into a weights folder: from the Hugging Face hub (the optional `hub` extra,
`huggingface_hub`) or, for files published only on GitHub, over plain HTTPS.

Every file is downloaded into a temporary folder beside its destination, checked against the SHA-256 its publisher
reports (the hub's LFS checksum) and the registry's when known, then renamed into place under the name vaecli searches
for; its checksum is recorded beside it (`NAME.sha256`) so later loads verify it. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vaecli.errors import OutputError, WeightsError
from vaecli.files import output_error, output_file_mode
from vaecli.registry import HF, ModelSpec, WeightFile
from vaecli.weights import ENV_VAR, record_sha256, recorded_sha256, sha256_of, sidecar_of

HUB_EXTRA = "pip install 'vaecli[hub]'"
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # a write's failures, never a transfer's


@dataclass
class Pulled:
    """What `pull` did for one file: "downloaded", or "present" (already there with the right checksum)."""

    status: str
    path: Path
    sha256: str
    checked: list[str] = field(default_factory=list)  # what the checksum was compared with: "hub", "registry"


def source_url(wf: WeightFile, revision: str | None = None) -> str:
    """Where `wf` can be downloaded by hand: its hub `resolve` URL (at `revision`), else its registry URL."""
    rev = revision or "main"
    if wf.repo:
        return f"{HF}{wf.repo}/resolve/{rev}/{wf.path_in_repo}"
    if revision and "/raw/main/" in wf.url:  # a GitHub raw URL: the revision is a git ref there too
        return wf.url.replace("/raw/main/", f"/raw/{revision}/", 1)
    return wf.url


def by_hand(wf: WeightFile, dest: Path, revision: str | None = None) -> str:
    """The sentence telling a user how to do a pull by hand."""
    return (f"download {source_url(wf, revision)} by hand and save it as {dest / wf.name} "
            f"(or into a folder on ${ENV_VAR})")


def git_blob_sha1(path: Path) -> str:
    """Git's object id of a file's bytes (what the hub reports for files not stored in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _import_hub(wf: WeightFile, dest: Path, revision: str | None):
    try:
        import huggingface_hub
    except ImportError:
        raise WeightsError(f"pulling {wf.name} needs huggingface_hub: {HUB_EXTRA}; or "
                           f"{by_hand(wf, dest, revision)}") from None
    return huggingface_hub


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _hub_error(exc: Exception, spec: ModelSpec, wf: WeightFile, dest: Path,
               revision: str | None) -> WeightsError | OutputError:
    """One line for a hub failure: what went wrong and what to do instead."""
    from huggingface_hub import utils as errors  # where huggingface_hub 0.23 and later all export them

    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:  # the folder's failure, not the hub's
        return output_error(dest / wf.name, exc)
    hand = by_hand(wf, dest, revision)
    what = f"{wf.name} ({spec.name} {wf.role})"
    page = f"{HF}{wf.repo}"
    if isinstance(exc, errors.GatedRepoError):
        return WeightsError(f"cannot download {what}: {wf.repo} is gated: accept its terms at {page} and set HF_TOKEN "
                            f"(or run `hf auth login`); or {hand}")
    if isinstance(exc, errors.LocalEntryNotFoundError) or isinstance(exc, errors.OfflineModeIsEnabled):
        return WeightsError(f"cannot download {what}: the Hugging Face hub cannot be reached (offline); {hand}")
    if isinstance(exc, errors.RevisionNotFoundError):
        return WeightsError(f"cannot download {what}: revision {revision!r} not found in {page}")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return WeightsError(f"cannot download {what}: repository {page} not found or private (set HF_TOKEN if "
                            f"you have access); or {hand}")
    if isinstance(exc, errors.EntryNotFoundError):
        return WeightsError(f"cannot download {what}: {wf.path_in_repo} not found in {page}; or {hand}")
    return WeightsError(f"cannot download {what} from the Hugging Face hub ({_reason(exc)}); {hand}")


def _install(tmp_file: Path, target: Path, digest: str) -> None:
    """Move a checked download into place, then record its checksum; an old record never outlives its file."""
    sidecar_of(target).unlink(missing_ok=True)
    os.chmod(tmp_file, output_file_mode())  # mkstemp's files are private; weights folders are often shared
    os.replace(tmp_file, target)
    record_sha256(target, digest)


def _check(spec: ModelSpec, wf: WeightFile, got: str, source: str, hub_sha: str | None) -> list[str]:
    checked = []
    if hub_sha is not None:
        if got != hub_sha:
            raise WeightsError(f"checksum mismatch for {wf.name} ({spec.name} {wf.role}) from {source}: the hub "
                               f"reports sha256 {hub_sha}, the download has {got}; nothing was written")
        checked.append("hub")
    if wf.sha256 is not None:
        if got != wf.sha256:
            raise WeightsError(f"checksum mismatch for {wf.name} ({spec.name} {wf.role}) from {source}: the registry "
                               f"expects sha256 {wf.sha256}, the download has {got}; nothing was written")
        checked.append("registry")
    return checked


def _present(target: Path, wf: WeightFile, hub_sha: str | None) -> str | None:
    """The checksum of an existing `target` when it already is the file to pull, else None."""
    if not target.is_file():
        return None
    expected = hub_sha or wf.sha256 or recorded_sha256(target)
    if expected is None:
        return None
    digest = sha256_of(target)
    return digest if digest == expected and (wf.sha256 is None or digest == wf.sha256) else None


def pull(spec: ModelSpec, wf: WeightFile, dest: Path, revision: str | None = None, progress: bool = True) -> Pulled:
    """Download `wf` into folder `dest` under `wf.name`, verified and recorded; a file already there is kept."""
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create {dest}: {exc.strerror or exc}") from None
    try:
        if wf.repo:
            return _pull_hub(spec, wf, dest, revision, progress)
        return _pull_url(spec, wf, dest, revision, progress)
    except OSError as exc:  # the folder refused the file (no permission, a full disk): one line, as for any output
        raise output_error(dest / wf.name, exc) from None


def _pull_hub(spec: ModelSpec, wf: WeightFile, dest: Path, revision: str | None, progress: bool) -> Pulled:
    hf = _import_hub(wf, dest, revision)
    target = dest / wf.name
    source = f"{HF}{wf.repo} ({wf.path_in_repo})"
    try:
        infos = hf.HfApi().get_paths_info(wf.repo, [wf.path_in_repo], revision=revision)
    except Exception as exc:  # the hub's errors are many: each becomes one line with the way to do it by hand
        raise _hub_error(exc, spec, wf, dest, revision) from None
    info = next((i for i in infos if getattr(i, "path", None) == wf.path_in_repo and hasattr(i, "blob_id")), None)
    if info is None:
        raise WeightsError(f"cannot download {wf.name} ({spec.name} {wf.role}): {wf.path_in_repo} not found in "
                           f"{HF}{wf.repo}; or {by_hand(wf, dest, revision)}")
    lfs = getattr(info, "lfs", None)
    hub_sha = (lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256).lower() if lfs else None
    if (digest := _present(target, wf, hub_sha)) is not None:
        if recorded_sha256(target) != digest:
            record_sha256(target, digest)
        return Pulled("present", target, digest, ["hub"] if hub_sha else [])
    tmp = Path(tempfile.mkdtemp(prefix=f".{wf.name}.", suffix=".part", dir=dest))
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        silenced = not progress and not are_progress_bars_disabled()
        if silenced:
            disable_progress_bars()
        try:
            local = Path(hf.hf_hub_download(wf.repo, wf.path_in_repo, revision=revision, local_dir=tmp))
        except Exception as exc:
            raise _hub_error(exc, spec, wf, dest, revision) from None
        finally:
            if silenced:
                enable_progress_bars()
        digest = sha256_of(local)
        checked = _check(spec, wf, digest, source, hub_sha)
        if hub_sha is None and getattr(info, "blob_id", None):  # a file outside LFS: the hub gives its git id
            if git_blob_sha1(local) != info.blob_id:
                raise WeightsError(f"checksum mismatch for {wf.name} ({spec.name} {wf.role}) from {source}: the "
                                   f"hub reports git object {info.blob_id}; nothing was written")
            checked.insert(0, "hub")
        _install(local, target, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Pulled("downloaded", target, digest, checked)


def _open(url: str):
    """An HTTP response for `url` (a seam for tests)."""
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "vaecli"})
    return urllib.request.urlopen(request, timeout=30)


class _WriteFailed(Exception):
    """Writing a download's bytes failed with OSError `error` (a full disk): not told apart from the network's
    OSErrors, it would read as a failed download."""

    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


def _copy(response, out, total: int | None, label: str, progress: bool) -> int:
    """Copy `response` into `out`; the number of bytes copied."""
    copied = 0
    advance: Callable[[int], None] = lambda n: None  # noqa: E731
    bar = None
    if progress and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       console=Console(stderr=True), transient=True)
        task = bar.add_task(label, total=total)
        bar.start()

        def advance(n: int) -> None:
            bar.advance(task, n)
    try:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            try:
                out.write(chunk)
            except OSError as exc:  # the disk's failure, not the download's
                raise _WriteFailed(exc) from None
            copied += len(chunk)
            advance(len(chunk))
    finally:
        if bar is not None:
            bar.stop()
    return copied


def _pull_url(spec: ModelSpec, wf: WeightFile, dest: Path, revision: str | None, progress: bool) -> Pulled:
    target = dest / wf.name
    url = source_url(wf, revision)
    if (digest := _present(target, wf, None)) is not None:
        return Pulled("present", target, digest, ["registry"] if wf.sha256 else [])
    fd, name = tempfile.mkstemp(prefix=f".{wf.name}.", suffix=".part", dir=dest)
    tmp = Path(name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, _open(url) as response:
                length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
                total = int(length) if length and length.isdigit() else None
                copied = _copy(response, out, total, wf.name, progress)
        except _WriteFailed as exc:  # reported by pull() as the target's, like any output that cannot be written
            raise exc.error from None
        except OSError as exc:  # URLError, HTTPError, timeouts and resets are all OSErrors
            raise WeightsError(f"cannot download {wf.name} ({spec.name} {wf.role}) ({_reason(exc)}); "
                               f"{by_hand(wf, dest, revision)}") from None
        if total is not None and copied != total:  # a dropped connection ends read() early, without an error
            raise WeightsError(f"cannot download {wf.name} ({spec.name} {wf.role}): the transfer ended after "
                               f"{copied} of {total} bytes; nothing was written; {by_hand(wf, dest, revision)}")
        digest = sha256_of(tmp)
        checked = _check(spec, wf, digest, url, None)
        _install(tmp, target, digest)
    finally:
        tmp.unlink(missing_ok=True)
    return Pulled("downloaded", target, digest, checked)
