"""Latent spaces: what a network produces and consumes ("raw" posterior latents, or a tiny model's "scaled" ones)
converted to and from the space a latent file holds (raw, scaled as the denoiser consumes it, or normalized)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vaecli.errors import LatentFormatError, UsageError
from vaecli.media import count_non_finite
from vaecli.registry import ModelSpec

Normalizer = Callable[[torch.Tensor], torch.Tensor]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """A compute dtype's short name as latent metadata records it (fp32/fp16/bf16)."""
    return next(k for k, v in DTYPES.items() if v == dtype)


def check_encode_space(spec: ModelSpec, space: str | None, sample: bool, posterior: bool) -> str:
    """The latent space to write (default: the model's own); a UsageError if the model can't write it, or can't
    sample (`posterior` False)."""
    space = space or spec.latent_space
    if space not in spec.spaces:
        raise UsageError(f"{spec.name} cannot write '{space}' latents: expected one of {', '.join(spec.spaces)}")
    if sample and not posterior:
        raise UsageError(f"{spec.name} is deterministic: --sample needs a model with a posterior (KL, Wan)")
    return space


def from_network(z: torch.Tensor, spec: ModelSpec, network: str, space: str,
                 normalize: Normalizer | None = None) -> torch.Tensor:
    """(B, C, h, w) latents in the network's own space -> `space`; `normalize` maps raw latents to "normalized"."""
    if space == network:
        return z  # nothing to convert: the network's numbers, bit for bit
    raw = z / spec.scaling_factor + spec.shift_factor if network == "scaled" else z
    if space == "scaled":
        return (raw - spec.shift_factor) * spec.scaling_factor
    if space == "normalized":
        return normalize(raw)
    return raw


def to_network(z: torch.Tensor, spec: ModelSpec, meta: dict, network: str,
               denormalize: Normalizer | None = None) -> torch.Tensor:
    """(B, C, h, w) latents in the space `meta` names -> the network's own space; `denormalize` maps "normalized"
    latents back to raw ones."""
    space = meta.get("space", spec.latent_space)
    scale = float(meta.get("scaling_factor", spec.scaling_factor))
    shift = float(meta.get("shift_factor", 0.0))
    if space == network and (space != "scaled" or (scale, shift) == (spec.scaling_factor, spec.shift_factor)):
        return z
    if space == "scaled":
        raw = z / scale + shift
    elif space == "normalized":
        raw = denormalize(z)
    else:
        raw = z
    out = (raw - spec.shift_factor) * spec.scaling_factor if network == "scaled" else raw
    bad = count_non_finite(out)
    if bad:  # finite values, read and checked, overflowed: the metadata's factors are the cause
        raise LatentFormatError(f"expected finite latents once converted from '{space}' (scaling_factor {scale:g}, "
                                f"shift_factor {shift:g}), got {bad} NaN/Inf")
    return out
