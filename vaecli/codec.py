"""The codec pipeline: a registry model with its weights loaded, turning pixels into latents and back.

Knows nothing of the CLI; every user-facing failure is a `VaeError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vaecli import media
from vaecli.checkpoints import load_strict, tiny_state_dicts
from vaecli.errors import LatentFormatError, UsageError, WeightsError
from vaecli.latents import make_metadata
from vaecli.models.tiny import TinyAutoencoder
from vaecli.registry import REGISTRY, ModelSpec
from vaecli.weights import find_on_search_path, load_state_dict

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or a UsageError listing the known names."""
    if name not in REGISTRY:
        raise UsageError(f"unknown model '{name}': expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda, then mps, then cpu; an explicit device that is not available is a UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device '{name}': expected auto, cpu, cuda or mps")
    return torch.device(name)


@dataclass
class Codec:
    """A loaded model on a device, ready to encode (B, 3, H, W) pixels in [0, 1] and decode latents."""

    spec: ModelSpec
    model: TinyAutoencoder
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        """The compute dtype's short name (fp32/fp16/bf16)."""
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    def encode_image(self, pixels: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """(1, 3, H, W) in [0, 1] -> a (C, h, w) latent and its metadata (padding recorded for the decode)."""
        if self.model.encoder is None:
            raise UsageError(f"{self.spec.name} has no encoder loaded")
        padded, padding = media.pad_to_multiple(pixels, self.spec.spatial_factor)
        with torch.inference_mode():
            latent = self.model.encode(padded.to(self.device, self.dtype))
        return latent[0], make_metadata(self.spec, size, padding, self.dtype_name)

    def decode_latent(self, latent: torch.Tensor, meta: dict) -> torch.Tensor:
        """A (C, h, w) latent with its metadata -> (1, 3, H, W) pixels in [0, 1], cropped to the source size."""
        if self.model.decoder is None:
            raise UsageError(f"{self.spec.name} has no decoder" + (f" ({self.spec.notes})" if self.spec.notes else ""))
        check_latent_fits(self.spec, latent, meta)
        with torch.inference_mode():
            pixels = self.model.decode(latent[None].to(self.device, self.dtype)).float().cpu()
        size = tuple(meta.get("image_size") or (pixels.shape[-1], pixels.shape[-2]))
        padding = tuple(meta.get("padding") or (0, 0, 0, 0))
        return media.crop(pixels, size, padding)


def check_latent_fits(spec: ModelSpec, latent: torch.Tensor, meta: dict) -> None:
    """Raise a LatentFormatError when a (C, h, w) latent cannot be decoded by `spec`."""
    made_by = f" (made by {meta['model']})" if meta.get("model") and meta["model"] != spec.name else ""
    if latent.shape[0] != spec.latent_channels:
        raise LatentFormatError(f"expected {spec.latent_channels} latent channels for {spec.name}, "
                                f"got {latent.shape[0]}{made_by}")


def load_codec(name: str, weights: list[Path] | None = None, roles: tuple[str, ...] = ("encoder", "decoder"),
               device: str = "auto", dtype: str = "fp32", verify: bool = True) -> Codec:
    """Build model `name` and load the halves in `roles`: from `weights` files/folders, else the search path."""
    spec = get_spec(name)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}': expected one of {', '.join(DTYPES)}")
    if "decoder" in roles and not spec.config.has_decoder:
        raise UsageError(f"{spec.name} has no decoder ({spec.notes})")
    dev = resolve_device(device)
    found = tiny_state_dicts(spec, list(weights or []))
    model = TinyAutoencoder(spec.config, encoder="encoder" in roles, decoder="decoder" in roles)
    for role in roles:
        if role in found:
            sd, source = found[role]
        else:
            wf = spec.weight(role)
            if wf is None:
                raise WeightsError(f"{spec.name} has no {role} weights")
            source = find_on_search_path(spec, wf, verify=verify)
            sd = load_state_dict(source)
        load_strict(getattr(model, role), sd, f"{source} as the {spec.name} {role}")
    model = model.to(dev, DTYPES[dtype]).eval()
    return Codec(spec=spec, model=model, device=dev, dtype=DTYPES[dtype])
