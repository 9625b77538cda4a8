"""Latent files: `.safetensors` with self-describing metadata, and 8-bit RGBA PNG mosaics (TAESD scheme)."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from vaecli import media
from vaecli.errors import ComputeError, LatentFormatError
from vaecli.files import atomic_write, check_input, reading, writing
from vaecli.registry import REGISTRY

FORMAT = "vaecli-latent"
VERSION = 1
LATENT_MAGNITUDE = 3.0  # TAESD's PNG scheme maps [-3, 3] onto [0, 1]
LATENT_SHIFT = 0.5
PNG_KEY = "vaecli"
STRING_KEYS = frozenset({"format", "model", "space", "dtype"})  # stored as plain strings, not JSON
SAFETENSORS_MAGIC_MAX_HEADER = 100 * 1024 * 1024
# A latent file's header: vaecli's own take a few hundred bytes, ComfyUI's a workflow's JSON. Parsing one costs many
# times its size in entries and metadata keys (a 92 MB header of keys took 2.3 GB), so a larger one is refused unread.
LATENT_MAX_HEADER = 16 * 1024 * 1024
SPACES = ("raw", "scaled", "normalized", "native")  # every ModelSpec.spaces entry
KINDS = ("image", "video")  # "kind" absent: an image
FLOAT_DTYPES = ("F32", "F16", "BF16")
MODEL_NAME_MAX = 100


def make_metadata(spec, image_size: tuple[int, int], padding: tuple[int, int, int, int], dtype: str,
                  space: str | None = None, channels: int | None = None) -> dict:
    """Metadata for a latent made by `spec` from an image of `image_size` (W, H) padded by `padding`."""
    space = space or spec.latent_space
    scaled = space == "scaled"
    return {
        "format": FORMAT, "version": VERSION, "model": spec.name, "channels": channels or spec.latent_channels,
        "spatial_factor": latent_factor(spec, space), "space": space,
        "scaling_factor": spec.scaling_factor if scaled else 1.0,
        "shift_factor": spec.shift_factor if scaled else 0.0,
        "image_size": list(image_size), "padding": list(padding), "dtype": dtype,
    }


def latent_factor(spec, space: str | None = None) -> int:
    """Pixels per latent cell along each side of `spec`'s latents in `space` (FLUX.2's normalized: 2x2 patches)."""
    space = space or spec.latent_space
    return spec.spatial_factor * (spec.normalized_patch if space == "normalized" else 1)


def latent_channels(spec, space: str | None = None) -> int:
    """Channels of `spec`'s latents in `space` (FLUX.2's normalized: 2x2 patches of its 32)."""
    space = space or spec.latent_space
    return spec.latent_channels * (spec.normalized_patch ** 2 if space == "normalized" else 1)


# What any latent a model here decodes can be: at most this wide, at least this fine.
_WIDEST = max(latent_channels(s, space) for s in REGISTRY.values() for space in s.spaces)
_FINEST = min(latent_factor(s, space) for s in REGISTRY.values() for space in s.spaces)


def _check_latent(latent: torch.Tensor, meta: dict, source: str) -> None:
    """Refuse to write a latent whose shape contradicts `meta`, or that holds NaN or Inf."""
    _check_shape(list(latent.shape), meta, source)
    _check_output_finite(latent, source)


def _check_output_finite(latent: torch.Tensor, source: str, first: int | None = None) -> None:
    # Weights are checked finite when loaded, so this is an overflow (fp16's range is small); such a file would be
    # refused when read, or (as a PNG, whose 8 bits clamp) decode to garbage.
    bad = media.count_non_finite(latent)
    if bad:
        where = f" in latent frames from {first}" if first is not None else ""
        raise ComputeError(f"{source}: expected finite latents to write, the model gave {bad} NaN/Inf{where} (an "
                           f"overflow: try another --dtype); nothing was written")


def _check_shape(shape: list[int], meta: dict, source: str) -> None:
    """Refuse a latent shape that is not what the metadata's kind and channels say, or that has an empty axis."""
    if meta.get("kind") == "video":
        if len(shape) != 4:
            raise LatentFormatError(f"{source}: expected a (T, C, h, w) latent video, got shape {shape}")
    elif len(shape) != 3:
        raise LatentFormatError(f"{source}: expected a (C, h, w) latent, got shape {shape}")
    if min(shape) < 1:
        raise LatentFormatError(f"{source}: expected every latent dimension to be at least 1, got shape {shape}")
    if "channels" in meta and shape[-3] != int(meta["channels"]):
        raise LatentFormatError(f"{source}: metadata says {meta['channels']} channels, tensor has {shape[-3]}")


