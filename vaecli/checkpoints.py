"""Checkpoint layouts: detect which one a file uses and convert it to the reference key names.

Tiny family layouts understood:
- original `taesd.py` files: one file per half, keys `0.weight`, `1.conv.0.weight`, ...;
- diffusers `AutoencoderTiny`: `encoder.layers.N.*` and `decoder.layers.N.*` in one file (the
  diffusers decoder has no leading Clamp layer, so its indices are one less than the original's);
- vaecli's own module layout: `encoder.N.*` / `decoder.N.*`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vaecli.errors import WeightsError
from vaecli.registry import ModelSpec

DIFFUSERS_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
_DIFFUSERS_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")
_OWN_KEY = re.compile(r"^(encoder|decoder)\.(\d+)\.(.+)$")


def split_tiny_state_dict(sd: dict, source: str) -> dict[str, dict]:
    """Split a tiny-family state dict in any known layout into {"encoder": sd, "decoder": sd} in original keys."""
    out: dict[str, dict] = {}
    if all(k[:1].isdigit() for k in sd):
        # A bare original file holds one half: the encoder's first layer is a conv on RGB, the
        # decoder's first layer (index 0) is the parameter-free Clamp.
        role = "encoder" if "0.weight" in sd else "decoder"
        return {role: dict(sd)}
    for key, value in sd.items():
        m = _DIFFUSERS_KEY.match(key)
        if m:
            role, idx, rest = m.groups()
            idx = int(idx) + (1 if role == "decoder" else 0)
        else:
            m = _OWN_KEY.match(key)
            if not m:
                raise WeightsError(
                    f"{source} is not a tiny-autoencoder checkpoint: unexpected key '{key}' "
                    f"(expected taesd.py keys like '0.weight' or diffusers keys like 'encoder.layers.0.weight')"
                )
            role, idx, rest = m.groups()
        out.setdefault(role, {})[f"{idx}.{rest}"] = value
    return out


def _folder_files(spec: ModelSpec, folder: Path) -> list[Path]:
    named = [folder / w.name for w in spec.weights if (folder / w.name).is_file()]
    if named:
        return named
    for sub in (folder, folder / "vae"):
        for name in DIFFUSERS_FILES:
            if (sub / name).is_file():
                _check_diffusers_config(spec, sub / "config.json")
                return [sub / name]
    expected = ", ".join([w.name for w in spec.weights] + [DIFFUSERS_FILES[0]])
    raise WeightsError(f"no weights for {spec.name} in folder {folder}: expected one of {expected}")


def _check_diffusers_config(spec: ModelSpec, config: Path) -> None:
    if not config.is_file():
        return
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        raise WeightsError(f"cannot read {config}: not valid JSON") from None
    channels = cfg.get("latent_channels")
    if channels is not None and channels != spec.latent_channels:
        raise WeightsError(
            f"expected {spec.latent_channels} latent channels for {spec.name}, got {channels} in {config}"
        )


def tiny_state_dicts(spec: ModelSpec, paths: list[Path]) -> dict[str, tuple[dict, Path]]:
    """Encoder/decoder state dicts (original keys) found in user-named files or folders, with their source."""
    from vaecli.weights import load_state_dict

    found: dict[str, tuple[dict, Path]] = {}
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise WeightsError(f"weights path not found: {p}")
        for f in _folder_files(spec, p) if p.is_dir() else [p]:
            for role, sd in split_tiny_state_dict(load_state_dict(f), str(f)).items():
                found[role] = (sd, f)
    return found


def load_strict(module, sd: dict, what: str) -> None:
    """Strict `load_state_dict` whose failure is one readable line of missing/unexpected/mismatched keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        groups = (("missing", missing), ("unexpected", unexpected), ("mismatched (file vs model)", mismatched))
        for label, keys in groups:
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
        raise WeightsError(f"{what} does not fit: {'; '.join(parts)}")
    module.load_state_dict(sd, strict=True)
