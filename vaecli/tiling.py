"""Exact tiling: run a network's local blocks in bounded memory with the numbers of running them whole.

Two engines. `streamed` (KL chains) runs layer by layer by default (`vaecli.layerwise`): each layer once, its
whole output kept in RAM while it fits the budget and in an unlinked scratch file past it, each GroupNorm's
statistics gathered while the layer before it is written, so nothing is recomputed. `tiled` runs a segment over
overlapping tiles whose halo is at least its receptive field, keeping each tile's exact centre (no blending);
GroupNorms in it take one extra pass over the tiles per norm to gather whole-image statistics (count, mean and M2
merged in float64, every pixel once). It serves the tiny family, forced tile sizes (`--tile N`) and blocks
`vaecli.layerwise` does not know (`streamed_tiles`: the chain cut into segments whose whole input and output fit
the budget). Causal video networks tile with `vaecli.clip_tiles`, on the same spans and receptive fields.
Attention and other global operations are run whole by the caller at latent resolution.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vaecli.errors import UsageError

DTYPE_BYTES = 4  # the planner counts fp32 activations; half precision only makes the plan more generous

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in a size like `2GB`, `512M` or `1.5GiB` (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        shown = text if text.strip() else repr(text)  # an empty value is named, not left blank
        raise UsageError(f"--max-memory {shown}: expected a size like 2GB, 512MB or 1.5GiB")
    size = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(size):  # more digits than a float holds: no budget is that large
        raise UsageError(f"--max-memory {text[:40]}: expected a size like 2GB, 512MB or 1.5GiB")
    size = int(size)
    if size < 1:  # 0 would read as "no budget given", the default
        raise UsageError(f"--max-memory {text}: expected a size of at least 1 byte, like 2GB, 512MB or 1.5GiB")
    return size


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
        if isinstance(layer, (nn.Conv2d, nn.Conv3d)):  # a 3-D conv: its spatial kernel (the last two dims)
            radius += (layer.kernel_size[-1] // 2) * unit + (layer.stride[-1] - 1) * unit
            unit *= layer.stride[-1]
        elif upscale(layer) != 1:
            unit /= upscale(layer)
    return radius


def upscale(layer: nn.Module) -> float:
    """How many output cells per input cell a resampling layer makes along each side (nn.Upsample, a block that
    upsamples before its conv, nn.PixelShuffle; 1 for anything else)."""
    return float(getattr(layer, "scale_factor", None) or getattr(layer, "upscale_factor", None) or 1)


def _scale_and_width(layers: nn.Module) -> tuple[float, float, int]:
    """(output cells per input cell, widest activation in channels x cells per input cell, output channels)."""
    scale, widest, channels = 1.0, 0.0, 0
    for layer in layers.modules():
        if isinstance(layer, nn.Conv2d):
            scale /= layer.stride[0]
            channels = layer.out_channels
            widest = max(widest, layer.in_channels * (scale * layer.stride[0]) ** 2, channels * scale ** 2)
        elif upscale(layer) != 1:
            scale *= upscale(layer)
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


_last = threading.local()


def last_stats() -> dict:
    """What this thread's latest `streamed` call did: {"path": "layerwise" or "tiles", "scratch_bytes": the most
    scratch-file bytes it held at once, "ram_bytes": the most bytes of whole layers it kept in RAM}."""
    return dict(getattr(_last, "stats", {}))


def streamed(blocks: list[nn.Module], x: torch.Tensor, budget: int, tile: int | None = None,
             unit: float = 1.0, *, scratch_dir: str | Path | None = None, stats: dict | None = None) -> torch.Tensor:
    """Run a chain of local blocks (convs, resnets with GroupNorms, resamplers) over (B, C, H, W) `x` exactly, in
    bounded memory; returns the chain's output.

    Without `tile`, the chain runs layer by layer (`vaecli.layerwise`): every layer once, over bands of rows, each
    layer's whole output kept in RAM while it fits `budget` and in a scratch file in `scratch_dir` (default: the
    system's temporary folder) past it. With `tile` (tiles of `tile` pixels, at `unit` pixels per cell of `x`), or
    for blocks `vaecli.layerwise` does not know, it runs over tiles (`streamed_tiles`). `stats`, a dict, receives
    what `last_stats` gives: the path taken, the scratch bytes and the RAM bytes of whole layers at their peaks.
    """
    info = {"path": "tiles", "scratch_bytes": 0, "ram_bytes": 0}
    from vaecli import layerwise

    if tile is None and layerwise.supports(blocks):
        out = layerwise.run(blocks, x, budget, scratch_dir, info)
    else:
        out = streamed_tiles(blocks, x, budget, tile, unit)
    _last.stats = info
    if stats is not None:
        stats.update(info)
    return out


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
    try:
        if not (option.isascii() and option.isdigit()) or int(option) < 1:  # not '²', which isdigit() accepts
            raise ValueError
    except ValueError:  # also an integer of more digits than Python converts
        raise UsageError(f"--tile {option[:40]}: expected auto, off or a tile size in pixels") from None
    return int(option)
