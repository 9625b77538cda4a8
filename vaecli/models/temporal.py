"""Stable Video Diffusion's temporal decoder: the KL decoder with frame-mixing 3D convolutions.

Module names are those `vaecli.checkpoints.kl_state_dict` gives diffusers' `AutoencoderKLTemporalDecoder`
weights (`decoder.up.3.block.0.spatial_res_block.norm1`, `...temporal_res_block.conv1`,
`...time_mixer.mix_factor`, `decoder.time_conv_out`), so the encoder and decoder share one conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaecli.models.kl import AttnBlock, ResnetBlock, norm, up_stages
from vaecli.registry import KLConfig


class TemporalResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3d(3x1x1) twice over (B, C, T, H, W): mixes each pixel with its neighbouring frames."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, channels, eps=1e-5)
        self.conv1 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.norm2 = nn.GroupNorm(32, channels, eps=1e-5)
        self.conv2 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, T, H, W)."""
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        h += x
        return h


class TimeMixer(nn.Module):
    """Learned blend of the spatial and temporal paths: sigmoid(mix_factor) weighs the temporal one."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        """Two (B, C, T, H, W) tensors -> their blend, same shape."""
        alpha = torch.sigmoid(self.mix_factor).to(spatial.dtype)
        return (1.0 - alpha) * spatial + alpha * temporal


class SpatioTemporalBlock(nn.Module):
    """A per-frame ResnetBlock followed by a temporal block, blended by a learned factor."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.spatial_res_block = ResnetBlock(in_channels, out_channels)
        self.temporal_res_block = TemporalResBlock(out_channels)
        self.time_mixer = TimeMixer()

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B*T, C_in, H, W) -> (B*T, C_out, H, W), frames of one clip contiguous."""
        h = self.spatial_res_block(x)
        bt, c, hh, ww = h.shape
        h5 = h.reshape(bt // num_frames, num_frames, c, hh, ww).permute(0, 2, 1, 3, 4)
        mixed = self.time_mixer(h5, self.temporal_res_block(h5))
        return mixed.permute(0, 2, 1, 3, 4).reshape(bt, c, hh, ww)


class TemporalDecoder(nn.Module):
    """Latents (B*T, C, h, w) -> pixels (B*T, 3, f*h, f*w) in about [-1, 1], mixing the T frames of each clip."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        n_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, n_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = SpatioTemporalBlock(n_in, n_in)
        self.mid.attn_1 = AttnBlock(n_in)
        self.mid.block_2 = SpatioTemporalBlock(n_in, n_in)
        self.up = up_stages(cfg, SpatioTemporalBlock)
        self.norm_out = norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)
        self.time_conv_out = nn.Conv3d(3, 3, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B*T, C, h, w) with `num_frames` = T -> (B*T, 3, f*h, f*w)."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, num_frames)), num_frames)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h, num_frames)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h), inplace=True))
        bt, c, hh, ww = h.shape
        h5 = h.reshape(bt // num_frames, num_frames, c, hh, ww).permute(0, 2, 1, 3, 4)
        return self.time_conv_out(h5).permute(0, 2, 1, 3, 4).reshape(bt, c, hh, ww)
