"""Depth-first row streaming through a stack of local layers: the whole image's numbers, no halo recomputed.

Each output row of a 3x3 (or 1x1) convolution, an activation, a nearest upsampling or a residual block depends on
a few rows of its input. Fed a band of input rows at a time, every convolution keeps the input rows the next band's
first outputs still need (its vertical receptive field), with the image's zero padding at the top and bottom, so
the stack runs band by band from the top of the image to the bottom: each layer computes every row once, with the
same convolution over the same rows as the whole image, and holds only a few rows. Memory follows the image's
width, not its area, and a band's activations are still in cache when the next layer reads them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vaecli import allocator, banded, fused

BAND_BYTES = 4 << 20  # bytes of the widest layer's band: a couple of L2 caches' worth

Op = Callable[[torch.Tensor], torch.Tensor]


class Conv:
    """A convolution over bands of rows: padding `k // 2` on every side of the image, any stride; then ReLU if
    `relu`, or ReLU of the sum with `add(rows)` (rows of a residual, as many as this produced). With `upsample`, a
    3x3 'same' convolution of the rows upsampled 2x (nearest), as `vaecli.banded.upsample_conv` runs it: two output
    rows per input row."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False, upsample: bool = False):
        k, s = conv.kernel_size[0], conv.stride[0]
        if conv.kernel_size != (k, k) or conv.stride != (s, s) or conv.padding != (k // 2, k // 2) or \
                conv.dilation != (1, 1) or conv.groups != 1 or upsample and (k, s, relu) != (3, 1, False):
            raise ValueError(f"rows: unsupported convolution {conv}{' after an upsampling' if upsample else ''}")
        self.conv, self.k, self.s, self.p, self.relu = conv, k, s, k // 2, relu
        self.kernels = None  # the upsampling's phase kernels, made once for all bands
        self.upsample = upsample
        self.buf: torch.Tensor | None = None

    def push(self, x: torch.Tensor, add: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor | None:
        """The output rows that the rows pushed so far determine (None if none yet)."""
        if self.buf is None:
            self.buf = _zeros(x, self.p)
        buf = torch.cat([self.buf, x], 2) if self.buf.shape[2] else x
        n = buf.shape[2]
        m = (n - self.k) // self.s + 1 if n >= self.k else 0
        self.buf = buf[:, :, m * self.s:]
        if m == 0:
            return None
        return self._run(buf[:, :, :(m - 1) * self.s + self.k], m, add)

    def flush(self, add: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor | None:
        """The last output rows, with the image's bottom padding."""
        if self.buf is None:
            return None
        return self.push(_zeros(self.buf, self.p), add) if self.p else None

    def _run(self, rows: torch.Tensor, m: int, add: Callable[[int], torch.Tensor] | None) -> torch.Tensor:
        """The `m` output rows of `rows`, through the fused oneDNN calls where they apply (`vaecli.fused`)."""
        c, pad = self.conv, [0, self.p]
        if self.upsample:
            self.kernels = self.kernels or banded.phase_kernels(c, rows.dtype, rows.device)
            return banded.upsample_conv(c, rows, self.kernels, context=True)
        if fused.fusable(rows) and add is not None:
            return fused.conv_add_relu(c, rows, add(m), padding=pad)
        if fused.fusable(rows) and self.relu:
            return fused.conv_relu(c, rows, padding=pad)
        y = fused.conv2d(rows, c.weight, c.bias, c.stride, tuple(pad))
        if add is not None:
            y += add(m)
            return y.relu_()
        return y.relu_() if self.relu else y


def _zeros(like: torch.Tensor, rows: int) -> torch.Tensor:
    """`rows` zero rows in `like`'s memory format (a band of a channels-last tensor is channels-last, contiguous
    or not), so that the rows concatenated with them stay in it."""
    zeros = like.new_zeros(like.shape[0], like.shape[1], rows, like.shape[3])
    return zeros.contiguous(memory_format=torch.channels_last) if like.stride(1) == 1 else zeros


class Pointwise:
    """A row-local layer with no state (an activation, a nearest upsampling)."""

    def __init__(self, fn: Op):
        self.fn = fn

    def push(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def flush(self) -> None:
        return None


class Residual:
    """relu(inner(x) + skip(x)), `inner` a `Chain` ending in a `Conv`: the inputs wait in a queue until the inner
    chain's rows for them come out."""

    def __init__(self, inner: Chain, skip: Op):
        self.inner, self.skip = inner, skip
        self.queue: list[torch.Tensor] = []

    def _take(self, n: int) -> torch.Tensor:
        q = torch.cat(self.queue, 2) if len(self.queue) > 1 else self.queue[0]
        self.queue = [q[:, :, n:]] if q.shape[2] > n else []
        return self.skip(q[:, :, :n])

    def push(self, x: torch.Tensor) -> torch.Tensor | None:
        self.queue.append(x)
        return self.inner.push(x, add=self._take)

    def flush(self) -> torch.Tensor | None:
        return self.inner.flush(add=self._take)


class Chain:
    """Layers one after another, each band going through all of them before the next is read."""

    def __init__(self, ops: list):
        self.ops = ops

    def push(self, x: torch.Tensor | None, start: int = 0, add: Callable[[int], torch.Tensor] | None = None):
        """Rows out of the last layer for `x` pushed into layer `start`; `add` goes to the last layer (a `Conv`)."""
        last = len(self.ops) - 1
        for i in range(start, len(self.ops)):
            if x is None:
                return None
            x = self.ops[i].push(x, add) if i == last and add is not None else self.ops[i].push(x)
        return x

    def flush(self, add: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor | None:
        """The rows still held, layer by layer from the first: each layer's last rows go through the rest."""
        out, last = [], len(self.ops) - 1
        for i, op in enumerate(self.ops):
            y = op.flush(add) if i == last and add is not None else op.flush()
            if y is not None and i < last:
                y = self.push(y, i + 1, add)
            if y is not None:
                out.append(y)
        return torch.cat(out, 2) if len(out) > 1 else out[0] if out else None


def run(chain: Chain, x: torch.Tensor, band: int, scale: float = 1.0) -> torch.Tensor:
    """`chain` over (B, C, H, W) `x`, `band` rows at a time -> its (B, C', H * scale, W') output, written band by
    band into one tensor."""
    out, row = None, 0

    def put(y: torch.Tensor | None) -> None:
        nonlocal out, row
        if y is None:
            return
        if out is None:
            out = torch.empty(y.shape[0], y.shape[1], round(x.shape[2] * scale), y.shape[3], dtype=y.dtype,
                              device=y.device, memory_format=torch.channels_last if y.stride(1) == 1 and
                              y.shape[1] > 1 else torch.contiguous_format)
        out[:, :, row:row + y.shape[2]] = y
        row += y.shape[2]

    for r in range(0, x.shape[2], band):
        put(chain.push(x[:, :, r:r + band]))
    put(chain.flush())
    if out is None or row != out.shape[2]:
        raise RuntimeError(f"rows: {row} output rows for {x.shape[2]} input rows at scale {scale}")
    allocator.release_free_memory()  # the bands' freed blocks, before the caller's next large tensors
    return out


def band_rows(width: int, row_bytes: int, scale: float = 1.0) -> int:
    """Input rows per band so that the widest layer's band (`row_bytes` per pixel of its rows, the whole batch's,
    `scale` times the input's rows and width) takes about `BAND_BYTES`."""
    return max(1, int(BAND_BYTES / (row_bytes * width * scale * scale)))
