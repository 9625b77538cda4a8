"""Image I/O with Pillow, and padding/cropping to a model's spatial factor."""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from vaecli.errors import ComputeError, InputError, OutputError, UsageError
from vaecli.files import atomic_write, check_input, read_error

DEFAULT_MAX_PIXELS = 1 << 28  # 16384 x 16384; above this an image is refused as a likely decompression bomb
ALPHA_MODES = ("white", "black", "drop")
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                  ".tif": "TIFF", ".tiff": "TIFF"}
MAX_SIDES = {"JPEG": ("JPEG", 65500), "WEBP": ("WebP", 16383)}  # libjpeg's and libwebp's own limits


def max_pixels() -> int:
    """Largest pixel count an input image may have (`$VAE_MAX_PIXELS`, default 2**28; `4e8` and `400_000_000` too);
    a UsageError for a value that is no whole number, rather than the default used without a word."""
    value = os.environ.get("VAE_MAX_PIXELS", "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    text = value.replace("_", "")
    try:
        number = int(text) if text.isascii() and text.isdigit() else float(text)
    except ValueError:  # also an integer of more digits than Python converts
        number = math.nan
    if not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise UsageError(f"VAE_MAX_PIXELS={value[:40]}: expected a whole number of pixels, e.g. 400000000 or 4e8")
    return int(number)


@contextmanager
def pixel_limit(source: Path, what: str = "image", error: type[InputError] = InputError) -> Iterator[int]:
    """Within it, Pillow refuses pictures over `max_pixels()` (a likely decompression bomb) as one-line `error`s and
    keeps its other warnings to itself."""
    limit = max_pixels()
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            # Its other warnings are of metadata it skips ("Tag data larger than file"): the pixels still read, and
            # stderr holds vaecli's own lines only (nothing at all with -q).
            warnings.simplefilter("ignore")
            # Pillow only warns between the limit and twice it: an error either way, and nothing on stderr.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield limit
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        size = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's message is all that carries the size
        found = f"has {int(size[1])} pixels, " if size else "is "
        raise error(f"{source}: {what} {found}over the limit of {limit} pixels "
                    f"(set VAE_MAX_PIXELS to allow larger {what}s)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_raw_bytes(ihdr: bytes) -> int:
    """Bytes a PNG's pixel data inflates to (a filter byte and the samples of each row, per Adam7 pass if any)."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    bits = depth * _PNG_SAMPLES.get(colour, 4)
    total = 0
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            total += h * (1 + -(-w * bits // 8))
    return total


def png_data_bytes(path: Path) -> tuple[int, int]:
    """(bytes a PNG's IDAT stream inflates to, counted up to one past the need; bytes its header says it needs)."""
    got, need, z = 0, 0, zlib.decompressobj()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(8)
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if length > size - f.tell() or kind == b"IEND":
                break
            data = f.read(length)
            f.seek(4, os.SEEK_CUR)  # the CRC, unchecked (Pillow skips it for pixel data too): zlib checks its own
            if kind == b"IHDR" and length >= 13:
                need = _png_raw_bytes(data)
            while kind == b"IDAT" and data and got <= need:  # inflated in bounded steps: a bomb stops at need + 1
                got += len(z.decompress(data, min(need + 1 - got, 1 << 24)))
                data = z.unconsumed_tail
    return got, need


_ARITHMETIC_SOF = (b"\xff\xc9", b"\xff\xca", b"\xff\xcb", b"\xff\xcd", b"\xff\xce", b"\xff\xcf")


def check_complete(img: Image.Image, path: Path) -> None:
    """Refuse, before decoding, a PNG or JPEG whose file is too short for its header's size (Pillow would fill the
    rest with zeros or grey: a cut file, or a few bytes declaring a huge picture)."""
    if img.format == "PNG":
        got, need = png_data_bytes(path)
        if got < need:
            raise InputError(f"{path}: truncated PNG: its pixel data holds {got} bytes, its size needs {need}")
    elif img.format == "JPEG":
        # Huffman coding spends at least one bit per 8x8 block of luma (its DC difference) in every scan kind;
        # arithmetic coding (rare) can spend less, so it is not judged.
        w, h = img.size
        need, size = -(-w // 8) * -(-h // 8) // 8, os.path.getsize(path)
        if size < need and not any(m in Path(path).read_bytes() for m in _ARITHMETIC_SOF):
            raise InputError(f"{path}: truncated JPEG: a {w}x{h} picture needs at least {need} bytes, "
                             f"the file has {size}")


def check_still(img: Image.Image, path: Path) -> None:
    """Refuse an animation (GIF, APNG, WebP, AVIF): one frame of it would be encoded and the rest dropped unsaid."""
    # Multi-page TIFF and MPO (a phone's JPEG with its preview) are animated to Pillow too, but their first page is
    # the picture.
    if img.format in ("GIF", "PNG", "WEBP", "AVIF") and getattr(img, "is_animated", False):
        from vaecli.video import VIDEO_EXTS

        hint = " (use 'vae video' for its frames)" if path.suffix.lower() in VIDEO_EXTS else ""
        raise InputError(f"{path}: expected a still image, got an animated {img.format} of {img.n_frames} "
                         f"frames{hint}")


@dataclass(frozen=True)
class ImageInfo:
    """What was read: source size (W, H), Pillow mode and whether an alpha channel was flattened."""

    size: tuple[int, int]
    mode: str
    had_alpha: bool


def _to_rgb(img: Image.Image, alpha: str, source: Path) -> tuple[np.ndarray, bool]:
    """(H, W, 3) pixels: float32 in [0, 1], or uint8 for 8-bit images without alpha (converted later, once)."""
    mode = img.mode
    key = img.info.get("transparency")  # a PNG's tRNS: a palette's alphas, or the one colour that is transparent
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        raw = np.asarray(img)
        arr = np.clip(raw.astype(np.float64) / 65535.0, 0, 1).astype(np.float32)
        rgb = np.repeat(arr[..., None], 3, axis=2)
        if isinstance(key, int):  # composited here: Pillow's RGBA would cut the other pixels to 8 bits
            return _flatten(rgb, (raw != key)[..., None].astype(np.float32), alpha), True
        return rgb, False
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        bad = arr.size - int(np.isfinite(arr).sum())
        if bad:  # checked before clipping, which passes NaN through and turns Inf into 0 or 1
            raise InputError(f"{source}: expected finite pixel values, found {bad} NaN/Inf")
        return np.repeat(np.clip(arr, 0, 1)[..., None], 3, axis=2), False
    if mode == "La":  # premultiplied, made in memory only: Pillow converts it to LA alone, not to RGBA
        img = img.convert("LA")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "1", "L", "RGB") and key is not None)
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return np.ascontiguousarray(_flatten(rgba[..., :3], rgba[..., 3:], alpha)), True
    return np.array(img.convert("RGB")), False


def _flatten(rgb: np.ndarray, a: np.ndarray, alpha: str) -> np.ndarray:
    """(H, W, 3) colours composited by (H, W, 1) alpha `a` on white or black, or left as they are ("drop")."""
    if alpha == "white":
        return rgb * a + (1.0 - a)
    if alpha == "black":
        return rgb * a
    return rgb


def read_image(path: Path, alpha: str = "white") -> tuple[torch.Tensor, ImageInfo]:
    """Read an image file as (1, 3, H, W) float32 in [0, 1], EXIF orientation applied, alpha flattened."""
    path = Path(path)
    check_input(path, "an image file")
    try:
        # Pillow checks the header's size on open, before decoding any pixel data.
        with pixel_limit(path), Image.open(path) as img:
            check_complete(img, path)
            check_still(img, path)
            img.load()
            pixels, had_alpha = pil_pixels(img, alpha, path)
            mode = img.mode
    except UnidentifiedImageError:
        from vaecli.video import VIDEO_EXTS

        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file, expected an image") from None
        hint = " (a video? use 'vae video')" if path.suffix.lower() in VIDEO_EXTS else ""
        raise InputError(f"{path}: not an image file Pillow can read{hint}") from None
    except (OSError, SyntaxError, ValueError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the file system's refusal (Pillow's own have none)
            raise read_error(path, exc) from None
        raise InputError(f"{path}: truncated or corrupt image ({exc})") from None
    return pixels, ImageInfo(size=(pixels.shape[-1], pixels.shape[-2]), mode=mode, had_alpha=had_alpha)


def pil_pixels(img: Image.Image, alpha: str = "white", source: Path | str = "image") -> tuple[torch.Tensor, bool]:
    """A Pillow image as (1, 3, H, W) float32 in [0, 1] as `read_image` reads files (turned upright by its EXIF
    orientation, 16-bit and float modes scaled, alpha flattened), and whether it had alpha."""
    # An image already upright has no orientation tag left, so this never turns it twice; exif_transpose would copy
    # an upright image whole.
    turned = img.getexif().get(ExifTags.Base.Orientation, 1) != 1
    arr, had_alpha = _to_rgb(ImageOps.exif_transpose(img) if turned else img, alpha, source)
    # uint8 pixels convert once, straight into the float tensor (no float64 or second float copy of a large image).
    pixels = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)
    if pixels.dtype == torch.uint8:
        pixels = pixels.to(torch.float32).div_(255)
    return pixels, had_alpha


def count_non_finite(x: torch.Tensor) -> int:
    """How many NaN or Inf values a float tensor (any shape, device and float dtype) holds."""
    # Counted with numpy: torch's first reductions bring tens of MB of kernels into resident memory, which reading a
    # latent video frame by frame in flat memory would no longer be.
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16: every exponent bit set is NaN or Inf
        return int(np.count_nonzero((x.view(torch.int16).numpy() & 0x7F80) == 0x7F80))
    if x.element_size() == 1:  # float8: numpy has none either
        x = x.float()
    return x.numel() - int(np.count_nonzero(np.isfinite(x.numpy())))


def check_finite(pixels: torch.Tensor, source: str = "") -> torch.Tensor:
    """`pixels` a model gave, or a ComputeError (prefixed with `source`, if any) where some are NaN or Inf."""
    bad = count_non_finite(pixels)
    if bad:  # NaN would become black (or any byte): weights are checked finite when loaded, so an overflow
        where = f"{source}: " if source else ""
        raise ComputeError(f"{where}expected finite pixels, the model gave {bad} NaN/Inf (an overflow: try another "
                           f"--dtype)")
    return pixels


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded to nearest."""
    if pixels.dim() == 4:
        pixels = pixels[0]
    check_finite(pixels)
    return pixels.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def quantize8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels as an 8-bit file will hold them: same shape, float in [0, 1], multiples of 1/255 (NaN stays NaN: see
    `check_finite`)."""
    return pixels.float().clamp(0, 1).mul_(255).round_().div_(255)


def check_output_extension(path: Path) -> str:
    """Pillow format name for an output image path, or a UsageError naming the supported extensions."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None and not Path(path).suffix:
        raise UsageError(f"{path}: expected an image file name ending in one of {', '.join(OUTPUT_FORMATS)}, "
                         f"got no extension")
    if fmt is None:
        raise UsageError(f"cannot write images as '{Path(path).suffix}': expected one of {', '.join(OUTPUT_FORMATS)}")
    return fmt


class _PythonWrites:
    """A file whose descriptor Pillow cannot see, so that its encoders write through Python's `write`."""

    def __init__(self, file):
        self._file = file

    def fileno(self) -> int:
        # Given a descriptor, Pillow's JPEG, TIFF and GIF encoders call write(2) themselves and ignore a short
        # write: a full disk then leaves a cut file that reads as saved. Python's writes raise instead.
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def save_pillow(img: Image.Image, path: Path, **params) -> None:
    """Save a Pillow image to `path` (`format=` in `params`); a failed or short write raises OSError."""
    with open(path, "wb") as file:
        img.save(_PythonWrites(file), **params)


def write_pillow(path: Path, img: Image.Image, **params) -> None:
    """Save a Pillow image atomically (temp file, then rename); write errors become one-line OutputErrors."""
    name, limit = MAX_SIDES.get(params.get("format", ""), ("", 0))
    if limit and max(img.size) > limit:  # the encoders fail with no word of why (and libjpeg prints to stderr)
        raise OutputError(f"{path}: cannot write: expected at most {limit} pixels a side for {name}, got "
                          f"{img.size[0]}x{img.size[1]} (write .png or .tif)")
    atomic_write(Path(path), lambda tmp: save_pillow(img, tmp, **params))


def write_image(path: Path, pixels: torch.Tensor) -> None:
    """Write (1, 3, H, W) float in [0, 1] atomically, format from the extension (JPEG/WebP at quality 95)."""
    fmt = check_output_extension(path)
    img = Image.fromarray(to_uint8(pixels), "RGB")
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    write_pillow(path, img, format=fmt, **options)


def pad_to_multiple(pixels: torch.Tensor, factor: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad (B, C, H, W) on the right/bottom to multiples of `factor` (reflect; replicate when too small)."""
    h, w = pixels.shape[-2:]
    pad_b, pad_r = (-h) % factor, (-w) % factor
    if pad_b == 0 and pad_r == 0:
        return pixels, (0, 0, 0, 0)
    mode = "reflect" if pad_b < h and pad_r < w else "replicate"
    return F.pad(pixels, (0, pad_r, 0, pad_b), mode=mode), (0, 0, pad_r, pad_b)


def crop(pixels: torch.Tensor, size: tuple[int, int], padding: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo `pad_to_multiple`: crop (B, C, H, W) to `size` (W, H) after the `padding` (left, top, right, bottom)."""
    left, top = padding[0], padding[1]
    return pixels[..., top: top + size[1], left: left + size[0]]
