"""TAESD-family tiny autoencoders (taesd, taesdxl, taesd3, taef1, taef2, taesana).

Layer indices follow the original `taesd.py` Sequentials, so the published `*_encoder.pth` /
`*_decoder.pth` state dicts load with a plain strict `load_state_dict` into `.encoder` / `.decoder`.
"""

from __future__ import annotations

import torch
from torch import nn

from vaecli.registry import TinyConfig


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    """3x3 convolution with 'same' padding."""
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


def _fusable(x: torch.Tensor) -> bool:
    # bf16 on the CPU: oneDNN's fused conv+ReLU and conv+add+ReLU skip two passes over memory per block (the decoder
    # 1.3x faster). Not fp32: there the gain is ~10% and these ops cache per-shape oneDNN state that raised taef2's
    # tiled decode peak from 923 to 1199 MB at 2048x2048. No autograd, hence inference only.
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled() and \
        torch.backends.mkldnn.is_available()


def _conv_relu(c: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(c(x)) in one oneDNN call; (B, C, H, W) any range -> (B, C', H', W') >= 0."""
    return torch.ops.mkldnn._convolution_pointwise(x, c.weight, c.bias, list(c.padding), list(c.stride),
                                                   list(c.dilation), c.groups, "relu", [], "")


def _conv_add_relu(c: nn.Conv2d, x: torch.Tensor, other: torch.Tensor, into_other: bool = False) -> torch.Tensor:
    """relu(c(x) + other) in one oneDNN call, written over `other` if `into_other`; (B, C, H, W) -> (B, C', H, W)."""
    op = torch.ops.mkldnn._convolution_pointwise_ if into_other else torch.ops.mkldnn._convolution_pointwise
    args = (other, x) if into_other else (x, other)
    return op.binary(*args, c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups, "add",
                     1.0, "relu", [], "")


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3), as the decoders were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) any range -> same shape in (-3, 3)."""
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block; with `midblock_gn` a 1x1-conv/GroupNorm branch is added first (TAEF2)."""

    def __init__(self, n_in: int, n_out: int, midblock_gn: bool = False):
        super().__init__()
        # In-place ReLUs and add: each acts on a fresh conv output, and saving the copies is ~10% of the time.
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(inplace=True), conv(n_out, n_out), nn.ReLU(inplace=True),
                                  conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU(inplace=True)
        self.pool = None
        if midblock_gn:
            # GroupNorm pools statistics over the whole image: the only non-local op in the family.
            n_gn = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, n_gn, 1, bias=False), nn.GroupNorm(4, n_gn), nn.ReLU(inplace=True),
                nn.Conv2d(n_gn, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor, reuse_input: bool = False) -> torch.Tensor:
        """(B, n_in, H, W) -> (B, n_out, H, W); with `reuse_input` the output may be written over `x`."""
        if self.pool is not None:
            x, reuse_input = x + self.pool(x), True
        if _fusable(x):
            c0, _, c1, _, c2 = self.conv
            h = _conv_relu(c1, _conv_relu(c0, x))
            # Over the input where it is ours to overwrite: one activation-sized allocation fewer per block.
            into = reuse_input and isinstance(self.skip, nn.Identity) and \
                x.is_contiguous(memory_format=torch.channels_last)
            return _conv_add_relu(c2, h, self.skip(x), into_other=into)
        h = self.conv(x)
        h += self.skip(x)
        return self.fuse(h)


class Stack(nn.Sequential):
    """nn.Sequential (same state-dict keys) whose Blocks may write over inputs that the stack itself made."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the last layer's output; the caller's `x` is never written to by a Block."""
        storage = x.untyped_storage().data_ptr()
        for layer in self:
            if isinstance(layer, Block):
                x = layer(x, reuse_input=x.untyped_storage().data_ptr() != storage)
            else:
                x = layer(x)
        return x


def make_encoder(cfg: TinyConfig) -> nn.Sequential:
    """Encoder: pixels (B, 3, H, W) in [0, 1] -> latents (B, C, H/f, W/f)."""
    w, gn = cfg.width, cfg.midblock_gn
    if cfg.encoder_stem:
        stem: list[nn.Module] = []
        n_in = 3
        for n_out in cfg.encoder_stem:
            stem += [conv(n_in, n_out, stride=2), nn.ReLU(inplace=True)]
            n_in = n_out
    else:
        stem = [conv(3, w)]
    return Stack(
        *stem, Block(w, w),
        conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        conv(w, w, stride=2, bias=False), Block(w, w, gn), Block(w, w, gn), Block(w, w, gn),
        conv(w, cfg.latent_channels),
    )


def make_decoder(cfg: TinyConfig) -> nn.Sequential:
    """Decoder: latents (B, C, h, w) -> pixels (B, 3, 8h, 8w), roughly in [0, 1] (not clamped)."""
    w, gn = cfg.width, cfg.midblock_gn
    return Stack(
        Clamp(), conv(cfg.latent_channels, w), nn.ReLU(inplace=True),
        Block(w, w, gn), Block(w, w, gn), Block(w, w, gn), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
        Block(w, w), conv(w, 3),
    )


class TinyAutoencoder(nn.Module):
    """A TAESD-family autoencoder; either half may be absent (e.g. TAESana has no decoder)."""

    def __init__(self, cfg: TinyConfig, encoder: bool = True, decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg) if encoder else None
        self.decoder = make_decoder(cfg) if decoder else None

    def encoder_segments(self) -> tuple[nn.Sequential, nn.Sequential]:
        """The encoder as (local part up to the last downsampling, the rest at latent resolution)."""
        last_down = max(i for i, m in enumerate(self.encoder) if isinstance(m, nn.Conv2d) and m.stride[0] == 2)
        return self.encoder[: last_down + 1], self.encoder[last_down + 1:]

    def decoder_segments(self) -> tuple[nn.Sequential, nn.Sequential]:
        """The decoder as (the part at latent resolution, holding any GroupNorm; the local rest)."""
        first_up = next(i for i, m in enumerate(self.decoder) if isinstance(m, nn.Upsample))
        return self.decoder[:first_up], self.decoder[first_up:]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of the spatial factor -> latents (B, C, H/f, W/f)."""
        return self.encoder(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> pixels (B, 3, 8h, 8w) clamped to [0, 1]."""
        return self.decoder(latents).clamp(0, 1)
