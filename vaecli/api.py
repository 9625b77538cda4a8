"""The Python API: the codecs the `vae` commands run, for scripts that want latents in memory.

    import vaecli
    model = vaecli.load("taef2")                     # weights from the search path, verified
    latent = model.encode("photo.png")                # Latent: .tensor (C, h, w), .meta
    latent.save("photo.latent")                       # the bytes `vae encode` writes; .png: a PNG latent
    pixels = model.decode(vaecli.load_latent("photo.latent"))   # (1, 3, H, W) float in [0, 1]

Errors are `vaecli.errors.VaeError` subclasses with the same one-line messages the commands print.
"""

from __future__ import annotations

import itertools
import json
import operator
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vaecli import latents, media, video
from vaecli.batch import LATENT_FORMATS
from vaecli.errors import InputError, UsageError
from vaecli.registry import DEFAULT_MODEL

SAVERS = {"safetensors": latents.save_safetensors, "png": latents.save_png}
HALVES = ("encoder", "decoder")


@dataclass
class Latent:
    """A latent tensor, (C, h, w) for an image or (T, C, h, w) for a clip, with its vaecli metadata."""

    tensor: torch.Tensor
    meta: dict

    def __post_init__(self):
        if isinstance(self.tensor, torch.Tensor):
            self.tensor = _plain(self.tensor)

    @property
    def model(self) -> str | None:
        """The registry name of the model that made it (None where the metadata does not say)."""
        model = self.meta.get("model")
        return None if model is None else str(model)

    @property
    def space(self) -> str | None:
        """Its latent space: scaled, raw, normalized or native (None where the metadata does not say)."""
        space = self.meta.get("space")
        return None if space is None else str(space)

    def save(self, path: str | Path, format: str | None = None) -> None:
        """Write an image latent to `path` as `safetensors` or an RGBA `png` (default: `png` for a .png name, as
        `vae encode -o` chooses), atomically."""
        _check_path(path, "Latent.save")
        _check_parts(self)
        by_name = LATENT_FORMATS.get(Path(path).suffix.lower())  # as `vae encode -o` reads it
        if format is None:
            format = by_name or "safetensors"
        elif by_name is not None and format != by_name:  # as `vae encode --format` refuses it
            raise UsageError(f"Latent.save: format {format!r} disagrees with the name {Path(path).name} (a "
                             f"{by_name} name)")
        if self.tensor.dim() != 3:
            raise UsageError(f"Latent.save writes image latents (C, h, w), got shape {list(self.tensor.shape)} (a "
                             f"clip's latents are written by 'vae video')")
        _check_latent(self, "(C, h, w)", "an image Latent")  # as decode does: NaN blamed the model and --dtype
        _check_json(self.meta)
        if format not in SAVERS:
            raise UsageError(f"Latent.save: unknown format {format!r}: expected one of {', '.join(SAVERS)}")
        if self.meta.get("format") != latents.FORMAT:  # load_latent would refuse the file
            raise UsageError(f"Latent.save: expected vaecli metadata in .meta (format {latents.FORMAT!r}, as "
                             f"Model.encode and load_latent give), got format {self.meta.get('format')!r:.40}")
        SAVERS[format](Path(path), self.tensor, self.meta)


def load_latent(path: str | Path) -> Latent:
    """Read a latent file written by `vae encode`/`vae video` (safetensors or PNG) as a Latent."""
    _check_path(path, "load_latent")
    tensor, meta = latents.load_latent(Path(path))
    return Latent(tensor, meta)


