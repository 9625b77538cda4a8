"""The Python API: the codecs the `vae` commands run, for scripts that want latents in memory.

    import vaecli
    model = vaecli.load("taef2")                     # weights from the search path, verified
    latent = model.encode("photo.png")                # Latent: .tensor (C, h, w), .meta
    latent.save("photo.latent")                       # or format="png"
    pixels = model.decode(vaecli.load_latent("photo.latent"))   # (1, 3, H, W) float in [0, 1]

Errors are `vaecli.errors.VaeError` subclasses with the same one-line messages the commands print.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vaecli import latents, media, video
from vaecli.registry import DEFAULT_MODEL


@dataclass
class Latent:
    """A latent tensor, (C, h, w) for an image or (T, C, h, w) for a clip, with its vaecli metadata."""

    tensor: torch.Tensor
    meta: dict

    @property
    def model(self) -> str:
        """The registry name of the model that made it."""
        return str(self.meta.get("model"))

    @property
    def space(self) -> str:
        """Its latent space: scaled, raw, normalized or native."""
        return str(self.meta.get("space"))

    def save(self, path: str | Path, format: str = "safetensors") -> None:
        """Write an image latent to `path` as `.safetensors` (default) or an RGBA `png`, atomically."""
        if self.tensor.dim() != 3:
            raise ValueError(f"Latent.save writes image latents (C, h, w); got shape {list(self.tensor.shape)}")
        saver = {"safetensors": latents.save_safetensors, "png": latents.save_png}[format]
        saver(Path(path), self.tensor, self.meta)


def load_latent(path: str | Path) -> Latent:
    """Read a latent file written by `vae encode`/`vae video` (safetensors or PNG) as a Latent."""
    tensor, meta = latents.load_latent(Path(path))
    return Latent(tensor, meta)


def load(model: str = DEFAULT_MODEL, weights: str | Path | list | None = None, device: str = "auto",
         dtype: str = "fp32", max_memory: str | None = None, verify: bool = True,
         halves: tuple[str, ...] = ("encoder", "decoder")) -> Model:
    """Load registry model `model` (weights from `weights` files/folders, else the search path) on `device`
    (auto, cpu, cuda, mps) in `dtype` (fp32, fp16, bf16), with `max_memory` (e.g. "2GB") for activations."""
    from vaecli.codec import load_codec
    from vaecli.registry import REGISTRY
    from vaecli.tiling import parse_size

    paths = [Path(w) for w in ([weights] if isinstance(weights, (str, Path)) else weights or [])]
    spec = REGISTRY.get(model)
    if spec is not None and not spec.has_decoder:  # encoder-only models (taesana)
        halves = tuple(h for h in halves if h != "decoder")
    codec = load_codec(model, paths or None, halves, device, dtype, verify,
                       budget=parse_size(max_memory) if max_memory is not None else 0)
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
        pixels = _pixels(image)
        tensor, meta = self.codec.encode_image(pixels, (pixels.shape[-1], pixels.shape[-2]), space)
        return Latent(tensor, meta)

    def decode(self, latent: Latent) -> torch.Tensor:
        """An image Latent -> (1, 3, H, W) float pixels in [0, 1], at the source image's size."""
        return self.codec.decode_latent(latent.tensor, latent.meta)

    def encode_video(self, clip, chunk: int | None = None, space: str | None = None) -> Iterator[Latent]:
        """A clip (a video path, or an iterable of (3, H, W) frames in [0, 1]) -> Latents of (k, C, h, w) latent
        frames as they are ready, `chunk` frames at a time; causal models encode the first 1 + f * k frames."""
        frames = _frames(clip)
        first = next(frames, None)
        if first is None:
            return
        size = (first.shape[-1], first.shape[-2])
        enc = self.codec.clip_encoder(size, space)
        step = chunk or self.codec.frames_per_pass(size)
        batch = [first]
        for frame in frames:
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
        z = latent.tensor
        yield from self.codec.decode_stream(lambda i, j: z[i:j], z.shape[0], latent.meta, chunk)


def to_image(pixels: torch.Tensor):
    """(1, 3, H, W) or (3, H, W) float pixels in [0, 1] -> a PIL RGB image."""
    from PIL import Image

    return Image.fromarray(media.to_uint8(pixels), "RGB")


def _pixels(image) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        return media.read_image(Path(image))[0]
    if isinstance(image, torch.Tensor):
        return (image[None] if image.dim() == 3 else image).float()
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _frames(clip) -> Iterator[torch.Tensor]:
    if isinstance(clip, (str, Path)):
        _, stream = video.read_frames(Path(clip))
        return (pixels for _, pixels in stream)
    return iter(clip) if isinstance(clip, Iterable) else iter([clip])
