"""Depth-first row streaming through a stack of local layers: the whole image's numbers, no halo recomputed.

Each output row of a 3x3 (or 1x1) convolution, an activation, a nearest upsampling or a residual block depends on
a few rows of its input. Fed a band of input rows at a time, every convolution keeps the input rows the next band's
first outputs still need (its vertical receptive field), with the image's zero padding at the top and bottom, so
the stack runs band by band from the top of the image to the bottom: each layer computes every row once, with the
same convolution over the same rows as the whole image, and holds only a few rows. Memory follows the image's
width, not its area. Each convolution reads its rows from a window buffer that the layer before writes into (see
`Conv`), so a band is not copied again to sit next to the rows held from the last one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vaecli import allocator, banded, fused

# Bytes of the widest layer's band, at most: every band costs a fixed amount of work (a call per layer, its held
# rows), which bands of a few rows pay many times over; far larger ones only hold more memory.
BAND_BYTES = 16 << 20

Op = Callable[[torch.Tensor], torch.Tensor]
# Where a layer's next output rows go: (shape, dtype, device) -> a view of the next layer's row window to write them
# into, or None (the layer makes a new tensor and the next one copies it in).
Sink = Callable[[tuple[int, ...], torch.dtype, torch.device], "torch.Tensor | None"]
# The residual rows a block's last convolution adds: (rows, into) -> those rows, written into `into` if given.
Add = Callable[..., torch.Tensor]


class Conv:
    """A convolution over bands of rows: padding `k // 2` on every side of the image, any stride; then ReLU if
    `relu`, or ReLU of the sum with `add(rows)` (rows of a residual, as many as this produced). With `upsample`, a
    3x3 'same' convolution of the rows upsampled 2x (nearest), as `vaecli.banded.upsample_conv` runs it: two output
    rows per input row.

    Input rows go into a window buffer after the rows still held from the last band (the vertical receptive field),
    and the layer before writes them there itself where it can (`slot`): through oneDNN a convolution adds into a
    given tensor, so a band is neither copied next to the held rows nor made a second time by a separate ReLU or
    residual add."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False, upsample: bool = False):
        k, s = conv.kernel_size[0], conv.stride[0]
        if conv.kernel_size != (k, k) or conv.stride != (s, s) or conv.padding != (k // 2, k // 2) or \
                conv.dilation != (1, 1) or conv.groups != 1 or upsample and (k, s, relu) != (3, 1, False):
            raise ValueError(f"rows: unsupported convolution {conv}{' after an upsampling' if upsample else ''}")
        self.conv, self.k, self.s, self.p, self.relu = conv, k, s, k // 2, relu
        self.kernels = None  # the upsampling's phase kernels, made once for all bands
        self.upsample = upsample
        self.win: torch.Tensor | None = None  # rows lo:hi wait for their outputs; hi: is free for the next band
        self.lo = self.hi = 0

    def slot(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Where the next `shape[2]` input rows go, for the layer before to write them in place (then `push` them):
        a view of the window, or None where it is not one block of memory (a batch of several)."""
        view = self._space(shape, dtype, device)
        return view if view.is_contiguous(memory_format=torch.channels_last) else None

    def push(self, x: torch.Tensor, add: Add | None = None, sink: Sink | None = None) -> torch.Tensor | None:
        """The output rows that the rows pushed so far determine (None if none yet), written into `sink`'s view
        where there is one."""
        space = self._space(x.shape, x.dtype, x.device)
        if x.data_ptr() != space.data_ptr() or x.stride() != space.stride():
            space.copy_(x)
        self.hi += x.shape[2]
        n = self.hi - self.lo
        m = (n - self.k) // self.s + 1 if n >= self.k else 0
        if m == 0:
            return None
        rows = self.win[:, :, self.lo:self.lo + (m - 1) * self.s + self.k]
        self.lo += m * self.s
        return self._run(rows, m, add, sink)

    def flush(self, add: Add | None = None, sink: Sink | None = None) -> torch.Tensor | None:
        """The last output rows, with the image's bottom padding."""
        if self.win is None or not self.p:
            return None
        b, c, _, w = self.win.shape
        pad = self._space((b, c, self.p, w), self.win.dtype, self.win.device)
        return self.push(pad.zero_(), add, sink)

    def _space(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The window's rows for `shape[2]` more input rows, after the held ones (moved to its top)."""
        b, c, n, w = shape
        held = self.hi - self.lo
        if self.win is None or self.win.shape[2] < held + n:
            win = torch.empty(b, c, held + n + self.k, w, dtype=dtype, device=device,
                              memory_format=torch.channels_last)
            if self.win is None:
                held = self.p
                win[:, :, :held].zero_()  # the image's top padding
            elif held:
                win[:, :, :held] = self.win[:, :, self.lo:self.hi]
            self.win, self.lo, self.hi = win, 0, held
        elif self.lo:
            if held:
                rest = self.win[:, :, self.lo:self.hi]
                self.win[:, :, :held] = rest.clone() if self.lo < held else rest
            self.lo, self.hi = 0, held
        return self.win[:, :, self.hi:self.hi + n]

    def _run(self, rows: torch.Tensor, m: int, add: Add | None, sink: Sink | None) -> torch.Tensor:
        """The `m` output rows of `rows`: into `sink`'s view where there is one, else through the fused oneDNN calls
        where they apply (`vaecli.fused`)."""
        c, pad = self.conv, [0, self.p]
        b, w = rows.shape[0], rows.shape[3]
        if self.upsample:
            self.kernels = self.kernels or banded.phase_kernels(c, rows.dtype, rows.device)
            out = sink((b, c.out_channels, 2 * m, 2 * w), rows.dtype, rows.device) if sink else None
            return banded.upsample_conv(c, rows, self.kernels, context=True, out=out)
        dnn = fused.onednn(rows)
        if sink is not None and dnn:
            out = sink((b, c.out_channels, m, (w + 2 * self.p - self.k) // self.s + 1), rows.dtype, rows.device)
            if out is not None:
                # The convolution adds into `out`: the residual's rows, or zeros (exact: x + 0 is x).
                add(m, out) if add is not None else out.zero_()
                return fused.conv_into(c, rows, out, relu=self.relu or add is not None, padding=pad)
        if dnn and add is not None:
            return fused.conv_add_relu(c, rows, add(m), padding=pad)
        if dnn and self.relu:
            return fused.conv_relu(c, rows, padding=pad)
        y = fused.conv2d(rows, c.weight, c.bias, c.stride, tuple(pad))
        if add is not None:
            y += add(m)
            return y.relu_()
        return y.relu_() if self.relu else y


class Pointwise:
    """A row-local layer with no state (an activation, a nearest upsampling)."""

    def __init__(self, fn: Op):
        self.fn = fn

    def slot(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        return None

    def push(self, x: torch.Tensor, add: Add | None = None, sink: Sink | None = None) -> torch.Tensor:
        return self.fn(x)

    def flush(self, add: Add | None = None, sink: Sink | None = None) -> None:
        return None


class Residual:
    """relu(inner(x) + skip(x)), `inner` a `Chain` ending in a `Conv`: the inputs wait in a queue until the inner
    chain's rows for them come out."""

    def __init__(self, inner: Chain, skip: Op):
        self.inner, self.skip = inner, skip
        self.queue: list[torch.Tensor] = []

    def slot(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return self.inner.slot(shape, dtype, device)

    def _take(self, n: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """skip() of the next `n` queued rows, written into `into` if given."""
        parts = []
        while n:
            q = self.queue[0]
            k = min(n, q.shape[2])
            parts.append(q[:, :, :k])
            self.queue[0:1] = [q[:, :, k:]] if k < q.shape[2] else []
            n -= k
        if into is not None and isinstance(self.skip, nn.Identity):
            row = 0
            for part in parts:  # straight into place: no joined copy first
                into[:, :, row:row + part.shape[2]] = part
                row += part.shape[2]
            return into
        y = self.skip(torch.cat(parts, 2) if len(parts) > 1 else parts[0])
        return into.copy_(y) if into is not None else y

    def push(self, x: torch.Tensor, add: Add | None = None, sink: Sink | None = None) -> torch.Tensor | None:
        self.queue.append(x)
        y = self.inner.push(x, add=self._take, sink=sink)
        # The rows still queued may be views of the inner window, which the next band writes over.
        self.queue = [q.clone() for q in self.queue]
        return y

    def flush(self, add: Add | None = None, sink: Sink | None = None) -> torch.Tensor | None:
        return self.inner.flush(add=self._take, sink=sink)


class Chain:
    """Layers one after another, each band going through all of them before the next is read; each layer writes
    its rows into the next one's window where it can."""

    def __init__(self, ops: list):
        self.ops = ops

    def slot(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return self.ops[0].slot(shape, dtype, device)

    def push(self, x: torch.Tensor | None, start: int = 0, add: Add | None = None, sink: Sink | None = None):
        """Rows out of the last layer for `x` pushed into layer `start`; `add` goes to the last layer (a `Conv`),
        which writes into `sink`'s view where there is one."""
        last = len(self.ops) - 1
        for i in range(start, len(self.ops)):
            if x is None:
                return None
            if i == last:
                x = self.ops[i].push(x, add, sink)
            else:
                x = self.ops[i].push(x, sink=self.ops[i + 1].slot)
        return x

    def flush(self, add: Add | None = None, sink: Sink | None = None) -> torch.Tensor | None:
        """The rows still held, layer by layer from the first: each layer's last rows go through the rest. These
        come out in several pieces, so none goes into `sink` (each would take the same place)."""
        out, last = [], len(self.ops) - 1
        for i, op in enumerate(self.ops):
            y = op.flush(add) if i == last else op.flush(sink=self.ops[i + 1].slot)
            if y is not None and i < last:
                y = self.push(y, i + 1, add)
            if y is not None:
                out.append(y)
        return torch.cat(out, 2) if len(out) > 1 else out[0] if out else None


def run(chain: Chain, x: torch.Tensor, band: int, scale: float = 1.0) -> torch.Tensor:
    """`chain` over (B, C, H, W) `x`, `band` rows at a time -> its (B, C', H * scale, W') output, written band by
    band into one tensor (by the last layer itself where it can)."""
    out, row = None, 0

    def sink(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        nonlocal out
        if out is None:
            out = torch.empty(shape[0], shape[1], round(x.shape[2] * scale), shape[3], dtype=dtype, device=device,
                              memory_format=torch.channels_last if shape[1] > 1 else torch.contiguous_format)
        view = out[:, :, row:row + shape[2]]
        fits = tuple(view.shape) == tuple(shape) and view.dtype == dtype
        return view if fits and view.is_contiguous(memory_format=torch.channels_last) else None

    def put(y: torch.Tensor | None) -> None:
        nonlocal row
        if y is None:
            return
        view = sink(y.shape, y.dtype, y.device)
        if view is None or y.data_ptr() != view.data_ptr():
            out[:, :, row:row + y.shape[2]] = y
        row += y.shape[2]

    for r in range(0, x.shape[2], band):
        put(chain.push(x[:, :, r:r + band], sink=sink))
    put(chain.flush())
    if out is None or row != out.shape[2]:
        raise RuntimeError(f"rows: {row} output rows for {x.shape[2]} input rows at scale {scale}")
    allocator.release_free_memory()  # the bands' freed blocks, before the caller's next large tensors
    return out


def band_rows(width: int, row_bytes: int, scale: float = 1.0, budget: int | None = None) -> int:
    """Input rows per band so that the widest layer's band (`row_bytes` per pixel of its rows, the whole batch's,
    `scale` times the input's rows and width) takes about `BAND_BYTES`, or a 64th of the memory `budget` where that
    is less (a stream holds some twenty bands' worth of rows at once), 1 MB at least."""
    target = BAND_BYTES if budget is None else max(1 << 20, min(BAND_BYTES, budget // 64))
    return max(1, int(target / (row_bytes * width * scale * scale)))