def load(model: str = DEFAULT_MODEL, weights: str | Path | list | None = None, device: str | torch.device = "auto",
         dtype: str | torch.dtype = "fp32", max_memory: str | int | None = None, verify: bool = True,
         halves: tuple[str, ...] = ("encoder", "decoder")) -> Model:
    """Load registry model `model` (weights from `weights` files/folders, else the search path) on `device`
    (auto, cpu, cuda, mps, or a torch.device) in `dtype` (fp32, fp16, bf16, or a torch dtype), with `max_memory`
    (e.g. "2GB", or bytes) for activations and only the `halves` asked for."""
    from vaecli.codec import load_codec
    from vaecli.registry import REGISTRY
    from vaecli.spaces import DTYPES
    from vaecli.tiling import parse_size

    given = [weights] if isinstance(weights, (str, Path)) else weights or []
    if not isinstance(given, (list, tuple)) or not all(isinstance(w, (str, Path)) for w in given):
        raise UsageError(f"weights: expected a path or a list of paths, got {weights!r:.60}")
    paths = [Path(w) for w in given]
    if isinstance(halves, str) or not halves or not all(h in HALVES for h in halves):
        raise UsageError(f"halves: expected a tuple of {' and/or '.join(HALVES)}, got {halves!r:.60}")
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, (int, str))):
        raise UsageError(f"max_memory: expected a size like '2GB' or a number of bytes, got {max_memory!r:.60}")
    try:  # parse_size's message names the command's --max-memory, and an int as the "-1B" it was turned into
        size = f"{max_memory}B" if isinstance(max_memory, int) else max_memory  # an int is bytes
        budget = 0 if max_memory is None else parse_size(size)
    except UsageError:
        raise UsageError(f"max_memory: expected a size of at least 1 byte like '2GB', or a number of bytes, got "
                         f"{max_memory!r:.60}") from None
    if isinstance(device, torch.device):  # torch.device("cpu") is not the string "cpu"
        device = str(device)
    if isinstance(dtype, torch.dtype):  # nor torch.float16 the string "fp16"
        dtype = next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))
    spec = REGISTRY.get(model)
    if spec is not None and not spec.has_decoder and "encoder" in halves:  # encoder-only models (taesana)
        halves = tuple(h for h in halves if h != "decoder")
    codec = load_codec(model, paths or None, halves, device, dtype, verify, budget=budget)
    return Model(codec)


class Model:
    """A loaded autoencoder (`vaecli.load`): images and clips to latents and back, as the commands do them."""

    def __init__(self, codec):
        self.codec = codec  # a vaecli.codec.Codec or vaecli.causal.CausalCodec: what the commands use

    @property
    def name(self) -> str:
        """The registry name."""
        return self.codec.spec.name

    def encode(self, image, space: str | None = None) -> Latent:
        """An image (path, PIL image, or (3, H, W) / (1, 3, H, W) float tensor in [0, 1]) -> its Latent."""
        pixels = _one(_pixels(image), "one image (encode a batch image by image)")[None]
        tensor, meta = self.codec.encode_image(pixels, (pixels.shape[-1], pixels.shape[-2]), space)
        return Latent(tensor, meta)

    def decode(self, latent: Latent) -> torch.Tensor:
        """An image Latent -> (1, 3, H, W) float pixels in [0, 1], at the source image's size."""
        _check_latent(latent, "(C, h, w)", "an image Latent")
        return self.codec.decode_latent(latent.tensor, latent.meta)

    def encode_video(self, clip, chunk: int | None = None, space: str | None = None) -> Iterator[Latent]:
        """A clip (a video path, or an iterable of (3, H, W) frames in [0, 1]) -> Latents of (k, C, h, w) latent
        frames as they are ready, `chunk` frames at a time; causal models encode the first 1 + f * k frames."""
        _check_chunk(chunk)
        frames = _frames(clip)
        first = next(frames, None)
        if first is None:
            return
        size = (first.shape[-1], first.shape[-2])
        enc = self.codec.clip_encoder(size, space)
        step = chunk or self.codec.frames_per_pass(size)
        batch = []
        for i, frame in enumerate(itertools.chain([first], frames)):
            if frame.shape != first.shape:
                raise InputError(f"frame {i} is {_size(frame)}, frame 0 was {_size(first)}: a clip's frames "
                                 f"share one size")
            batch.append(frame)
            if len(batch) == step:
                out = enc.push(torch.stack(batch))
                batch = []
                if out.shape[0]:
                    yield Latent(out, dict(enc.meta))
        if batch:
            out = enc.push(torch.stack(batch))
            if out.shape[0]:
                yield Latent(out, dict(enc.meta))
        tail, _ = enc.flush()
        if tail.dim() == 4 and tail.shape[0]:
            yield Latent(tail, dict(enc.meta))

    def decode_video(self, latent: Latent, chunk: int | None = None) -> Iterator[torch.Tensor]:
        """A clip's Latent ((T, C, h, w) latent frames) -> its frames as (k, 3, H, W) float tensors in [0, 1]."""
        _check_chunk(chunk)
        _check_latent(latent, "(T, C, h, w)", "a clip's Latent")
        z = latent.tensor
        for frames in self.codec.decode_stream(lambda i, j: z[i:j], z.shape[0], latent.meta, chunk):
            yield _plain(frames)


