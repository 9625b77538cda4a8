"""Exact tiling: run a network's local blocks in bounded memory with the numbers of running them whole.

Two engines. `streamed` (KL chains) runs layer by layer by default (`layerwise`): each layer once, over bands of
rows with the halo its convolution needs, its whole output kept in RAM while it fits the budget and in an unlinked
scratch file (`vaecli.scratch.RowStore`: rows of (W, C), a band one contiguous read) past it; each GroupNorm's
statistics are gathered while the layer before it is written (count, mean and M2 merged in float64, every pixel
once), so nothing is recomputed. `tiled` runs a segment over overlapping tiles whose halo is at least its receptive
field, keeping each tile's exact centre (no blending); GroupNorms in it take one extra pass over the tiles per norm
to gather whole-image statistics. It serves the tiny family, forced tile sizes (`--tile N`) and blocks `layerwise`
does not know (`streamed_tiles`: the chain cut into segments whose whole input and output fit the budget).
Attention and other global operations are run whole by the caller at latent resolution.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaecli.errors import UsageError

DTYPE_BYTES = 4  # the planner counts fp32 activations; half precision only makes the plan more generous

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in a size like `2GB`, `512M` or `1.5GiB` (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"--max-memory {text}: expected a size like 2GB, 512MB or 1.5GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


DEFAULT_BUDGET = 1 << 30  # activations; with torch itself and the output image, a run stays near 1.5 GB


def default_budget(device: torch.device | None = None, cap: int | None = DEFAULT_BUDGET) -> int:
    """Bytes for activations: on CUDA half the free GPU memory; else half the available RAM, at most `cap`."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    cap = cap or 1 << 62
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(cap, int(line.split()[1]) * 1024 // 2)
    except OSError:
        pass
    return DEFAULT_BUDGET


def receptive_radius(layers: nn.Module) -> float:
    """How far (in input units) an output of a sequential segment of convs, blocks and resamplers can see."""
    radius, unit = 0.0, 1.0  # unit: size of one current-resolution cell, in input cells
    for layer in layers.modules():
        if isinstance(layer, nn.Conv2d):
            radius += (layer.kernel_size[0] // 2) * unit + (layer.stride[0] - 1) * unit
            unit *= layer.stride[0]
        elif getattr(layer, "scale_factor", None):  # nn.Upsample, or a block that upsamples before its conv
            unit /= float(layer.scale_factor)
    return radius


def _scale_and_width(layers: nn.Module) -> tuple[float, float, int]:
    """(output cells per input cell, widest activation in channels x cells per input cell, output channels)."""
    scale, widest, channels = 1.0, 0.0, 0
    for layer in layers.modules():
        if isinstance(layer, nn.Conv2d):
            scale /= layer.stride[0]
            channels = layer.out_channels
            widest = max(widest, layer.in_channels * (scale * layer.stride[0]) ** 2, channels * scale ** 2)
        elif getattr(layer, "scale_factor", None):
            scale *= float(layer.scale_factor)
    return scale, widest, channels


class _Collected(Exception):
    """Raised by a collecting StreamNorm: this pass only gathers statistics, the rest of the tile is not needed."""


Moments = tuple[int, torch.Tensor, torch.Tensor]  # count, mean and M2 (sum of squared deviations), float64 (B, G)


def group_moments(x: torch.Tensor, groups: int) -> Moments:
    """Per sample and group moments of (B, C, H, W) `x`, from GroupNorm's own kernel (fast on channels_last, where
    a plain reduction over H and W is not)."""
    b, c = x.shape[:2]
    hw = x[0, 0].numel()
    fmt = torch.channels_last if x.stride(1) == 1 and c > 1 else torch.contiguous_format
    x = x.float().contiguous(memory_format=fmt)  # a copy only for a window cut in width too (a tile)
    _, mean, rstd = torch.native_group_norm(x, None, None, b, c, hw, groups, 0.0)
    n = hw * (c // groups)
    return n, mean.double().view(b, groups), rstd.double().pow(-2).view(b, groups) * n


def merge_moments(a: Moments | None, b: Moments) -> Moments:
    """Chan et al.'s merge of two parts' moments: exact, and keeps the spread between the parts' means."""
    if a is None:
        return b
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n, delta = na + nb, mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta ** 2 * (na * nb / n)


def norm_affine(gn: nn.GroupNorm, moments: Moments, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm `gn` with whole-image `moments` as a per-channel scale and shift, each (B, C, 1, 1) float64."""
    n, mean, m2 = moments
    b, g = mean.shape
    inv = torch.rsqrt(m2 / n + gn.eps).repeat_interleave(channels // g, dim=1)
    scale = inv * gn.weight.double() if gn.affine else inv
    shift = (gn.bias.double() if gn.affine else 0.0) - mean.repeat_interleave(channels // g, dim=1) * scale
    return scale.view(b, channels, 1, 1), shift.view(b, channels, 1, 1)


class StreamNorm(nn.Module):
    """Stands in for a GroupNorm during a tiled run: gathers whole-image statistics tile by tile, then applies them.

    Moments merge per tile (`merge_moments`), over each tile's valid centre only, so every pixel counts once.
    """

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.gn, self.ready, self.window = gn, False, (0, 0, 0, 0, 1, 1)
        self.moments: Moments | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> the same, normalised with the whole image's statistics (once gathered)."""
        if not self.ready:
            y0, y1, x0, x1, in_h, in_w = self.window
            fy, fx = h.shape[-2] / in_h, h.shape[-1] / in_w
            part = h[:, :, round(y0 * fy):round(y1 * fy), round(x0 * fx):round(x1 * fx)]
            self.moments = merge_moments(self.moments, group_moments(part, self.gn.num_groups))
            raise _Collected
        scale, shift = norm_affine(self.gn, self.moments, h.shape[1])
        return torch.addcmul(shift.to(h.dtype), h, scale.to(h.dtype))


def _swap_norms(segment: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every GroupNorm in `segment` by a StreamNorm; returns what to put back."""
    swapped = []
    for parent in list(segment.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, StreamNorm(child))
                swapped.append((parent, name, child))
    return swapped


def _spans(length: int, tile: int, halo: int, align: int) -> list[tuple[int, int, int, int]]:
    """1-D tiles as (keep0, keep1, read0, read1) in input units, with tile, halo and starts multiples of `align`."""
    tile = max(align, tile // align * align)
    halo = -(-halo // align) * align
    spans = []
    for start in range(0, length, tile):
        stop = min(length, start + tile)
        spans.append((start, stop, max(0, start - halo), min(length, stop + halo)))
    return spans


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, halo: float, scale: float,
          align: int = 1) -> torch.Tensor:
    """Apply a segment `fn` mapping (B, C, H, W) to (B, C', H*scale, W*scale) over tiles of `tile` input cells
    with a `halo` of input cells, keeping each tile's exact centre; returns the full output.

    If `fn` is a module holding GroupNorms, they normalise with whole-image statistics: one extra pass per norm.
    """
    b, _, h, w = x.shape
    swapped = _swap_norms(fn) if isinstance(fn, nn.Module) else []
    norms = [getattr(parent, name) for parent, name, _ in swapped]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 else \
        torch.contiguous_format
    try:
        while True:  # one pass per GroupNorm to gather, then the pass that writes
            out, gathered = None, False
            for y0, y1, ry0, ry1 in _spans(h, tile, math.ceil(halo), align):
                for x0, x1, rx0, rx1 in _spans(w, tile, math.ceil(halo), align):
                    for norm in norms:
                        norm.window = (y0 - ry0, y1 - ry0, x0 - rx0, x1 - rx0, ry1 - ry0, rx1 - rx0)
                    try:
                        # A copy: blocks may work in place, and `x` is kept whole for the next pass.
                        part = fn(x[:, :, ry0:ry1, rx0:rx1].contiguous(memory_format=fmt) if norms else
                                  x[:, :, ry0:ry1, rx0:rx1])
                    except _Collected:
                        gathered = True
                        continue
                    if out is None:
                        out = torch.empty(b, part.shape[1], round(h * scale), round(w * scale), dtype=part.dtype,
                                          device=part.device, memory_format=fmt)
                    oy, ox = round((y0 - ry0) * scale), round((x0 - rx0) * scale)
                    th, tw = round((y1 - y0) * scale), round((x1 - x0) * scale)
                    out[:, :, round(y0 * scale):round(y0 * scale) + th, round(x0 * scale):round(x0 * scale) + tw] \
                        = part[:, :, oy:oy + th, ox:ox + tw]
                    del part
            if not gathered:
                return out
            for norm in norms:
                norm.ready = norm.ready or norm.moments is not None
    finally:
        for parent, name, gn in swapped:
            setattr(parent, name, gn)


def whole_bytes(blocks: list[nn.Module], shape: tuple[int, ...]) -> int:
    """Estimated peak activation bytes of running `blocks` whole on an fp32 input of `shape` (B, C, H, W)."""
    cells = shape[0] * shape[-2] * shape[-1]
    size, peak = cells * shape[1] * DTYPE_BYTES, 0
    for block in blocks:
        scale, _, channels = _scale_and_width(block)
        cells = round(cells * scale ** 2)
        out = cells * channels * DTYPE_BYTES
        peak, size = max(peak, size + 3 * out), out  # the input, the output and two temporaries of its size
    return peak


CHUNK_BYTES = 32 << 20  # bytes of a layer read or written per scratch-file call (and held for it); budget/16 at most
_last = threading.local()


def last_stats() -> dict:
    """What this thread's latest `streamed` call did: {"path": "layerwise" or "tiles", "scratch_bytes": the most
    scratch-file bytes it held at once, "ram_bytes": the most bytes of whole layers it kept in RAM}."""
    return dict(getattr(_last, "stats", {}))


def streamed(blocks: list[nn.Module], x: torch.Tensor, budget: int, tile: int | None = None,
             unit: float = 1.0, *, scratch_dir: str | Path | None = None, stats: dict | None = None) -> torch.Tensor:
    """Run a chain of local blocks (convs, resnets with GroupNorms, resamplers) over (B, C, H, W) `x` exactly, in
    bounded memory; returns the chain's output.

    Without `tile`, the chain runs layer by layer (`layerwise`): every layer once, over bands of rows, each layer's
    whole output kept in RAM while it fits `budget` and in a scratch file in `scratch_dir` (default: the system's
    temporary folder) past it. With `tile` (tiles of `tile` pixels, at `unit` pixels per cell of `x`), or for blocks
    `layerwise` does not know, it runs over tiles (`streamed_tiles`). `stats`, a dict, receives what `last_stats`
    gives: the path taken, the scratch bytes and the RAM bytes of whole layers at their peaks.
    """
    info = {"path": "tiles", "scratch_bytes": 0, "ram_bytes": 0}
    if tile is None and layerwise_supports(blocks):
        out = layerwise(blocks, x, budget, scratch_dir, info)
    else:
        out = streamed_tiles(blocks, x, budget, tile, unit)
    _last.stats = info
    if stats is not None:
        stats.update(info)
    return out


# --- layer by layer: whole layers in RAM or scratch files, each computed once over bands of rows ---


def layerwise_supports(blocks: list[nn.Module]) -> bool:
    """Whether `layerwise` knows every block: KL resnets, 2x upsamplers and downsamplers, plain convs, output heads."""
    from vaecli import banded

    return bool(blocks) and banded.supports(blocks)


def _out_norm(block: nn.Module) -> nn.GroupNorm | None:
    """The GroupNorm `block` applies to its input first, if any (its statistics are gathered as that input is
    written)."""
    from vaecli import banded
    from vaecli.models.kl import ResnetBlock

    if isinstance(block, ResnetBlock):
        return block.norm1
    return block[0] if banded._is_out_head(block) else None


def _block_shape(block: nn.Module, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) of `block`'s output for an input of (C, H, W) `shape`."""
    from vaecli.models.kl import Downsample, ResnetBlock, Upsample

    c, h, w = shape
    if isinstance(block, ResnetBlock):
        return block.conv2.out_channels, h, w
    if isinstance(block, Upsample):
        return block.conv.out_channels, 2 * h, 2 * w
    if isinstance(block, Downsample):
        return c, (h - 2) // 2 + 1, (w - 2) // 2 + 1  # a (0, 1, 0, 1) pad, then a 3x3 stride-2 conv
    return (block if isinstance(block, nn.Conv2d) else block[-1]).out_channels, h, w


def _band_bytes(device: torch.device, budget: int) -> int:
    """Input bytes per band of rows: cache-sized on the CPU (banded's choice), larger on a GPU (fewer launches)."""
    from vaecli import banded

    base = banded.BAND_BYTES if device.type == "cpu" else 64 << 20
    return max(1, min(base, budget // 64))


def layerwise(blocks: list[nn.Module], x: torch.Tensor, budget: int, scratch_dir: str | Path | None = None,
              stats: dict | None = None) -> torch.Tensor:
    """Run a chain of KL blocks (see `layerwise_supports`) over (B, C, H, W) `x` layer by layer, exactly as whole.

    A resnet is two passes (norm1, SiLU, conv1; then norm2, SiLU, conv2 and the shortcut), an upsampler or a
    downsampler one: each reads its input whole layer band by band (with the rows of halo its convolution needs),
    writes its output whole layer, and gathers the moments of the next GroupNorm from each band it writes, so
    nothing is computed twice. Whole layers stay in RAM while they fit what `budget` leaves after `x`, the output
    and the bands; past that they go to unlinked scratch files (`vaecli.scratch`), read and written a chunk of rows
    per call. The scratch space a run needs is planned first and checked against the folder's free space. Images
    of a batch run one after another. `stats`, a dict, receives the scratch bytes and the RAM bytes at their peaks.
    """
    from vaecli.scratch import RowStore, Scratch

    n, size = x.shape[0], x.element_size()
    c, h, w = x.shape[1:]
    for block in blocks:
        c, h, w = _block_shape(block, (c, h, w))
    band = _band_bytes(x.device, budget)
    chunk = max(band, min(CHUNK_BYTES, budget // 16))
    ram = max(0, budget - (x.numel() + n * c * h * w) * size - 5 * chunk - 16 * band)
    plan = Scratch(ram, x.device, scratch_dir, dry=True)
    _chain(blocks, RowStore(*x.shape[1:], x.dtype, x.device), RowStore(c, h, w, x.dtype, x.device), plan, chunk,
           band)
    store = Scratch(ram, x.device, scratch_dir)
    store.check_space(plan.peak_file_bytes)
    out = torch.empty(n, c, h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    try:
        for i in range(n):
            _chain(blocks, RowStore.wrap(x[i:i + 1]), RowStore.wrap(out[i:i + 1]), store, chunk, band)
    finally:
        store.close()
    if stats is not None:
        stats.update(path="layerwise", scratch_bytes=store.peak_file_bytes, ram_bytes=store.peak_ram_bytes)
    return out


def _chain(blocks: list[nn.Module], src, final, scratch, chunk: int, band: int) -> None:
    """Run `blocks` from RowStore `src` (the caller's, left as it is) into RowStore `final`, intermediate layers
    from `scratch`; a dry `scratch` only plans (stores without data, nothing computed)."""
    run = not scratch.dry
    bufs = {"writer": ThreadPoolExecutor(1, thread_name_prefix="vaecli-scratch")} if run else {}
    try:
        _run_chain(blocks, src, final, scratch, chunk, band, run, bufs)
    finally:
        if run:
            bufs["writer"].shutdown(wait=True)


def _run_chain(blocks: list[nn.Module], src, final, scratch, chunk: int, band: int, run: bool, bufs: dict) -> None:
    from vaecli import allocator, banded
    from vaecli.models.kl import Downsample, ResnetBlock, Upsample

    owned = False
    norm = _out_norm(blocks[0])
    moments = _moments_of(src, norm.num_groups) if run and norm is not None else None
    for i, block in enumerate(blocks):
        last = i + 1 == len(blocks)
        norm = None if last else _out_norm(blocks[i + 1])
        groups = norm.num_groups if norm is not None else None
        c, h, w = _block_shape(block, (src.channels, src.height, src.width))
        io = {"chunk": chunk, "band": band, "bufs": bufs}
        if isinstance(block, ResnetBlock):
            mid = scratch.rows(block.conv1.out_channels, h, w, src.dtype)
            mid_moments = None
            if run:
                mid_moments = _conv_pass(block.conv1, src, mid, affine=_affine(block.norm1, moments, src.channels),
                                         groups=block.norm2.num_groups, **io)
            # The output goes over the rows of the input already consumed (a resnet keeps or narrows the width).
            reuse = owned and not last and c <= src.channels
            dst = final if last else scratch.recast(src, c) if reuse else scratch.rows(c, h, w, src.dtype)
            if run:
                moments = _conv_pass(block.conv2, mid, dst, affine=_affine(block.norm2, mid_moments, mid.channels),
                                     residual=src, shortcut=block.nin_shortcut, groups=groups, **io)
            scratch.release(mid)
            if owned and not reuse:
                scratch.release(src)
        else:
            dst = final if last else scratch.rows(c, h, w, src.dtype)
            if run and isinstance(block, Upsample):
                moments = _up_pass(block.conv, src, dst, groups=groups, **io)
            elif run and isinstance(block, Downsample):
                moments = _conv_pass(block.conv, src, dst, stride=2, pads=(0, 1, 0, 1), groups=groups, **io)
            elif run and banded._is_out_head(block):
                moments = _conv_pass(block[2], src, dst, affine=_affine(block[0], moments, src.channels),
                                     groups=groups, **io)
            elif run:
                moments = _conv_pass(block, src, dst, groups=groups, **io)
            if owned:
                scratch.release(src)
        src, owned = dst, not last
        if run:
            allocator.release_free_memory()


def _affine(gn: nn.GroupNorm, moments: Moments, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = norm_affine(gn, moments, channels)
    return scale.float(), shift.float()


MOMENT_BYTES = 2 << 20  # bytes per GroupNorm-statistics call: the kernel writes an output of the input's size, and
# outputs past glibc's mmap threshold (tens of MB) come as fresh pages each call, several times slower to fill


class _Gather:
    """Moments of a layer from its bands as they are written: GroupNorm's own kernel per piece of at most
    MOMENT_BYTES (float32 means and inverse deviations kept), merged once at the end in float64 (the pairwise
    formula `merge_moments` applies, in one step): every pixel counted once."""

    def __init__(self, groups: int):
        self.groups, self.parts = groups, []

    def add(self, x: torch.Tensor) -> None:
        """Count (1, C, h, W) `x` (channels_last, or contiguous)."""
        b, c, h, w = x.shape
        step = max(1, MOMENT_BYTES // max(1, b * c * w * x.element_size()))
        for r0 in range(0, h, step):
            part = x[:, :, r0:r0 + step].float()
            fmt = torch.channels_last if part.stride(1) == 1 and c > 1 else torch.contiguous_format
            part = part.contiguous(memory_format=fmt)
            _, mean, rstd = torch.native_group_norm(part, None, None, b, c, part[0, 0].numel(), self.groups, 0.0)
            self.parts.append((part[0, 0].numel() * (c // self.groups), mean.view(b, -1), rstd.view(b, -1)))

    def moments(self) -> Moments | None:
        if not self.parts:
            return None
        counts = torch.tensor([p[0] for p in self.parts], dtype=torch.float64, device=self.parts[0][1].device)
        k = counts.view(-1, 1, 1)
        means = torch.stack([p[1] for p in self.parts]).double()
        m2s = torch.stack([p[2] for p in self.parts]).double().pow(-2) * k
        n = counts.sum()
        mean = (means * k).sum(0) / n
        return int(n.item()), mean, m2s.sum(0) + ((means - mean) ** 2 * k).sum(0)


def _moments_of(store, groups: int) -> Moments:
    """Moments of a RAM store's whole image."""
    gather = _Gather(groups)
    gather.add(store.ram)
    return gather.moments()


def _buffer(bufs: dict, name: str, nbytes: int, device: torch.device) -> torch.Tensor:
    """A reusable uint8 buffer of at least `nbytes`: the same memory chunk after chunk (no page faults each time)."""
    buf = bufs.get((name, device))
    if buf is None or buf.numel() < nbytes:
        bufs[(name, device)] = buf = None  # free the old one first
        bufs[(name, device)] = buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buf


class _Window:
    """Rows start .. stop of a store as a tensor: a view of a RAM store, or read from its file into a buffer."""

    def __init__(self, store, start: int, stop: int, bufs: dict, name: str):
        ram = store.ram
        if ram is not None:
            self.t, self.start = ram, 0
        else:
            buf = _buffer(bufs, name, (stop - start) * store.row_bytes, torch.device("cpu"))
            self.t, self.start = store.read(start, stop, buf), start

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.t[:, :, a - self.start:b - self.start]


class _Writer:
    """Writes a store chunk by chunk (into its RAM, or a buffer then its file) and gathers the moments of the next
    GroupNorm (`groups`) from each band as it is written: every pixel once.

    File writes run behind, on the chain's writer thread, from two alternating buffers: a write that waits on the
    disk (fresh file pages are written back at disk speed) overlaps the next chunk's convolutions."""

    def __init__(self, store, groups: int | None, bufs: dict):
        self.store, self.bufs = store, bufs
        self.gather = _Gather(groups) if groups is not None else None
        self.ram, self.pending, self.flip = store.ram, {}, 0

    def begin(self, r0: int, r1: int) -> None:
        self.r0 = r0
        if self.ram is not None:
            self.t, self.start = self.ram, 0
            return
        s, self.name, self.flip = self.store, ("out", self.flip), 1 - self.flip
        if self.name in self.pending:  # this buffer's last write must be done before it is filled again
            self.pending.pop(self.name).result()
        buf = _buffer(self.bufs, self.name, (r1 - r0) * s.row_bytes, s.device)
        self.t = buf[:(r1 - r0) * s.row_bytes].view(s.dtype).view(1, r1 - r0, s.width, s.channels).permute(0, 3, 1, 2)
        self.start = r0

    def view(self, a: int, b: int) -> torch.Tensor:
        return self.t[:, :, a - self.start:b - self.start]

    def put(self, a: int, y: torch.Tensor) -> None:
        self.view(a, a + y.shape[-2]).copy_(y)
        self.collect(y)

    def collect(self, y: torch.Tensor) -> None:
        if self.gather is not None:
            self.gather.add(y)

    def end(self) -> None:
        if self.ram is None:
            self.pending[self.name] = self.bufs["writer"].submit(self.store.write, self.r0, self.t)

    def finish(self) -> Moments | None:
        """Wait for the writes still running; the moments gathered."""
        while self.pending:
            self.pending.popitem()[1].result()
        return self.gather.moments() if self.gather is not None else None


def _conv_pass(conv: nn.Conv2d, src, dst, chunk: int, band: int, bufs: dict, stride: int = 1,
               pads: tuple[int, int, int, int] | None = None, affine=None, residual=None,
               shortcut: nn.Module | None = None, groups: int | None = None) -> Moments | None:
    """dst = conv(silu(src * scale + shift) or src, zero `pads` (top, bottom, left, right; default the conv's))
    (+ `residual` through `shortcut`), a chunk of rows per store read/write and a band of rows per convolution;
    returns the moments of dst for `groups` groups (None without)."""
    k, height = conv.kernel_size[0], src.height
    pt, pb, pl, pr = pads or (conv.padding[0], conv.padding[0], conv.padding[1], conv.padding[1])
    pc = min(pl, pr)
    step = max(1, band // (src.row_bytes * stride))  # output rows per band
    per_chunk = max(step, chunk // max(src.row_bytes * stride, dst.row_bytes) // step * step)
    out = _Writer(dst, groups, bufs)
    for c0 in range(0, dst.height, per_chunk):
        c1 = min(dst.height, c0 + per_chunk)
        win = _Window(src, max(0, c0 * stride - pt), min(height, (c1 - 1) * stride - pt + k), bufs, "in")
        res = _Window(residual, c0, c1, bufs, "res") if residual is not None else None
        out.begin(c0, c1)
        for a in range(c0, c1, step):
            b = min(c1, a + step)
            lo, hi = a * stride - pt, (b - 1) * stride - pt + k  # input rows read; zero rows pad the image edges
            t = win.rows(max(0, lo), min(height, hi))
            if affine is not None:
                t = F.silu(torch.addcmul(affine[1], t.float(), affine[0]), inplace=True).to(src.dtype)
            if lo < 0 or hi > height or pl != pr:
                t = F.pad(t, (pl - pc, pr - pc, max(0, -lo), max(0, hi - height)))
            y = F.conv2d(t, conv.weight, conv.bias, stride, (0, pc))
            if res is not None:
                r = res.rows(a, b)
                y += r if shortcut is None else shortcut(r)
            out.put(a, y)
            del t, y
        out.end()
    return out.finish()


def _up_pass(conv: nn.Conv2d, src, dst, chunk: int, band: int, bufs: dict, groups: int | None = None
             ) -> Moments | None:
    """dst = conv(nearest_2x(src)) for a 3x3, padding-1 `conv`, as four 2x2 convolutions of src (banded's folding:
    the upsampled copy is never made); returns the moments of dst for `groups` groups (None without)."""
    from vaecli import banded

    fold, w64 = banded._FOLD.to(src.device), conv.weight.double()
    kernels = [[torch.einsum("pk,oikl,ql->oipq", fold[a], w64, fold[b]).to(conv.weight.dtype)
                .contiguous(memory_format=torch.channels_last) for b in range(2)] for a in range(2)]
    height, width = src.height, src.width
    step = max(1, band // src.row_bytes)  # input rows per band
    per_chunk = max(step, chunk // max(src.row_bytes, 2 * dst.row_bytes) // step * step)
    out = _Writer(dst, groups, bufs)
    for c0 in range(0, height, per_chunk):
        c1 = min(height, c0 + per_chunk)
        win = _Window(src, max(0, c0 - 1), min(height, c1 + 1), bufs, "in")
        out.begin(2 * c0, 2 * c1)
        for l0 in range(c0, c1, step):
            l1 = min(c1, l0 + step)
            t = F.pad(win.rows(max(0, l0 - 1), min(height, l1 + 1)), (1, 1, int(l0 == 0), int(l1 == height)))
            y = out.view(2 * l0, 2 * l1)
            phases = y.view(1, y.shape[1], l1 - l0, 2, width, 2)
            for a in range(2):
                for b in range(2):
                    phases[:, :, :, a, :, b] = F.conv2d(t[:, :, a:a + l1 - l0 + 1, b:b + width + 1], kernels[a][b],
                                                        conv.bias)
            out.collect(y)
        out.end()
    return out.finish()


# --- by tiles: segments recomputed once per GroupNorm (forced tile sizes, unknown blocks) ---


def streamed_tiles(blocks: list[nn.Module], x: torch.Tensor, budget: int, tile: int | None = None,
                   unit: float = 1.0) -> torch.Tensor:
    """`streamed` by tiles: the path for forced tile sizes and for blocks `layerwise` does not know. Exact, but a
    segment's head is recomputed once per GroupNorm in it.

    The chain is cut where the tensors kept whole (a segment's input and output) fit three quarters of `budget`, the
    rest going to tiles; longer segments cost more passes, not more memory. Each segment runs whole if it fits, else
    over the largest tiles that fit what is left (or tiles of `tile` pixels, at `unit` pixels per cell of `x`).
    """
    start, cells, size = 0, x.shape[-2] * x.shape[-1] * x.shape[0], x.numel() * DTYPE_BYTES
    for i in range(len(blocks)):
        segment = blocks[start:i + 1]
        scale, _, channels = _scale_and_width(nn.Sequential(*segment))
        out_size = round(cells * scale ** 2) * channels * DTYPE_BYTES
        if size + out_size > budget * 3 // 4 and i + 1 < len(blocks):
            continue  # keep a quarter of the budget, at least, for the tiles
        x = _run_segment(nn.Sequential(*segment), x, max(budget - size - out_size, budget // 4), tile, unit)
        start, cells, size, unit = i + 1, x.shape[-2] * x.shape[-1] * x.shape[0], x.numel() * DTYPE_BYTES, unit / scale
    return x


def _run_segment(segment: nn.Sequential, x: torch.Tensor, budget: int, tile: int | None, unit: float) -> torch.Tensor:
    scale, widest, _ = _scale_and_width(segment)
    # A resnet's input copy, two norm outputs, two conv outputs, the shortcut, and oneDNN's reorders of them.
    per_cell = widest * 8 * DTYPE_BYTES
    halo = receptive_radius(segment)
    align = max(1, round(1 / scale)) if scale < 1 else 1
    if tile is not None:
        cells = max(align, int(tile / unit))
    else:
        if x.shape[0] * x.shape[-2] * x.shape[-1] * per_cell <= budget:
            return segment(x)
        cells = int(math.sqrt(budget / (x.shape[0] * per_cell))) - 2 * math.ceil(halo)
    cells = max(4 * align, cells // align * align)
    if cells >= x.shape[-2] and cells >= x.shape[-1]:
        return segment(x)
    return tiled(segment, x, cells, halo, scale, align)


def tile_for_budget(pixels: int, bytes_per_pixel: int, budget: int, halo_px: int, align: int) -> int | None:
    """The largest square tile side (pixels) whose working set fits `budget`, or None if no tiling is needed."""
    if pixels * bytes_per_pixel <= budget:
        return None
    side = int(math.sqrt(budget / bytes_per_pixel)) - 2 * halo_px
    return max(4 * align, side // align * align)


def resolve_tile(option: str) -> int | None | str:
    """`--tile` as given: "auto", None for "off", or a tile side in pixels."""
    if option == "auto":
        return "auto"
    if option == "off":
        return None
    if not option.isdigit() or int(option) < 1:
        raise UsageError(f"--tile {option}: expected auto, off or a tile size in pixels")
    return int(option)
