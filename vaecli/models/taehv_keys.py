"""TAEHV checkpoints: the published variants' configs, and the config a checkpoint's shapes imply.

Kept apart from the network (`vaecli.models.taehv`) so that reading a file's layout needs no model code.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch

from vaecli.registry import TAEHVConfig

VARIANTS: dict[str, TAEHVConfig] = {
    "taehv": TAEHVConfig(),  # Hunyuan Video
    "taew2_1": TAEHVConfig(),  # Wan 2.1 (and Wan 2.2 A14B)
    "taew2_2": TAEHVConfig(latent_channels=48, patch_size=2),  # Wan 2.2 TI2V-5B
    "taecvx": TAEHVConfig(cogvideox_trim=True),  # CogVideoX
    "taehv1_5": TAEHVConfig(latent_channels=32, patch_size=2),  # Hunyuan Video 1.5
    "taeltx": TAEHVConfig(latent_channels=128, patch_size=4, encoder_time_downscale=(True,) * 3,
                          decoder_time_upscale=(True,) * 3),  # LTX-Video 2 and 2.3
}


def variant_config(name: str) -> TAEHVConfig:
    """The config for a checkpoint or variant name such as `taew2_2`, `taew2_1_super.pth` (longest known name)."""
    if "taeh3" in name:
        # taeh3 encodes 17-frame chunks each behind three zero frames and drops tokens: not a plain causal stream.
        raise ValueError("taeh3 (MiniMax-H3) chunked coding is not supported")
    known = [k for k in VARIANTS if k in name]
    if not known:
        raise ValueError(f"unknown TAEHV variant {name!r} (known: {', '.join(VARIANTS)})")
    cfg = VARIANTS[max(known, key=len)]
    return replace(cfg, arch="super", decoder_widths=None) if "_super" in name else cfg


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors from `.safetensors` or (weights only, on the CPU) a torch `.pth`."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _temporal(sd: dict[str, torch.Tensor], half: str) -> dict[int, torch.Tensor]:
    """{layer index: weight} of the TPool / TGrow layers in `half`, in layer order."""
    # They are the only layers whose conv sits directly at `<half>.<i>.conv.weight`.
    found = {int(m[1]): v for k, v in sd.items() if (m := re.fullmatch(rf"{half}\.(\d+)\.conv\.weight", k))}
    return dict(sorted(found.items()))


def config_from_state_dict(sd: dict[str, torch.Tensor], name: str = "") -> TAEHVConfig:
    """The config a checkpoint's shapes imply; the file `name` only decides taecvx's trim (its shapes are taehv's)."""
    if "taeh3" in name:
        variant_config(name)  # raises: unsupported
    pools, grows = list(_temporal(sd, "encoder").values()), _temporal(sd, "decoder")
    if len(pools) != 3 or len(grows) != 3 or "encoder.0.weight" not in sd:
        raise ValueError("not a TAEHV checkpoint (expected encoder.* and decoder.* with 3 TPool and 3 TGrow layers)")
    stem = sd["encoder.0.weight"]
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("encoder."))
    super_arch = "decoder.0.weight" in sd  # base decoders start with a parameter-free Clamp
    # Stage widths are the TGrow widths plus the first conv's (super) or the conv after the last TGrow's (base).
    grow_widths = [g.shape[1] for g in grows.values()]
    if super_arch:
        widths = (sd["decoder.0.weight"].shape[0], *grow_widths)
    else:
        widths = (*grow_widths, sd[f"decoder.{max(grows) + 1}.weight"].shape[0])
    return TAEHVConfig(
        latent_channels=sd[f"encoder.{last}.weight"].shape[0], patch_size=math.isqrt(stem.shape[1] // 3),
        encoder_time_downscale=tuple(p.shape[1] > p.shape[0] for p in pools),
        decoder_time_upscale=tuple(g.shape[0] > g.shape[1] for g in grows.values()),
        arch="super" if super_arch else "base", encoder_width=stem.shape[0], decoder_widths=widths,
        cogvideox_trim="taecvx" in name)