def to_image(pixels: torch.Tensor):
    """(1, 3, H, W) or (3, H, W) float pixels in [0, 1] -> a PIL RGB image."""
    from PIL import Image

    if not isinstance(pixels, torch.Tensor) or pixels.dim() not in (3, 4) or pixels.shape[-3] != 3 or (
            pixels.dim() == 4 and pixels.shape[0] != 1) or min(pixels.shape[-2:]) < 1:
        raise UsageError(f"to_image: expected (1, 3, H, W) or (3, H, W) pixels, got {_described(pixels)}")
    _check_dense(pixels, "to_image: expected pixels")
    if not pixels.is_floating_point():  # 8-bit values would all clamp to 1: a white image
        raise UsageError(f"to_image: expected float pixels in [0, 1], got {_not_float(pixels)}")
    if bad := media.count_non_finite(pixels):
        raise UsageError(f"to_image: expected finite pixels, found {bad} NaN/Inf")
    return Image.fromarray(media.to_uint8(pixels), "RGB")


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied if made under torch.inference_mode: in-place edits and autograd refuse inference tensors."""
    return tensor.clone() if tensor.is_inference() else tensor


def _described(x) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _not_float(x: torch.Tensor) -> str:
    """`x`'s dtype, with the fix for integer pixels (bool and complex have none to give)."""
    name = str(x.dtype).removeprefix("torch.")
    integer = not x.is_complex() and x.dtype != torch.bool
    return f"{name} (divide 8-bit values by 255)" if integer else name


def _value(x: float) -> str:
    """`x` short (as :g gives it), or in full where short would round a value outside [0, 1] onto 0 or 1."""
    short = f"{x:g}"
    return repr(x) if not 0 <= x <= 1 and 0 <= float(short) <= 1 else short


def _size(frame: torch.Tensor) -> str:
    return f"{frame.shape[-1]}x{frame.shape[-2]}"


