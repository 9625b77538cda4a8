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

from vaecli.errors import OutputError, WeightsError
from vaecli.registry import REGISTRY, ModelSpec

KL_FAMILIES = ("kl", "svd")  # the autoencoders diffusers scales by a config's scaling_factor and shift_factor
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
    except (OSError, ValueError, RecursionError):
        raise WeightsError(f"cannot read {config}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"cannot read {config}: expected a JSON object, got {type(cfg).__name__}")
    channels = cfg.get("latent_channels")
    if channels is not None and (type(channels) is not int or channels != spec.latent_channels):
        shown = channels if type(channels) is int else repr(str(channels)[:20])  # "32" (text) is not 32
        raise WeightsError(f"expected {spec.latent_channels} latent channels for {spec.name}, got {shown} in {config}")
    if spec.family not in KL_FAMILIES:
        return  # a diffusers AutoencoderTiny records scaling_factor 1.0: its latents are scaled by the network itself
    # The latent space diffusers scales these weights' latents into: another KL model's (an SDXL folder for sd15, SD3's
    # for flux1) would load, and the latents be scaled as this model's denoiser expects, not theirs.
    for name, own in (("scaling_factor", spec.scaling_factor), ("shift_factor", spec.shift_factor)):
        value = cfg.get(name)
        if type(value) in (int, float) and abs(value - own) > 1e-6:
            hint = as_in_kl_models(name, value)
            raise WeightsError(f"expected {name} {own:g} for {spec.name}, got {value:g} in {config} (the weights of a "
                               f"model with another latent space{hint})")


def as_in_kl_models(field: str, value: float) -> str:
    """`, as in sd3, flux1`: the KL-family models whose spec `field` is `value`, for a message naming whose weights
    these are; empty when there are none."""
    fits = [name for name, s in REGISTRY.items() if s.family in KL_FAMILIES and abs(getattr(s, field) - value) <= 1e-6]
    return f", as in {', '.join(fits)}" if fits else ""


def model_state_dict(spec: ModelSpec, sd: dict, source: str) -> dict:
    """A checkpoint's tensors in any layout known for `spec`'s family, renamed to vaecli's module keys."""
    from vaecli.families import family

    return family(spec).state_dict(spec, sd, source)


def read_weights(spec: ModelSpec, path: Path) -> dict:
    """Tensors from a user-named weights file or folder, in vaecli's module keys for `spec`."""
    from vaecli.weights import load_state_dict

    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"weights path not found: {path}")
    out: dict = {}
    for f in _folder_files(spec, path) if path.is_dir() else [path]:
        out.update(model_state_dict(spec, load_state_dict(f), str(f)))
    return out


def check_outputs_spare_weights(spec: ModelSpec, sources: tuple[str, ...], outputs: list[Path],
                                option: str = "-o") -> None:
    """Weights are an input too: `-o w.safetensors` beside `-w w.safetensors` would replace them with latents (and
    the atomic write would not notice, the file being read already)."""
    read = {f.resolve(): f for s in map(Path, sources) for f in (_folder_files(spec, s) if s.is_dir() else [s])}
    names = {f.name for f in read}  # only an output of a weights file's name is resolved: a folder run has many
    for out in outputs:
        if out.name in names and out.resolve() in read:
            raise OutputError(f"refusing to overwrite input {read[out.resolve()]} (the {spec.name} weights; choose "
                              f"another {option})")


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
    _check_values(own, sd, what)
    module.load_state_dict(sd, strict=True)


def _check_values(own: dict, sd: dict, what: str) -> None:
    """Refuse weights that would load but compute garbage: integer, complex, sparse or meta tensors where the model
    holds floats (load_state_dict casts them silently), or NaN/Inf values."""
    import torch

    from vaecli.media import count_non_finite

    for key, param in own.items():
        if not param.is_floating_point():
            continue
        value = sd[key]
        if not value.is_floating_point() or value.layout != torch.strided or value.is_meta:
            kind = f"{value.dtype}".removeprefix("torch.") if value.layout == torch.strided else f"{value.layout}"
            raise WeightsError(f"{what}: expected floating-point tensors, got {'meta' if value.is_meta else kind} "
                               f"for {key}")
        bad = count_non_finite(value)
        if bad:
            raise WeightsError(f"{what}: expected finite weights, found {bad} NaN/Inf in {key}")


# --- KL family ------------------------------------------------------------------------------------------

_KL_PREFIXES = ("first_stage_model.", "vae.")  # full SD checkpoints; some single-file exports


def _diffusers_kl_key(key: str, n_levels: int) -> str:
    """One diffusers AutoencoderKL key in LDM/BFL names (`decoder.up_blocks.0` is the deepest level, `up.3`)."""
    k = key
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", k)
    if m:
        level = n_levels - 1 - int(m.group(1))
        k = (f"decoder.up.{level}.block.{m.group(3)}.{m.group(4)}" if m.group(2) == "resnets"
             else f"decoder.up.{level}.upsample.{m.group(4)}")
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
               lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", k)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # current and pre-0.14 names
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
    if m and m.group(2) in attn:
        k = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
    k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
    return k


def kl_state_dict(sd: dict, n_levels: int, source: str) -> dict:
    """A KL autoencoder state dict in any known layout (diffusers, LDM, BFL, full checkpoint) in LDM/BFL keys."""
    for prefix in _KL_PREFIXES:
        if any(k.startswith(prefix + "encoder.") or k.startswith(prefix + "decoder.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    if not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        sample = ", ".join(list(sd)[:2])
        raise WeightsError(f"{source} is not an autoencoder checkpoint: no encoder./decoder. keys "
                           f"(found {sample or 'no tensors'})")
    if not any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd):
        return dict(sd)
    out = {}
    for key, value in sd.items():
        new = _diffusers_kl_key(key, n_levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # diffusers stores the attention projections as Linear
        out[new] = value
    return out
