"""Wan VAE checkpoint keys: the original Wan 2.1/2.2 layout (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`) renamed to
diffusers' (`AutoencoderKLWan`), which `vaecli.models.wan` keeps."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vaecli.registry import WanConfig

_RESNET = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
           "shortcut.": "conv_shortcut."}
_FIXED = [(r"conv1\.", "quant_conv."), (r"conv2\.", "post_quant_conv."),
          (r"(en|de)coder\.conv1\.", r"\1coder.conv_in."),
          (r"(en|de)coder\.head\.0\.", r"\1coder.norm_out."), (r"(en|de)coder\.head\.2\.", r"\1coder.conv_out.")]
_MIDDLE = {"0": "resnets.0.", "1": "attentions.0.", "2": "resnets.1."}


def _resnet(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _rename(key: str, n: int) -> str:
    for pattern, repl in _FIXED:
        if re.match(pattern, key):
            return re.sub("^" + pattern, repl, key)
    if m := re.match(r"(en|de)coder\.middle\.(\d)\.(.*)", key):
        return f"{m[1]}coder.mid_block.{_MIDDLE[m[2]]}{_resnet(m[3])}"
    if m := re.match(r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.*)", key):  # Wan 2.2: nested levels
        i, j = int(m[1]), int(m[2])
        return f"encoder.down_blocks.{i}." + (f"resnets.{j}.{_resnet(m[3])}" if j < n else f"downsampler.{m[3]}")
    if m := re.match(r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.*)", key):
        i, j = int(m[1]), int(m[2])
        return f"decoder.up_blocks.{i}." + (f"resnets.{j}.{_resnet(m[3])}" if j <= n else f"upsampler.{m[3]}")
    if m := re.match(r"encoder\.downsamples\.(\d+)\.(.*)", key):  # Wan 2.1: one flat list, same order as diffusers
        return f"encoder.down_blocks.{m[1]}.{_resnet(m[2])}"
    if m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key):  # Wan 2.1: n + 1 blocks then an upsampler per level
        level, j = divmod(int(m[1]), n + 2)
        return f"decoder.up_blocks.{level}." + (f"resnets.{j}.{_resnet(m[2])}" if j <= n else f"upsamplers.0.{m[2]}")
    raise ValueError(f"unexpected key in a Wan VAE checkpoint: {key}")


def original_to_diffusers(sd: dict[str, torch.Tensor], cfg: WanConfig) -> dict[str, torch.Tensor]:
    """Rename an original Wan 2.1/2.2 VAE state dict (`encoder.downsamples.0.residual.0.gamma`, `conv1`, ...) to
    diffusers' names; a state dict already in diffusers' names is returned as it is."""
    if not any(re.match(r"conv[12]\.|(en|de)coder\.(conv1|middle|head|downsamples|upsamples)\.", k) for k in sd):
        return dict(sd)
    return {_rename(k, cfg.num_res_blocks): v for k, v in sd.items()}


def load_state_dict(path: str | Path, cfg: WanConfig) -> dict[str, torch.Tensor]:
    """Read a Wan VAE checkpoint (`.pth`/`.pt`/`.ckpt` or `.safetensors`, original or diffusers layout) in diffusers'
    names, ready for a strict `WanVAE(cfg).load_state_dict`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model_state"):
            if isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
    return original_to_diffusers(sd, cfg)