def _check_layout(shape: list[int], meta: dict, source: str) -> None:
    """Refuse a stored latent of `shape` that contradicts its metadata or would decode past the pixel limit, before
    its values are read."""
    _check_shape(shape, meta, source)
    maker = REGISTRY.get(str(meta.get("model")))
    if maker is not None:
        space = meta.get("space", maker.latent_space)
        factor, owner = latent_factor(maker, space), f"{maker.name} '{space}' latents"
        channels = latent_channels(maker, space)
        if shape[-3] != channels:
            raise LatentFormatError(f"{source}: expected {channels} latent channels for {maker.name}, "
                                    f"got {shape[-3]}")
        problem = layout_problem(shape[-2:], meta, factor, owner)
    elif meta.get("spatial_factor"):  # a model this vaecli does not know: its own word (decoding needs --model)
        problem = layout_problem(shape[-2:], meta, meta["spatial_factor"], "")
    else:
        # Whichever model decodes it is one of the registry's: its latents are never wider, nor its factor smaller.
        if shape[-3] > _WIDEST:
            raise LatentFormatError(f"{source}: expected at most {_WIDEST} latent channels (the most any model here "
                                    f"decodes), got {shape[-3]}")
        problem = _decode_size_problem(shape[-2:], _FINEST)
    if problem:
        raise LatentFormatError(f"{source}: {problem}")


def layout_problem(hw, meta: dict, factor: int, owner: str) -> str | None:
    """What contradicts an (h, w) latent of spatial factor `factor` (that of `owner`) in its metadata, or what makes
    it decode past `media.max_pixels()`; None when nothing does."""
    recorded = meta.get("spatial_factor", factor)
    if recorded != factor:
        return f"metadata 'spatial_factor' must be {factor} for {owner}, got {recorded}"
    return _size_problem(hw, meta, factor) or _decode_size_problem(hw, factor)


def _size_problem(hw, meta: dict, f: int) -> str | None:
    # The encoder pads the image on the right and bottom to the next multiple of f (pad_to_multiple), so a latent
    # of h x w cells holds an image of W in (w f - f, w f] columns padded by exactly w f - W (likewise rows).
    h, w = hw
    left, top, right, bottom = meta.get("padding") or (0, 0, 0, 0)
    if "image_size" not in meta:
        if left + right < f and top + bottom < f:
            return None
        return (f"metadata 'padding' must add under {f} columns and under {f} rows (left + right, top + bottom) at "
                f"spatial factor {f}, got {meta['padding']}")
    width, height = meta["image_size"]
    if not (w * f - f < width <= w * f and h * f - f < height <= h * f):
        return (f"metadata 'image_size' must be [W, H] with W in {w * f - f + 1}..{w * f} and H in "
                f"{h * f - f + 1}..{h * f} for a {h}x{w} (h x w) latent at spatial factor {f}, got {[width, height]}")
    if "padding" in meta and (left + right, top + bottom) != (w * f - width, h * f - height):
        return (f"metadata 'padding' must add {w * f - width} columns and {h * f - height} rows (left + right, "
                f"top + bottom) to the {width}x{height} image of a {h}x{w} latent at spatial factor {f}, "
                f"got {meta['padding']}")
    return None


def _decode_size_problem(hw, f: int) -> str | None:
    h, w = hw
    limit = media.max_pixels()
    if h * f * w * f <= limit:
        return None
    return (f"it decodes to {w * f}x{h * f} pixels, over the limit of {limit} pixels "
            f"(set VAE_MAX_PIXELS to allow larger images)")


def _check_finite(latent: torch.Tensor, source: str, first: int | None = None) -> None:
    """Refuse latents holding NaN or Inf (they decode without any error, to garbage); `first`: latent frames' index."""
    bad = media.count_non_finite(latent)
    if not bad:
        return
    where = ""
    if first is not None:
        last = first + latent.shape[0] - 1
        where = f" in latent frame {first}" if last == first else f" in latent frames {first}-{last}"
    raise LatentFormatError(f"{source}: expected finite latent values, found {bad} NaN/Inf{where}")


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def safetensors_bytes(latent: torch.Tensor, meta: dict, source: str = "latent") -> bytes:
    """A (C, h, w) latent and its metadata as `.safetensors` file bytes, the same bytes for the same input.

    Written here rather than by safetensors' `save`, whose metadata order (a Rust HashMap) changes from run to
    run: equal latents must give equal files, for checksums, dedup and comparing engines.
    """
    _check_latent(latent, meta, source)
    return _st_bytes({"latent": latent}, meta, source)


