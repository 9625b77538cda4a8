"""TAEHV tiny causal video autoencoders: taehv (Hunyuan), taew2_1 / taew2_2 (Wan), taecvx (CogVideoX), taehv1_5,
taeltx, and the `_super` decoders.

Layer indices follow the original taehv.py Sequentials, so the published `.pth` / `.safetensors` state dicts load with
a strict `load_state_dict`. Each half is a causal stack over time built from frame-wise layers, MemBlocks (which also
see the previous frame's input), TPool (merges `stride` consecutive frames into one) and TGrow (splits one frame into
`stride`). The whole-clip and the streaming paths run the same chunk-wise code, so they agree to float rounding.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from vaecli.causal import CausalFamily
from vaecli.clip_tiles import Split
from vaecli.models.memblocks import (
    Clamp,
    FrameRule,
    MemBlock,
    StreamDecoder,
    StreamEncoder,
    SuperMemBlock,
    TGrow,
    TPool,
    Unbatched,
    conv,
    decoder_split,
    encoder_split,
    split_time,
    step_chunks,
)
from vaecli.models.taehv_keys import config_from_state_dict, read_state_dict
from vaecli.registry import TAEHVConfig


def make_encoder(cfg: TAEHVConfig) -> nn.Sequential:
    """Encoder stack: patched frames (N*T, 3 p^2, H/p, W/p) in [0, 1] -> latents, run by `CausalRunner`."""
    w = cfg.encoder_width
    layers: list[nn.Module] = [conv(3 * cfg.patch_size**2, w), nn.ReLU(inplace=True)]
    for down in cfg.encoder_time_downscale:
        layers += [TPool(w, 2 if down else 1), conv(w, w, stride=2, bias=False), MemBlock(w), MemBlock(w), MemBlock(w)]
    return nn.Sequential(*layers, conv(w, cfg.latent_channels))


def make_decoder(cfg: TAEHVConfig) -> nn.Sequential:
    """Decoder stack: latents -> patched frames (3 p^2 channels, not clamped), run by `CausalRunner`."""
    n, c_out = cfg.decoder_widths, 3 * cfg.patch_size**2
    stages = list(zip(cfg.decoder_space_upscale, cfg.decoder_time_upscale, strict=True))
    if cfg.arch == "super":
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, n[0], 1, bias=False)]
        for i, (space, time) in enumerate(stages):
            s = 2 if space else 1
            layers += [SuperMemBlock(n[i]), SuperMemBlock(n[i]), SuperMemBlock(n[i]), conv(n[i], n[i + 1] * s * s),
                       nn.ReLU(inplace=True), nn.PixelShuffle(s), TGrow(n[i + 1], 2 if time else 1)]
        return nn.Sequential(*layers, conv(n[3], c_out))
    layers = [Clamp(), conv(cfg.latent_channels, n[0]), nn.ReLU(inplace=True)]
    for i, (space, time) in enumerate(stages):
        layers += [MemBlock(n[i]), MemBlock(n[i]), MemBlock(n[i]),
                   nn.Upsample(scale_factor=2) if space else nn.Identity(), TGrow(n[i], 2 if time else 1),
                   conv(n[i], n[i + 1], bias=False)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True), conv(n[3], c_out))


class TAEHV(nn.Module):
    """Tiny causal video autoencoder: frames (N, T, 3, H, W) in [0, 1] <-> latents (N, T', C, H/f, W/f) ~N(0, 1)."""

    def __init__(self, config: TAEHVConfig = TAEHVConfig()):
        super().__init__()
        self.config = config
        self.encoder = make_encoder(config)
        self.decoder = make_decoder(config)

    def stream_encoder(self) -> StreamEncoder:
        """A fresh streaming encoder over this model's weights (frames in [0, 1] -> latents)."""
        c = self.config
        return StreamEncoder(self.encoder, c.patch_size, c.t_downscale, c.latent_channels)

    def stream_decoder(self, n_latents: int | None = None) -> StreamDecoder:
        """A fresh streaming decoder (latents -> frames in [0, 1]); `n_latents` is the clip's count where known."""
        return StreamDecoder(self.decoder, self.config.patch_size, self.config.frames_to_trim(n_latents))

    def encode(self, frames: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Frames (N, T, 3, H, W) in [0, 1] -> latents (N, latent_frames(T), C, H/f, W/f), `chunk` frames at a time."""
        s = self.stream_encoder()
        return torch.cat([s.push(x) for x in split_time(frames, chunk)] + [s.flush()], 1)

    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Latents (N, T', C, h, w) -> frames (N, decoded_frames(T'), 3, H, W) in [0, 1], `chunk` latents at a time."""
        s = self.stream_decoder(latents.shape[1])
        return torch.cat([s.push(z) for z in split_time(latents, chunk)], 1)


def load_taehv(path: str | Path, config: TAEHVConfig | None = None) -> TAEHV:
    """A TAEHV (eval mode, float32, CPU) from a checkpoint; `config` defaults to what the checkpoint's shapes imply."""
    sd = read_state_dict(path)
    model = TAEHV(config or config_from_state_dict(sd, Path(path).name))
    own = model.state_dict()
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in sd and sd[key].shape[0] > own[key].shape[0]:
            # A preview config with this TGrow off keeps the last of the trained frames: the one aligned in time.
            sd[key] = sd[key][-own[key].shape[0]:]
    model.load_state_dict(sd, strict=True)
    return model.eval()


class Family(CausalFamily):
    """vaecli's interface to this family (`vaecli.causal`): build, checkpoint keys, clip streams on (T, C, h, w)
    latent frames and (T, 3, H, W) pixel frames in [0, 1], one clip at a time, and the cuts for spatial tiles."""

    network_space = "raw"  # the latent space of the big autoencoder it stands in for, before the denoiser's scaling
    posterior = False  # deterministic: the encoder gives the latents themselves

    @staticmethod
    def build(spec, encoder: bool = True, decoder: bool = True) -> TAEHV:
        """The network for registry entry `spec` (both halves: the checkpoints hold both, and they are small)."""
        return TAEHV(spec.config)

    @staticmethod
    def state_dict(spec, sd: dict, source: str) -> dict:
        """A checkpoint in the reference's keys (`encoder.N.*`, `decoder.N.*`), checked against the entry's config."""
        from vaecli.errors import WeightsError

        try:
            found = config_from_state_dict(sd, Path(source).name)
        except ValueError as exc:
            raise WeightsError(f"{source}: {exc}") from None
        if replace(found, cogvideox_trim=spec.config.cogvideox_trim) != spec.config:
            raise WeightsError(f"{source} is a TAEHV checkpoint with {found.latent_channels} latent channels and "
                               f"patch {found.patch_size}, not {spec.name}'s {spec.config.latent_channels} and "
                               f"{spec.config.patch_size}")
        return dict(sd)

    @staticmethod
    def encoder(model: TAEHV) -> FrameRule:
        """A stream: push((k, 3, H, W) frames) -> raw latent frames (k', C, h, w); flush() -> (latents, dropped)."""
        return FrameRule(model.stream_encoder(), model.config.t_downscale)

    @staticmethod
    def decoder(model: TAEHV, n_latents: int):
        """A stream: push((k, C, h, w) raw latent frames) -> pixel frames (k', 3, H, W); flush() -> None."""
        return Unbatched(model.stream_decoder(n_latents))

    @staticmethod
    def chunks(model: TAEHV, frames: int) -> list[tuple[int, int]]:
        """The encoder's temporal steps over a clip of `frames` frames, each giving one latent frame."""
        return step_chunks(frames, model.config.t_downscale)

    @staticmethod
    def lead_frames(model: TAEHV, n_latents: int | None) -> int:
        """The startup frames a decode keeps (taecvx for even or unknown latent counts): they precede the clip."""
        return model.config.t_upscale - 1 - model.config.frames_to_trim(n_latents)

    @staticmethod
    def frame_counts(model: TAEHV, n_latents: int) -> list[int]:
        """Frames each of a clip's `n_latents` latent frames decodes to (the first loses the startup frames)."""
        t, trim = model.config.t_upscale, model.config.frames_to_trim(n_latents)
        return [t - trim] + [t] * (n_latents - 1) if n_latents else []

    @staticmethod
    def encoder_split(model: TAEHV) -> Split:
        """The encoder cut for tiles of pixels (see `encoder_split`)."""
        return encoder_split(model.encoder, model.config.t_downscale, model.config.patch_size)

    @staticmethod
    def decoder_split(model: TAEHV, n_latents: int | None = None) -> Split:
        """The decoder cut for tiles of latent cells (see `decoder_split`)."""
        c = model.config
        return decoder_split(model.decoder, c.t_upscale, c.patch_size, c.frames_to_trim(n_latents))
