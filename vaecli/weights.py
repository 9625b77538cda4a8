"""Finding weights files on the search path, verifying their checksums, and loading them safely."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path

from vaecli.errors import WeightsError
from vaecli.files import reading
from vaecli.registry import ModelSpec, WeightFile

ENV_VAR = "VAE_WEIGHTS_DIR"
PROJECT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def cache_dir() -> Path:
    """The user's cache folder for weights (`$XDG_CACHE_HOME/vaecli` or `~/.cache/vaecli`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vaecli"


def search_path() -> list[Path]:
    """Folders searched for weights by file name, in order: `$VAE_WEIGHTS_DIR`, project `weights/`, cache."""
    dirs = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return dirs + [PROJECT_WEIGHTS, cache_dir()]


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with reading(path), open(path, "rb") as f:  # an unreadable file: its one-line InputError
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SIDECAR = ".sha256"  # `vae weights pull` records a file's checksum beside it, in `sha256sum` format


def sidecar_of(path: Path) -> Path:
    """The checksum record beside a weights file: `NAME.sha256`, one `sha256sum` line."""
    return path.with_name(path.name + SIDECAR)


def recorded_sha256(path: Path) -> str | None:
    """The SHA-256 recorded beside `path` when it was pulled, or None (no record, or not a `sha256sum` line)."""
    try:
        digest = sidecar_of(path).read_text().split()[0].lower()
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


def record_sha256(path: Path, digest: str) -> None:
    """Write `digest` beside `path` as `NAME.sha256` (atomically: a temporary file, then a rename)."""
    side = sidecar_of(path)
    tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, side)


def expected_sha256(wf: WeightFile, path: Path) -> tuple[str | None, str]:
    """The checksum `path` must have and where it comes from: the registry's, else the one recorded at pull."""
    if wf.sha256 is not None:
        return wf.sha256, "registry"
    recorded = recorded_sha256(path)
    return (recorded, "recorded") if recorded else (None, "")


def check_file(wf: WeightFile, path: Path) -> str:
    """Checksum state of a found file: "verified", "unverified" (no checksum known) or "checksum mismatch"."""
    expected, _ = expected_sha256(wf, path)
    if expected is None:
        return "unverified"
    return "verified" if sha256_of(path) == expected else "checksum mismatch"


def locate(wf: WeightFile) -> list[Path]:
    """Every copy of `wf` on the search path, in search order (the first is the one vaecli uses)."""
    return [d / wf.name for d in search_path() if _is_file(d / wf.name)]


def _is_file(path: Path) -> bool:
    """Whether `path` is a file; a folder of the search path the user may not search is its one-line InputError."""
    with reading(path):
        return path.is_file()


def find_on_search_path(spec: ModelSpec, wf: WeightFile, verify: bool = True) -> Path:
    """Path of `wf` on the search path, checksum-verified (against the registry, else the checksum recorded when
    `vae weights pull` fetched it) unless `verify` is False."""
    dirs = search_path()
    for d in dirs:
        path = d / wf.name
        if _is_file(path):
            expected, origin = expected_sha256(wf, path) if verify else (None, "")
            if expected is not None:
                digest = sha256_of(path)
                if digest != expected:
                    where = f" (recorded in {sidecar_of(path).name} when pulled)" if origin == "recorded" else ""
                    raise WeightsError(
                        f"checksum mismatch for {path}: expected sha256 {expected}{where}, got {digest} "
                        f"(replace the file, or pass --no-verify to use it anyway)"
                    )
            return path
    looked = ", ".join(str(d) for d in dirs)
    raise WeightsError(
        f"{wf.name} ({spec.name} {wf.role}) not found; looked in: {looked}; "
        f"run 'vae weights pull {spec.name}' or download it from {wf.url} into one of those folders, "
        f"or pass --weights PATH"
    )


def load_state_dict(path: Path) -> dict:
    """Tensors of a `.safetensors` or PyTorch (`.pth`/`.pt`/`.ckpt`) file, loaded without unpickling code."""
    import torch

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if path.is_dir():
        raise WeightsError(f"expected a weights file, got a folder: {path}")
    with reading(path), open(path, "rb") as f:
        head = f.read(9)
    _refuse_compressed(path)
    try:
        if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:  # PyTorch zip or legacy pickle: only tensors and plain containers are unpickled
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": stderr holds one Error line only
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for foreign/corrupt files
        # KeyError: a byte that is no pickle opcode (a text file); EOFError: the pickle stops short
        if isinstance(exc, (pickle.UnpicklingError, KeyError)) or "Weights only load failed" in str(exc):
            msg = "it holds objects other than tensors, or is not a PyTorch file (loaded with weights_only=True)"
        elif isinstance(exc, EOFError):
            msg = "the file is empty" if not head else "it ends before its pickled data does (a cut-off file?)"
        else:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            # torch's first sentence says what is wrong; the rest is advice for its own developers
            msg = msg.split(". ")[0] if ". " in msg[:200] else msg[:200]
        raise WeightsError(f"cannot load weights from {path}: expected a .pth or .safetensors state dict of "
                           f"tensors; {msg}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    if not sd:
        raise WeightsError(f"{path} holds no tensors (expected a state dict of the model's weights)")
    odd = next((k for k in sd if not isinstance(k, str)), None)
    if odd is not None:
        raise WeightsError(f"{path}: expected a state dict with string keys, found the key {str(odd)[:40]!r} "
                           f"({type(odd).__name__})")
    return sd


def _refuse_compressed(path: Path) -> None:
    """Refuse a PyTorch zip file with compressed entries: torch.save writes none, and torch.load would inflate each
    to its full size before any of its shapes could be checked (a few MB on disk can hold GBs of zeros)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            packed = [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch.load reports what is wrong with it
    if packed:
        raise WeightsError(f"cannot load weights from {path}: expected a PyTorch file as torch.save writes it, "
                           f"with stored entries; {len(packed)} are compressed ({packed[0][:60]}...), which would be "
                           f"inflated in full before their shapes could be checked (re-save it with torch.save)")