def _st_bytes(tensors: dict[str, torch.Tensor], meta: dict, source: str) -> bytes:
    """Named tensors (stored in this order) and string-encoded metadata as deterministic `.safetensors` bytes."""
    entries, blobs, offset = {}, [], 0
    for name, latent in tensors.items():
        tensor = latent.detach().to("cpu").contiguous()
        if tensor.dtype not in _ST_DTYPES:
            raise LatentFormatError(f"{source}: expected a float32/float16/bfloat16 latent, got {tensor.dtype}")
        data = tensor.flatten().view(torch.uint8).numpy().tobytes()
        entries[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    header = json.dumps({"__metadata__": strings, **entries}, sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    return len(header).to_bytes(8, "little") + header + b"".join(blobs)


def save_safetensors(path: Path, latent: torch.Tensor, meta: dict) -> None:
    """Write a (C, h, w) latent and its metadata (JSON-encoded values) to a `.safetensors` file atomically."""
    blob = safetensors_bytes(latent, meta, str(path))
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(blob))


def _quantize(latent: torch.Tensor) -> torch.Tensor:
    return latent.float().div(2 * LATENT_MAGNITUDE).add(LATENT_SHIFT).clamp(0, 1).mul(255).round()


def _dequantize(q: torch.Tensor) -> torch.Tensor:
    return q.div(255).sub(LATENT_SHIFT).mul(2 * LATENT_MAGNITUDE)


def _grid(groups: int) -> tuple[int, int]:
    # The factor pair closest to square, wider than tall: 8 groups -> 2 rows x 4 columns.
    rows = max(r for r in range(1, int(math.isqrt(groups)) + 1) if groups % r == 0)
    return rows, groups // rows


def save_png(path: Path, latent: torch.Tensor, meta: dict) -> None:
    """Write a (C, h, w) latent as an RGBA uint8 PNG: `clamp(x / 6 + 0.5, 0, 1) * 255`, 4-channel groups in a grid."""
    _check_latent(latent, meta, str(path))
    c, h, w = latent.shape
    groups = -(-c // 4)
    rows, cols = _grid(groups)
    q = _quantize(latent.detach().cpu())
    q = torch.cat([q, torch.full((groups * 4 - c, h, w), 128.0)])  # pad to whole groups with zero latents
    mosaic = q.reshape(rows, cols, 4, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 4)
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps({**meta, "grid": [rows, cols], "latent_shape": [c, h, w]}))
    img = Image.fromarray(mosaic.to(torch.uint8).numpy(), "RGBA")
    media.write_pillow(path, img, format="PNG", pnginfo=info)


def quantize_png(latent: torch.Tensor) -> torch.Tensor:
    """A (C, h, w) latent as it comes back from a PNG latent file (8-bit TAESD scheme), same dtype."""
    return _dequantize(_quantize(latent)).to(latent.dtype)


def _decode_meta(raw: dict, source: str) -> dict:
    meta = {}
    for k, v in raw.items():
        if k in STRING_KEYS and isinstance(v, str):
            meta[k] = v
            continue
        try:
            meta[k] = json.loads(v)
        except (TypeError, ValueError, RecursionError):  # RecursionError: nested past Python's stack
            meta[k] = v
    if meta.get("format") != FORMAT:
        raise LatentFormatError(f"{source}: not a vaecli latent file (no '{FORMAT}' format metadata)")
    version = meta.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise LatentFormatError(f"{source}: expected an integer latent format version, got {str(version)[:40]!r}")
    if version > VERSION:
        raise LatentFormatError(f"{source}: latent format version {str(version)[:40]} is newer than this vaecli "
                                f"understands ({VERSION}); upgrade vaecli")
    check_fields(meta, source)
    return meta


# Metadata a hostile or damaged file could get wrong, checked before anything uses it: key -> (what, test).
_FIELDS = {
    "image_size": ("[W, H] of positive integers", lambda v: _ints(v, 2) and min(v) > 0),
    "padding": ("[left, top, right, bottom] of integers >= 0", lambda v: _ints(v, 4) and min(v) >= 0),
    "channels": ("a positive integer", lambda v: _ints([v], 1) and v > 0),
    "scaling_factor": ("a non-zero number", lambda v: _number(v) and v != 0),
    "shift_factor": ("a number", lambda v: _number(v)),
    "fps": ("a number between 0.001 and 1000", lambda v: _number(v) and 0.001 <= v <= 1000),  # video.FPS_MIN..MAX
    # Bounded: messages quote the name whole ("made by model '...'"), and must stay a line one can read.
    "model": (f"a model name of at most {MODEL_NAME_MAX} characters",
              lambda v: isinstance(v, str) and len(v) <= MODEL_NAME_MAX),
    "space": (f"one of {', '.join(SPACES)}", lambda v: isinstance(v, str) and v in SPACES),
    "kind": (f"one of {', '.join(KINDS)}", lambda v: isinstance(v, str) and v in KINDS),
    "spatial_factor": ("a positive integer", lambda v: _ints([v], 1) and v > 0),
    "temporal_factor": ("a positive integer", lambda v: _ints([v], 1) and v > 0),
}


def _ints(v, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_fields(meta: dict, source: str) -> None:
    """Refuse metadata whose known fields have the wrong type or range (a file's when read; an API Latent's)."""
    for key, (what, ok) in _FIELDS.items():
        if key in meta and not ok(meta[key]):
            raise LatentFormatError(f"{source}: metadata '{key}' must be {what}, got {str(meta[key])[:40]!r}")


@contextmanager
def _unreadable(path: Path, what: str = "safetensors file") -> Iterator[None]:
    """safetensors' own error types (truncated or foreign files) as a LatentFormatError."""
    try:
        yield
    except LatentFormatError:
        raise
    except Exception as exc:
        raise LatentFormatError(f"{path}: truncated or corrupt {what} ({str(exc)[:120]})") from None


def _st_latent_header(path: Path) -> tuple[dict, list[int]]:
    """A vaecli `.safetensors` latent's metadata and `latent` shape, from its header (its dtype checked)."""
    from safetensors import safe_open

    with reading(path), open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    if n > LATENT_MAX_HEADER:
        raise LatentFormatError(f"{path}: expected a safetensors header of at most {LATENT_MAX_HEADER} bytes for a "
                                f"latent file, got {n}")
    with _unreadable(path), safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        keys = list(f.keys())
        part = f.get_slice("latent") if "latent" in keys else None
        dtype, shape = (part.get_dtype(), list(part.get_shape())) if part is not None else ("", [])
    if raw.get("format") != FORMAT:
        raise LatentFormatError(f"{path}: not a vaecli latent file (a safetensors file with tensors "
                                f"{', '.join(keys[:3])}{'...' if len(keys) > 3 else ''} and no "
                                f"'{FORMAT}' metadata)")
    if part is None:
        raise LatentFormatError(f"{path}: no 'latent' tensor in the file")
    meta = _decode_meta(raw, str(path))
    if dtype not in FLOAT_DTYPES:
        what = "latent video" if meta.get("kind") == "video" else "latent"
        raise LatentFormatError(f"{path}: expected a float32/float16/bfloat16 {what}, got {dtype}")
    return meta, shape


def _load_safetensors(path: Path) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    meta, shape = _st_latent_header(path)
    _check_layout(shape, meta, str(path))
    with _unreadable(path), safe_open(str(path), framework="pt") as f:
        latent = f.get_tensor("latent")
    _check_finite(latent, str(path))
    return latent, meta


def _load_png(path: Path) -> tuple[torch.Tensor, dict]:
    try:
        with media.pixel_limit(path, "latent PNG mosaic", LatentFormatError), Image.open(path) as img:
            meta, (rows, cols), (c, h, w) = _png_layout(img, path)
            _check_png_data(path)
            img.load()
            arr = np.asarray(img)
    except LatentFormatError:
        raise
    except (OSError, SyntaxError, ValueError, zlib.error) as exc:
        raise LatentFormatError(f"{path}: truncated or corrupt PNG ({exc})") from None
    q = torch.from_numpy(arr.copy()).float().reshape(rows, h, cols, w, 4).permute(0, 2, 4, 1, 3)
    latent = _dequantize(q.reshape(rows * cols * 4, h, w)[:c])
    return latent, meta


def _png_layout(img: Image.Image, path: Path) -> tuple[dict, tuple[int, int], tuple[int, int, int]]:
    """An opened latent PNG's metadata, grid and latent shape, checked against its mosaic's header (no pixels read)."""
    text = img.info.get(PNG_KEY)
    if text is None:
        text = _text_after_pixels(path)
    if text is None:
        raise LatentFormatError(f"{path}: a PNG without vaecli latent metadata (is it an image? "
                                f"use 'vae encode' on images)")
    if img.mode != "RGBA":
        raise LatentFormatError(f"{path}: expected an RGBA latent PNG, got mode {img.mode}")
    with open(path, "rb") as f:  # IHDR's bit depth: Pillow reads a 16-bit RGBA PNG as 8-bit, keeping the high bytes
        f.seek(24)
        depth = f.read(1)
    if depth != b"\x08":
        raise LatentFormatError(f"{path}: expected an 8-bit RGBA latent PNG, got {depth[0] if depth else '?'} bits "
                                f"per channel")
    meta = _png_meta(text, str(path))
    rows, cols = meta.pop("grid")
    c, h, w = meta.pop("latent_shape")
    # Tiles past the last channel group would be read (and made float) for nothing: a few KB of PNG took GBs.
    if rows * cols != -(-c // 4):
        raise LatentFormatError(f"{path}: a {rows}x{cols} grid holds {rows * cols} 4-channel tiles, {c} channels "
                                f"need {-(-c // 4)}")
    if img.size != (cols * w, rows * h):
        raise LatentFormatError(f"{path}: mosaic is {img.size[0]}x{img.size[1]}, expected "
                                f"{cols * w}x{rows * h} for a {c}x{h}x{w} latent")
    _check_layout([c, h, w], meta, str(path))
    return meta, (rows, cols), (c, h, w)


def _text_after_pixels(path: Path) -> str | None:
    """The vaecli text chunk of a PNG that stores it after its pixel data, found without decoding them (Pillow reads
    such chunks only by decoding the whole picture: a 1 MB file of up to VAE_MAX_PIXELS pixels would take GBs)."""
    with open(path, "rb") as f:
        f.seek(8)
        png = PngImagePlugin.PngStream(f)
        while True:
            try:
                kind, pos, length = png.read()
            except (struct.error, SyntaxError):  # the file ends, or is no PNG past here: as Pillow stops
                break
            if kind == b"IEND":
                break
            if kind in (b"tEXt", b"zTXt", b"iTXt"):
                png.call(kind, pos, length)  # Pillow's own parsing and text size limits
            else:
                f.seek(length, os.SEEK_CUR)
            f.seek(4, os.SEEK_CUR)  # the CRC
    return png.im_text.get(PNG_KEY)


def _check_png_data(path: Path) -> None:
    """Refuse a PNG whose pixel data ends early (Pillow zero-fills what a short, well-formed stream lacks)."""
    got, need = media.png_data_bytes(path)
    if got < need:
        raise LatentFormatError(f"{path}: truncated latent PNG: its pixel data holds {got} bytes, its size needs "
                                f"{need}")


def _png_meta(text: str, source: str) -> dict:
    """The metadata of a PNG latent's text chunk, with its grid and latent shape checked."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raw = None
    if not isinstance(raw, dict):
        raise LatentFormatError(f"{source}: unreadable vaecli metadata (expected a JSON object)")
    meta = _decode_meta(raw, source)
    if meta.get("kind") == "video":
        raise LatentFormatError(f"{source}: metadata 'kind' must be image in a latent PNG (it holds one latent), "
                                f"got 'video'")
    if not _ints(meta.get("grid"), 2) or min(meta["grid"]) < 1:
        raise LatentFormatError(f"{source}: metadata 'grid' must be [rows, columns] of positive integers")
    if not _ints(meta.get("latent_shape"), 3) or min(meta["latent_shape"]) < 1:
        raise LatentFormatError(f"{source}: metadata 'latent_shape' must be [C, h, w] of positive integers")
    return meta


def _is_safetensors(head: bytes) -> bool:
    """Whether a file's first 8 bytes can be a safetensors header length."""
    return len(head) == 8 and 2 <= int.from_bytes(head, "little") <= SAFETENSORS_MAGIC_MAX_HEADER


def load_latent(path: Path, model: str | None = None) -> tuple[torch.Tensor, dict]:
    """Read a latent file (safetensors or PNG, told apart by content) as a (C, h, w) tensor and its metadata.

    A ComfyUI `.latent` file gives its item `path.index` (see `latent_item`), read as raw latents of `model` (or
    `path.model`) unless vaecli's metadata rides in its header.
    """
    comfy = _comfyui_open(path, model)
    if comfy is not None:
        meta, shape, frames = comfy
        latent = frames(0, shape[0])
        return (latent if meta.get("kind") == "video" else latent[0]), meta
    path = Path(path)
    check_input(path, "a latent file", LatentFormatError)
    with reading(path), open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89PNG"):
        return _load_png(path)
    if _is_safetensors(head):
        return _load_safetensors(path)
    found = "an empty file" if not head else "not a latent file"
    raise LatentFormatError(f"{path}: {found} (expected .safetensors or a vaecli latent PNG)")


# --- latent videos: (T, C, h, w), written and read a few frames at a time -----------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class LatentVideoWriter:
    """Streams (n, C, h, w) latent chunks into one `.safetensors` file holding a (T, C, h, w) `latent`.

    Frames go to a temp file as they come; `close(meta)` writes header + data beside the destination and
    renames it into place, so memory stays flat in clip length and no partial file is ever visible.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._data = tempfile.TemporaryFile(dir=self.path.parent)
        self.shape: list[int] | None = None
        self.dtype: torch.dtype | None = None

    def write(self, latents: torch.Tensor) -> None:
        """Append (n, C, h, w) latents."""
        latents = latents.detach().cpu().contiguous()
        _check_output_finite(latents, str(self.path), self.shape[0] if self.shape else 0)
        if self.shape is None:
            self.shape, self.dtype = [0, *latents.shape[1:]], latents.dtype
        self.shape[0] += latents.shape[0]
        raw = latents.view(torch.int16) if latents.dtype == torch.bfloat16 else latents
        with writing(self.path):
            self._data.write(raw.numpy().tobytes())

    def close(self, meta: dict) -> None:
        """Write the file with `meta` (JSON-encoded values) and move it into place."""
        if self.shape is None or self.shape[0] == 0:
            raise LatentFormatError(f"{self.path}: no frames were encoded")
        size = self._data.tell()
        header = {"latent": {"dtype": _ST_DTYPES[self.dtype], "shape": self.shape, "data_offsets": [0, size]},
                  "__metadata__": {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)

        def write(tmp: Path) -> None:
            self._data.seek(0)
            with open(tmp, "wb") as out:
                out.write(len(blob).to_bytes(8, "little"))
                out.write(blob)
                shutil.copyfileobj(self._data, out, 1 << 20)

        try:
            atomic_write(self.path, write)
        finally:
            self._data.close()

    def abort(self) -> None:
        """Discard everything written so far."""
        self._data.close()


def read_metadata(path: Path, model: str | None = None, need_model: bool = True) -> dict:
    """A latent file's metadata without reading its tensor (safetensors header or PNG text chunk); `model` as for
    `load_latent`. Without `need_model`, a ComfyUI file that records no model gives what it holds: format "comfyui",
    model None, its shape ((C, h, w) or (T, C, h, w)), batch size and dtype."""
    if model is None and not need_model and getattr(path, "model", None) is None:
        layout = _comfyui_layout(Path(path))
        raw = layout[0].get("__metadata__") if layout else None
        if layout and not (isinstance(raw, dict) and raw.get("format") == FORMAT):
            _, _, (b, c, t, h, w), dtype, _ = layout
            return {"format": "comfyui", "model": None, "kind": "video" if t > 1 else "image", "batch": b,
                    "dtype": str(dtype).removeprefix("torch."), "shape": [t, c, h, w] if t > 1 else [c, h, w]}
    comfy = _comfyui_open(path, model)
    if comfy is not None:
        meta, shape, _ = comfy
        return {**meta, "shape": shape if meta.get("kind") == "video" else shape[1:]}
    path = Path(path)
    if not os.path.isfile(path):  # (Path.is_file() raises where a folder on the way may not be searched)
        return load_latent(path)[1]  # raises the right "no such file" / "is a folder" / "cannot read" error
    with reading(path), open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89PNG"):
        try:  # the header and text chunk say all decode would check first: no need to decode the mosaic
            with media.pixel_limit(path, "latent PNG mosaic", LatentFormatError), Image.open(path) as img:
                meta, _, (c, h, w) = _png_layout(img, path)
            _check_png_data(path)
        except LatentFormatError:
            raise
        except (OSError, SyntaxError, ValueError, KeyError, TypeError, zlib.error):
            latent, meta = load_latent(path)  # reports the precise format error
            return {**meta, "shape": list(latent.shape)}
        shape = [c, h, w]
    elif _is_safetensors(head):
        meta, shape = _st_latent_header(path)
    else:
        return load_latent(path)[1]  # reports what it is not
    _check_layout(shape, meta, str(path))
    return {**meta, "shape": shape}


def open_latent_video(path: Path, model: str | None = None) -> tuple[dict, list[int], Callable[[int, int],
                                                                                        torch.Tensor]]:
    """Metadata, shape (T, C, h, w) and a reader of frames [i, j) of a latent video, without loading it all
    (ComfyUI's (B, C, T, h, w) files too: item `path.index`, `model` as for `load_latent`)."""
    comfy = _comfyui_open(path, model)
    if comfy is not None:
        meta, shape, frames = comfy
        missing = [k for k in ("image_size", "fps") if k not in meta]
        if missing:
            raise LatentFormatError(f"{path}: a latent video needs 'image_size' and 'fps' metadata; "
                                    f"no {', '.join(missing)}")
        return {**meta, "kind": "video"}, shape, frames
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        raw = handle.metadata() or {}
        part = handle.get_slice("latent")
        shape = list(part.get_shape())
    except Exception as exc:  # safetensors' own error types for truncated or foreign files
        raise LatentFormatError(f"{path}: truncated or corrupt latent video ({str(exc)[:120]})") from None
    meta = _decode_meta(raw, str(path))
    if part.get_dtype() not in FLOAT_DTYPES:
        raise LatentFormatError(f"{path}: expected a float32/float16/bfloat16 latent video, got {part.get_dtype()}")
    missing = [k for k in ("image_size", "fps") if k not in meta]
    if missing or len(shape) != 4:
        raise LatentFormatError(f"{path}: expected a (T, C, h, w) latent video with 'image_size' and 'fps' "
                                f"metadata, got shape {shape}{' and no ' + ', '.join(missing) if missing else ''}")
    _check_layout(shape, {**meta, "kind": "video"}, str(path))

    # Frames are read with plain file reads, not through safetensors' memory map: mapped pages that were read stay
    # in the process's resident memory, which would then grow with the clip's length.
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))["latent"]
    dtype = {v: k for k, v in _ST_DTYPES.items()}[entry["dtype"]]
    frame_bytes = math.prod(shape[1:]) * torch.finfo(dtype).bits // 8
    start = 8 + n + int(entry["data_offsets"][0])

    def frames(i: int, j: int) -> torch.Tensor:
        i, j = max(0, i), min(shape[0], j)
        with open(path, "rb") as f:
            f.seek(start + i * frame_bytes)
            data = bytearray(f.read((j - i) * frame_bytes))
        if len(data) != (j - i) * frame_bytes:
            raise LatentFormatError(f"{path}: truncated latent video (frames {i}-{j - 1} missing)")
        latents = torch.frombuffer(data, dtype=dtype).reshape(j - i, *shape[1:])
        _check_finite(latents, str(path), i)  # chunk by chunk, as they are read
        return latents

    return meta, shape, frames


# --- ComfyUI `.latent` files ----------------------------------------------------------------------------------------
# safetensors with `latent_tensor` (images (B, C, h, w), video (B, C, T, h, w)) in the autoencoder's raw space and an
# empty `latent_format_version_0` marker; ComfyUI's LoadLatent reads a file without the marker as SD 1.x latents
# scaled by 0.18215 and multiplies it by 1 / 0.18215. Its workflow JSON rides in the header's metadata.

COMFYUI_KEY = "latent_tensor"
COMFYUI_MARKER = "latent_format_version_0"
COMFYUI_LEGACY_SCALE = 0.18215
COMFYUI_FPS = 24.0  # ComfyUI records no frame rate
COMFYUI_MAX_BATCH = 4096  # ComfyUI's own limit (EmptyLatentImage); each item becomes a job and an output file
_ST_NAMES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class LatentItem(type(Path())):
    """A latent file path naming item `index` of a batched (ComfyUI) file, read as `model`'s latents when the file
    records no model. Plain `Path` methods see the file itself."""

    model: str | None = None
    index: int = 0
    batch: int = 1


def latent_item(path: Path, model: str | None = None, index: int = 0, batch: int = 1) -> LatentItem:
    """`path` carrying the model and batch item (of `batch`) a ComfyUI file is read with (see `LatentItem`)."""
    item = LatentItem(path)
    item.model, item.index, item.batch = model, index, batch
    return item


def _st_header(path: Path) -> tuple[dict, int] | None:
    """A safetensors file's JSON header and where its data starts, or None when it is not one (or unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            n = int.from_bytes(head, "little")
            if not 2 <= n <= LATENT_MAX_HEADER:  # a larger one is refused as the latent file it may be
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested past Python's stack
        return None
    return (header, 8 + n) if isinstance(header, dict) else None


def comfyui_batch(path: Path) -> int | None:
    """The batch size of a ComfyUI `.latent` file (from its header alone), or None for any other file."""
    try:
        layout = _comfyui_layout(Path(path))
    except Exception:  # a damaged or hostile file: reported when it is read, as that input's failure
        return 1
    return None if layout is None else layout[2][0]


def _comfyui_layout(path: Path) -> tuple[dict, int, tuple[int, ...], torch.dtype, int] | None:
    """A ComfyUI file's header, data start, shape (B, C, T, h, w), dtype and tensor offset, checked against the
    file's size; None when `path` is no ComfyUI file."""
    found = _st_header(path) if os.path.isfile(path) else None
    if found is None or COMFYUI_KEY not in found[0]:
        return None
    header, start = found
    entry = header[COMFYUI_KEY]
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not (isinstance(shape, list) and len(shape) in (4, 5) and _ints(shape, len(shape)) and min(shape) > 0):
        raise LatentFormatError(f"{path}: expected a ComfyUI latent_tensor of shape (B, C, h, w) or (B, C, T, h, w), "
                                f"got {str(shape)[:60]}")
    dtype = _ST_NAMES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise LatentFormatError(f"{path}: expected a float32/float16/bfloat16 latent_tensor, got "
                                f"{str(entry.get('dtype'))[:20]}")
    if shape[0] > COMFYUI_MAX_BATCH:
        raise LatentFormatError(f"{path}: expected a ComfyUI batch of at most {COMFYUI_MAX_BATCH} latents, got "
                                f"{shape[0]}")
    shape5 = tuple(shape) if len(shape) == 5 else (shape[0], shape[1], 1, *shape[2:])
    offsets = entry.get("data_offsets")
    if not (_ints(offsets, 2) and 0 <= offsets[0] and
            offsets[1] - offsets[0] == math.prod(shape5) * torch.finfo(dtype).bits // 8):
        raise LatentFormatError(f"{path}: latent_tensor data does not match its shape {shape}")
    if path.stat().st_size < start + offsets[1]:
        raise LatentFormatError(f"{path}: truncated ComfyUI latent (file shorter than its latent_tensor)")
    return header, start, shape5, dtype, offsets[0]


def _comfyui_open(path: Path, model: str | None) -> tuple[dict, list[int], Callable[[int, int], torch.Tensor]] | None:
    """A ComfyUI file's item as (vaecli metadata, shape (T, C, h, w), reader of frames [i, j)); None for others."""
    index = getattr(path, "index", 0)
    model = model or getattr(path, "model", None)
    path = Path(path)
    layout = _comfyui_layout(path)
    if layout is None:
        return None
    header, start, (b, c, t, h, w), dtype, offset = layout
    if not 0 <= index < b:
        raise LatentFormatError(f"{path}: no batch item {index} (batch of {b})")
    multiplier = 1.0 if COMFYUI_MARKER in header else 1.0 / COMFYUI_LEGACY_SCALE
    raw = header.get("__metadata__") or {}
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        meta = _decode_meta(raw, str(path))  # written by `vae encode/video --format comfyui`
        if meta.get("space", "raw") != "raw":
            raise LatentFormatError(f"{path}: a ComfyUI latent holds raw latents, metadata says "
                                    f"'{str(meta.get('space'))[:20]}'")
    else:
        meta = _comfyui_meta(path, model, c, h, w, video=t > 1)
    if "channels" in meta and meta["channels"] != c:
        raise LatentFormatError(f"{path}: metadata says {meta['channels']} channels, tensor has {c}")
    video = meta.get("kind") == "video"
    if t > 1 and not video:  # else frame 0 alone would be read, the rest dropped unsaid
        raise LatentFormatError(f"{path}: metadata says an image latent, latent_tensor has {t} latent frames "
                                f"(shape {[b, c, t, h, w]})")
    _check_layout([t, c, h, w] if video else [c, h, w], meta, str(path))
    plane = h * w * torch.finfo(dtype).bits // 8
    base = start + offset + index * c * t * plane

    def frames(i: int, j: int) -> torch.Tensor:
        i, j = max(0, i), min(t, j)
        if j <= i:
            return torch.zeros(0, c, h, w)
        parts = []
        with open(path, "rb") as f:  # plain reads, not a memory map: resident memory stays one chunk
            for ch in range(c):
                f.seek(base + (ch * t + i) * plane)
                data = bytearray(f.read((j - i) * plane))
                if len(data) != (j - i) * plane:
                    raise LatentFormatError(f"{path}: truncated ComfyUI latent")
                parts.append(torch.frombuffer(data, dtype=dtype).reshape(j - i, h, w))
        out = torch.stack(parts, 1).float()  # (j - i, C, h, w); ComfyUI's LoadLatent takes .float() too
        out = out * multiplier if multiplier != 1.0 else out
        _check_finite(out, str(path), i if video else None)
        return out

    return meta, [t if video else 1, c, h, w], frames


def _comfyui_meta(path: Path, model: str | None, c: int, h: int, w: int, video: bool) -> dict:
    """vaecli metadata for a ComfyUI file, which records no model: raw latents of `model`, nothing padded."""
    if model is None:
        raise LatentFormatError(f"{path}: a ComfyUI latent records no model: pass --model")
    spec = REGISTRY.get(model)
    if spec is None:
        raise LatentFormatError(f"{path}: unknown model '{model}'")
    f = spec.spatial_factor
    meta = make_metadata(spec, (w * f, h * f), (0, 0, 0, 0), "fp32", space="raw", channels=c)
    if video:
        meta.update(kind="video", fps=COMFYUI_FPS)
        if spec.temporal_factor > 1:
            meta["temporal_factor"] = spec.temporal_factor
    return meta


def comfyui_bytes(latent: torch.Tensor, meta: dict, source: str = "latent") -> bytes:
    """A raw (C, h, w) latent as ComfyUI `.latent` bytes: `latent_tensor` (1, C, h, w), the empty version marker,
    and vaecli's metadata in the header (so `vae decode` needs no flags)."""
    _check_latent(latent, meta, source)
    if meta.get("space") != "raw":
        raise LatentFormatError(f"{source}: ComfyUI latents are raw; got '{meta.get('space')}' latents")
    return _st_bytes({COMFYUI_KEY: latent[None], COMFYUI_MARKER: torch.zeros(0)}, meta, source)


def save_comfyui(path: Path, latent: torch.Tensor, meta: dict) -> None:
    """Write a raw (C, h, w) latent as a ComfyUI `.latent` file (see `comfyui_bytes`) atomically."""
    blob = comfyui_bytes(latent, meta, str(path))
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(blob))


def _to_raw(meta: dict, spec, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (a, b) with raw = z * a + b for latents in the space `meta` names (of model `spec`)."""
    space = meta.get("space", spec.latent_space)
    ones, zeros = torch.ones(channels), torch.zeros(channels)
    if space == "raw":
        return ones, zeros
    if space == "scaled":
        return ones / float(meta["scaling_factor"]), zeros + float(meta.get("shift_factor", 0.0))
    if space == "normalized" and len(spec.latents_mean) == channels:
        return torch.tensor(spec.latents_std), torch.tensor(spec.latents_mean)
    raise LatentFormatError(f"{spec.name}: '{space}' latents cannot be written for ComfyUI (raw latents only)")


def comfyui_video(src: Path, dst: Path, spec) -> list[int]:
    """Rewrite vaecli latent video `src` ((T, C, h, w), any space of `spec`) as ComfyUI file `dst`: raw
    (1, C, T, h, w), the marker, vaecli's metadata; streamed a latent plane at a time, written atomically.
    Returns the ComfyUI shape."""
    meta, shape, _ = open_latent_video(src)
    t, c, h, w = shape
    a, b = _to_raw(meta, spec, c)
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))["latent"]
    dtype = _ST_NAMES[entry["dtype"]]
    item = torch.finfo(dtype).bits // 8
    plane = h * w * item
    data_start = 8 + n + int(entry["data_offsets"][0])
    out_meta = {**meta, "space": "raw", "scaling_factor": 1.0, "shift_factor": 0.0}
    size = t * c * plane
    entries = {COMFYUI_KEY: {"dtype": entry["dtype"], "shape": [1, c, t, h, w], "data_offsets": [0, size]},
               COMFYUI_MARKER: {"dtype": "F32", "shape": [0], "data_offsets": [size, size]}}
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in out_meta.items()}
    header = json.dumps({"__metadata__": strings, **entries}, sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)

    def write(tmp: Path) -> None:
        with open(src, "rb") as inp, open(tmp, "wb") as out:
            out.write(len(header).to_bytes(8, "little") + header)
            for ch in range(c):
                for i in range(t):
                    inp.seek(data_start + (i * c + ch) * plane)
                    z = torch.frombuffer(bytearray(inp.read(plane)), dtype=dtype)
                    if a[ch] != 1 or b[ch] != 0:
                        z = (z.float() * a[ch] + b[ch]).to(dtype)
                    out.write(z.view(torch.int16 if dtype == torch.bfloat16 else dtype).numpy().tobytes())

    atomic_write(Path(dst), write)
    return [1, c, t, h, w]
