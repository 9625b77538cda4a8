"""Winograd convolutions F(2x2, 3x3) and F(2x2, 2x2) for the wide fp32 layers of the KL and SVD autoencoders on the
CPU.

An r x r convolution (r = 3, or 2 for the sub-pixel phases of an upsampling conv) computed on (r+1) x (r+1) input
tiles transformed by B^T d B, multiplied per tile position by the kernel transformed by G g G^T ((r+1)^2 GEMMs over
channels), and transformed back by A^T m A gives each 2x2 output tile with (r+1)^2 multiplies per channel pair
instead of 4 r^2 (16 instead of 36, 9 instead of 16): the result of a direct convolution to its rounding (the sums
over channels are as long; the data transforms only add and subtract, the kernel's scale by halves), in about half
the time where the GEMMs dominate, at 256 channels and up. Narrower layers stay with oneDNN's direct convolution,
which is faster there.
"""

from __future__ import annotations

import math
import os
import threading

import torch

from vaecli import fused

MIN_CHANNELS = 256  # narrower layers spend too large a share in the transforms to win
ENABLED = os.environ.get("VAE_WINOGRAD", "1") != "0"  # 0: oneDNN's direct convolution everywhere, to compare

# (B^T, G, A^T) of F(2, r) for r = 3 (points 0, 1, -1, inf) and r = 2 (points 0, 1, inf); B^T and A^T are 0/+-1.
_MATRICES = {
    3: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    2: ([[1, -1, 0], [0, 1, 0], [0, -1, 1]],
        [[1, 0], [1, 1], [0, 1]],
        [[1, 1, 0], [0, 1, 1]]),
}
_GG = {r: torch.kron(torch.tensor(g, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)).float()
       for r, (_, g, _) in _MATRICES.items()}  # ((r+1)^2, r^2): kernel taps to tile positions
_local = threading.local()  # per-thread scratch buffers, reused so large blocks are not faulted in on every call


def prepare(weight: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The transformed kernel ((r+1)^2, C, C') fp32 of an r x r `weight` (C', C, r, r) for `conv2d` of a stride-1,
    ungrouped, undilated convolution on `dtype` inputs on `device`, or None where the direct convolution is the one
    to run: r not 2 or 3, not fp32 on the CPU, fewer than MIN_CHANNELS either way, autograd on, or VAE_WINOGRAD=0."""
    c_out, c_in, r, s = weight.shape
    if (not ENABLED or r != s or r not in _MATRICES or device.type != "cpu" or dtype != torch.float32
            or weight.dtype != torch.float32 or min(c_in, c_out) < MIN_CHANNELS or torch.is_grad_enabled()):
        return None
    taps = weight.detach().permute(0, 2, 3, 1).reshape(c_out, r * r, c_in)
    return torch.matmul(_GG[r], taps).permute(1, 2, 0)  # a view of (C', taps, C): no copy of channels_last weights


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor | None,
           pad: int = 0) -> torch.Tensor:
    """The stride-1 r x r convolution by `weight` with no row padding and `pad` zero columns each side, through
    Winograd with `u` (its `prepare`) when given, else oneDNN's: (N, C, H + r - 1, W) in any range ->
    (N, C', H, W + 2 * pad - r + 1), channels_last from Winograd."""
    if u is None:
        return fused.conv2d(x, weight, bias, 1, (0, pad))
    return _winograd(x, u, bias, pad)


def _winograd(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, pad: int) -> torch.Tensor:
    n_pos, c, co = u.shape
    r = {16: 3, 9: 2}[n_pos]
    bt, _, at = _MATRICES[r]
    n, _, hp, w = x.shape
    h, wo = hp - r + 1, w + 2 * pad - r + 1
    th, tw = (h + 1) // 2, (wo + 1) // 2
    # One zero-padded NHWC copy: the side columns, and a row / column more where the output size is odd.
    xp = _buf("x", (n, 2 * th + r - 1, 2 * tw + r - 1, c))
    xp[:, hp:].zero_()
    xp[:, :hp, :pad].zero_()
    xp[:, :hp, pad + w:].zero_()
    xp[:, :hp, pad:pad + w].copy_(x.permute(0, 2, 3, 1))
    d = _buf("d", (r + 1, n, th, 2 * tw + r - 1, c))
    _combine(bt, [xp[:, k::2][:, :th] for k in range(r + 1)], d)  # B^T down the rows of each tile ...
    v = _buf("v", (r + 1, r + 1, n, th, tw, c))
    for k in range(r + 1):  # ... and B along them: the tile positions, each a (tiles, C) matrix
        _combine(bt, [d[k][:, :, j::2][:, :, :tw] for j in range(r + 1)], v[k])
    tiles = n * th * tw
    m = _buf("m", (n_pos, tiles, co))
    torch.bmm(v.view(n_pos, tiles, c), u, out=m)
    if bias is not None:
        m[r + 2] += bias  # position (1, 1) reaches all four outputs of a tile with weight 1
    m = m.view(r + 1, r + 1, n, th, tw, co)
    s = _buf("s", (r + 1, 2, n, th, tw, co))
    for k in range(r + 1):  # A^T along the rows of each tile ...
        _combine(at, list(m[k]), s[k])
    out = torch.empty(n, co, 2 * th, 2 * tw, memory_format=torch.channels_last)
    o = out.permute(0, 2, 3, 1).view(n, th, 2, tw, 2, co)
    for j in range(2):  # ... and down them, into the two rows of each output tile
        _combine(at, list(s[:, j]), [o[:, :, i, :, j] for i in range(2)])
    return out if (2 * th, 2 * tw) == (h, wo) else out[:, :, :h, :wo]


def _combine(mat: list[list[float]], parts: list[torch.Tensor], out) -> None:
    """out[p] = sum_k mat[p][k] * parts[k] for a matrix of 0 and +-1, in as few passes as the terms allow."""
    for p, row in enumerate(mat):
        terms = [(coef, parts[k]) for k, coef in enumerate(row) if coef]
        terms.sort(key=lambda t: -t[0])  # a positive term first
        (_, first), rest = terms[0], terms[1:]
        if not rest:
            out[p].copy_(first)
            continue
        (sign, second), rest = rest[0], rest[1:]
        (torch.add if sign > 0 else torch.sub)(first, second, out=out[p])
        for sign, t in rest:
            (out[p].add_ if sign > 0 else out[p].sub_)(t)


def _buf(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    size = math.prod(shape)
    bufs = _local.__dict__.setdefault("bufs", {})
    b = bufs.get(name)
    if b is None or b.numel() < size:
        b = bufs[name] = torch.empty(size)
    return b[:size].view(shape)
