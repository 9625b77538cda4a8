"""Where each model family lives: a registry entry names its family, whose module's `Family` builds and runs it.

Every `Family` offers the same small interface:
- `posterior`: whether its encoder gives a distribution to draw from (`--sample`), not the latents themselves;
- `build(spec, encoder, decoder)`: the network for a registry entry, with the requested halves;
- `state_dict(spec, sd, source)`: a checkpoint's tensors in any layout known for the family, in the network's keys;
- `load(spec, sd, sources, roles, device, dtype, tile, budget, scratch)`: the loaded network as the codec the commands
  use (`vaecli.codec.Codec` for the image families, which subclass it; `vaecli.causal.CausalCodec` for the causal
  video families, which describe their streams and frame rule to it).

Adding a model is a registry entry; adding a family is a module here and its `Family`.
"""

from __future__ import annotations

import importlib

from vaecli.registry import ModelSpec

FAMILIES = {
    "tiny": "vaecli.models.tiny",  # TAESD and its twins: images, tiled by their receptive field
    "kl": "vaecli.models.kl_family",  # SD/SDXL/SD3/FLUX KL autoencoders: GroupNorm statistics streamed over tiles
    "svd": "vaecli.models.temporal",  # SVD: a KL encoder and a temporal decoder mixing the frames of a clip
    "wan": "vaecli.models.wan",  # Wan 2.1/2.2 and Qwen-Image: causal 3-D convolutions
    "taehv": "vaecli.models.taehv",  # TAEHV: tiny causal video autoencoders
    "taesdv": "vaecli.models.taesdv",  # TAESDV: SVD's tiny video autoencoder
}


def family(spec: ModelSpec) -> type:
    """The `Family` of a registry entry."""
    return importlib.import_module(FAMILIES[spec.family]).Family