def _pixels(image) -> torch.Tensor:
    """An image as (B, 3, H, W) float in [0, 1], checked: a wrong layout or range would encode to wrong latents."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        return media.read_image(Path(image))[0]
    if isinstance(image, Image.Image):  # as a file of it is read: upright, alpha over white, 16-bit scaled
        if min(image.size) < 1:  # a convolution raised RuntimeError on it
            raise UsageError(f"expected a PIL image of at least 1x1 pixels, got {image.width}x{image.height}")
        try:  # an image from Image.open reads its pixels here, from its file
            image.load()
        except OSError as err:  # truncated or corrupt pixel data
            raise InputError(f"PIL image: cannot read its pixels: {err}") from None
        except (AssertionError, ValueError):  # how Pillow fails on a closed image: no file left, no pixels kept
            raise UsageError("expected an open PIL image, got one closed before its pixels were read (encode it "
                             "inside its 'with Image.open(...)' block, or .load() it first)") from None
        return media.pil_pixels(image, "white", "PIL image")[0]
    if not isinstance(image, torch.Tensor):
        raise UsageError(f"expected an image path, a PIL image or a (3, H, W) float tensor in [0, 1], "
                         f"got {type(image).__name__}")
    if image.dim() not in (3, 4) or image.shape[-3] != 3 or min(image.shape[-2:]) < 1:
        raise UsageError(f"expected pixels of shape (3, H, W) or (B, 3, H, W), got shape {list(image.shape)}")
    _check_dense(image, "expected pixels")
    image = image.detach()  # no gradient flows through an encode; float() of a tensor needing one warned
    if not image.is_floating_point():
        raise UsageError(f"expected float pixels in [0, 1], got {_not_float(image)}")
    bad = media.count_non_finite(image)
    if bad:
        raise UsageError(f"expected finite pixels in [0, 1], found {bad} NaN/Inf")
    low, high = float(image.min()), float(image.max())
    if not 0 <= low <= high <= 1:
        raise UsageError(f"expected pixels in [0, 1], got values from {_value(low)} to {_value(high)} (a resize can "
                         f"overshoot: .clamp(0, 1) them)")
    return (image[None] if image.dim() == 3 else image).float()


def _frames(clip) -> Iterator[torch.Tensor]:
    if isinstance(clip, (str, Path)):
        _, stream = video.read_frames(Path(clip))
        return (pixels for _, pixels in stream)
    if isinstance(clip, torch.Tensor) and clip.dim() != 4:  # iterating a (3, H, W) frame would give its channels
        raise UsageError(f"expected a clip: a video path, an iterable of (3, H, W) frames or a (T, 3, H, W) tensor, "
                         f"got shape {list(clip.shape)}")
    frames = iter(clip) if isinstance(clip, Iterable) else iter([clip])
    return (_one(_pixels(frame), "a clip's frames, one at a time") for frame in frames)


def _one(pixels: torch.Tensor, what: str) -> torch.Tensor:
    """(1, 3, H, W) -> (3, H, W); a batch is refused (only its first image would be used)."""
    if pixels.shape[0] != 1:
        raise UsageError(f"expected {what}, got a batch of {pixels.shape[0]}")
    return pixels[0]


def _check_chunk(chunk) -> None:
    if chunk is None:
        return
    try:
        n = None if isinstance(chunk, bool) else operator.index(chunk)  # numpy integers too
    except TypeError:
        n = None
    if n is None or n < 1:
        raise UsageError(f"chunk: expected a number of frames of at least 1, or None, got {chunk!r:.40}")


def _check_path(path, what: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"{what}: expected a file path, got {type(path).__name__}")


def _check_dense(x: torch.Tensor, expected: str) -> None:
    """A UsageError where `x` has no values to read (a meta tensor) or is not strided (sparse): torch raised
    NotImplementedError or RuntimeError for them from deep inside."""
    if x.is_meta:
        raise UsageError(f"{expected} with values, got a meta tensor (a shape without data)")
    if x.layout != torch.strided:
        raise UsageError(f"{expected} as a dense tensor, got layout {str(x.layout).removeprefix('torch.')} "
                         f"(.to_dense() it)")


def _check_parts(latent: Latent) -> None:
    """A UsageError unless .tensor is a tensor and .meta a dict; a LatentFormatError where .meta's fields are not what
    a latent file's may be (as reading a file checks them)."""
    if not isinstance(latent.tensor, torch.Tensor):
        raise UsageError(f"expected Latent.tensor to be a torch.Tensor, got {type(latent.tensor).__name__}")
    _check_dense(latent.tensor, "expected Latent.tensor")
    if not isinstance(latent.meta, dict):
        raise UsageError(f"expected Latent.meta to be a dict of vaecli metadata, got {type(latent.meta).__name__}")
    latents.check_fields(latent.meta, "Latent.meta")


def _check_json(meta: dict) -> None:
    """A UsageError unless .meta can be written as a file's metadata: JSON values under string keys (json raised
    TypeError for a numpy number, and sorting raised it for a non-string key)."""
    for key, value in meta.items():
        if not isinstance(key, str):
            raise UsageError(f"Latent.meta: expected string keys, got {key!r:.40}")
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise UsageError(f"Latent.meta: expected JSON values (str, int, float, bool, None, lists, dicts), got "
                             f"{type(value).__name__} under {key!r:.40} (.item() a numpy number)") from None


def _check_latent(latent, layout: str, what: str) -> None:
    """A UsageError unless `latent` is a Latent of `layout` (a CLI latent file is checked as it is read; this one was
    made in memory, so its values are checked here)."""
    if not isinstance(latent, Latent):
        raise UsageError(f"expected {what} (vaecli.load_latent, Model.encode), got {_described(latent)}")
    _check_parts(latent)
    if latent.tensor.dim() != layout.count(",") + 1:
        raise UsageError(f"expected {what} of shape {layout}, got shape {list(latent.tensor.shape)}")
    if not latent.tensor.is_floating_point():  # a complex one lost its imaginary part, integers decoded to garbage
        raise UsageError(f"expected {what} of floating-point values, got {str(latent.tensor.dtype)[6:]}")
    if min(latent.tensor.shape) < 1:  # as a latent file's: an empty axis gave a wrong message or a RuntimeError
        raise UsageError(f"expected every latent dimension to be at least 1, got shape {list(latent.tensor.shape)}")
    bad = media.count_non_finite(latent.tensor)
    if bad:
        raise InputError(f"expected finite latent values, found {bad} NaN/Inf")
