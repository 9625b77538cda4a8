"""Wan 2.2 5B's additions to the Wan VAE (`vaecli.models.wan`): the 2x2 patchify around the network, and the
parameter-free shortcuts of its residual down/up blocks (its latent statistics are in `vaecli.registry`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def avg_down(x: torch.Tensor, cout: int, ft: int, fs: int) -> torch.Tensor:
    """Wan 2.2's shortcut: (B, C, T, H, W) -> (B, cout, ceil(T/ft), H/fs, W/fs), space-to-channel then group means."""
    x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, cout, -1, t // ft, h // fs, w // fs).mean(2)


def dup_up(x: torch.Tensor, cout: int, ft: int, fs: int, first: bool) -> torch.Tensor:
    """Wan 2.2's shortcut: (B, C, T, H, W) -> (B, cout, T*ft, H*fs, W*fs) by channel repeats; first chunk trimmed."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(cout * ft * fs * fs // c, dim=1).view(b, cout, ft, fs, fs, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, cout, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1:] if first else x


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Pixels (B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p), channels ordered (C, column, row) as Wan 2.2 folds them."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `patchify`: (B, C*p*p, T, h, w) -> (B, C, T, h*p, w*p)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, c // (p * p), t, h * p, w * p)
