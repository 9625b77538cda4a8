"""TAESDV: the tiny video autoencoder for Stable Video Diffusion's SD latents (4 channels, 8x, one latent per frame).

The encoder is TAESD's per-frame encoder; the decoder is causal through MemBlocks but has no TPool / TGrow, so the
frame rule is T <-> T. Layer indices follow the original taesdv.py, so `taesdv.pth` loads with a strict
`load_state_dict`; the decoder runs on the same chunk-wise `CausalRunner` as TAEHV.
"""

from __future__ import annotations

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
    Unbatched,
    conv,
    decoder_split,
    encoder_split,
    split_time,
)
from vaecli.models.taehv_keys import read_state_dict


class Block(nn.Module):
    """Per-frame residual block: (B, n, H, W) -> (B, n, H, W) >= 0."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(conv(n, n), nn.ReLU(inplace=True), conv(n, n), nn.ReLU(inplace=True), conv(n, n))
        self.fuse = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, H, W) -> (B, n, H, W)."""
        return self.fuse(self.conv(x) + x)


class TAESDV(nn.Module):
    """Tiny SVD video autoencoder: frames (N, T, 3, H, W) in [0, 1] <-> latents (N, T, 4, H/8, W/8) ~N(0, 1)."""

    latent_channels = 4

    def __init__(self, width: int = 64):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            conv(3, w), Block(w),
            conv(w, w, stride=2, bias=False), Block(w), Block(w), Block(w),
            conv(w, w, stride=2, bias=False), Block(w), Block(w), Block(w),
            conv(w, w, stride=2, bias=False), Block(w), Block(w), Block(w),
            conv(w, 4),
        )
        self.decoder = nn.Sequential(
            Clamp(), conv(4, w), nn.ReLU(inplace=True),
            MemBlock(w), MemBlock(w), MemBlock(w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
            MemBlock(w), MemBlock(w), MemBlock(w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
            MemBlock(w), MemBlock(w), MemBlock(w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
            MemBlock(w), conv(w, 3),
        )

    @staticmethod
    def latent_frames(n_frames: int) -> int:
        """One latent per input frame."""
        return n_frames

    @staticmethod
    def decoded_frames(n_latents: int) -> int:
        """One output frame per latent (no startup frames to trim)."""
        return n_latents

    def stream_encoder(self) -> StreamEncoder:
        """A fresh streaming encoder (frames in [0, 1] -> latents); every push returns a latent per frame."""
        return StreamEncoder(self.encoder, latent_channels=self.latent_channels)

    def stream_decoder(self, n_latents: int | None = None) -> StreamDecoder:
        """A fresh streaming decoder (latents -> frames in [0, 1]); `n_latents` is accepted for symmetry with TAEHV."""
        return StreamDecoder(self.decoder)

    def encode(self, frames: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Frames (N, T, 3, H, W) in [0, 1] -> latents (N, T, 4, H/8, W/8), `chunk` frames at a time."""
        s = self.stream_encoder()
        return torch.cat([s.push(x) for x in split_time(frames, chunk)] + [s.flush()], 1)

    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Latents (N, T, 4, h, w) -> frames (N, T, 3, 8h, 8w) clamped to [0, 1], `chunk` latents at a time."""
        s = self.stream_decoder()
        return torch.cat([s.push(z) for z in split_time(latents, chunk)], 1)


def load_taesdv(path: str | Path) -> TAESDV:
    """A TAESDV (eval mode, float32, CPU) from a `.pth` or `.safetensors` checkpoint in taesdv.py's key names."""
    sd = read_state_dict(path)
    model = TAESDV(width=sd["encoder.0.weight"].shape[0])
    model.load_state_dict(sd, strict=True)
    return model.eval()


class Family(CausalFamily):
    """vaecli's interface to TAESDV (`vaecli.causal`): one latent per frame, in SVD's (SD's) scaled latent space."""

    network_space = "scaled"  # like TAESD: the latents the denoiser consumes
    posterior = False  # deterministic: the encoder gives the latents themselves

    @staticmethod
    def build(spec, encoder: bool = True, decoder: bool = True) -> TAESDV:
        """The network for registry entry `spec` (both halves: the checkpoint holds both)."""
        return TAESDV()

    @staticmethod
    def state_dict(spec, sd: dict, source: str) -> dict:
        """A checkpoint in taesdv.py's keys, as it is."""
        return dict(sd)

    @staticmethod
    def encoder(model: TAESDV):
        """A stream: push((k, 3, H, W) frames) -> latent frames (k', 4, h, w); flush() -> (latents, 0)."""
        return FrameRule(model.stream_encoder(), 1)

    @staticmethod
    def decoder(model: TAESDV, n_latents: int):
        """A stream: push((k, 4, h, w) latent frames) -> pixel frames (k, 3, H, W); flush() -> None."""
        return Unbatched(model.stream_decoder(n_latents))

    @staticmethod
    def chunks(model: TAESDV, frames: int) -> list[tuple[int, int]]:
        """The encoder's steps: one frame each."""
        return [(i, i + 1) for i in range(frames)]

    @staticmethod
    def frame_counts(model: TAESDV, n_latents: int) -> list[int]:
        """One frame per latent frame."""
        return [1] * n_latents

    @staticmethod
    def encoder_split(model: TAESDV) -> Split:
        """The per-frame encoder cut for tiles of pixels (see `vaecli.models.memblocks.encoder_split`)."""
        return encoder_split(model.encoder, 1, 1)

    @staticmethod
    def decoder_split(model: TAESDV, n_latents: int | None = None) -> Split:
        """The causal decoder cut for tiles of latent cells (see `vaecli.models.memblocks.decoder_split`)."""
        return decoder_split(model.decoder, 1, 1, 0)
