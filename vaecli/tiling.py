"""One exact tiling engine: run a translation-equivariant (local) network segment over overlapping tiles.

A tile is computed with a halo at least as wide as the segment's receptive field, and only its valid centre
is kept, so the result equals the untiled one (up to float rounding): no blending, no seams. Segments with
global operations (GroupNorm statistics, attention) are run whole by the caller at latent resolution.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

from vaecli.errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in a size like `2GB`, `512M` or `1.5GiB` (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"--max-memory {text}: expected a size like 2GB, 512MB or 1.5GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


DEFAULT_BUDGET = 1 << 30  # activations; with torch itself and the output image, a run stays near 1.5 GB


def default_budget(device: torch.device | None = None) -> int:
    """Bytes for activations: on CUDA half the free GPU memory; else 1 GiB, or half the available RAM if less."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(DEFAULT_BUDGET, int(line.split()[1]) * 1024 // 2)
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
        elif isinstance(layer, nn.Upsample):
            unit /= layer.scale_factor
    return radius


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
    """Apply a local segment `fn` mapping (B, C, H, W) to (B, C', H*scale, W*scale) over tiles of `tile` input
    cells with a `halo` of input cells, keeping each tile's exact centre; returns the full output."""
    b, _, h, w = x.shape
    out = None
    for y0, y1, ry0, ry1 in _spans(h, tile, math.ceil(halo), align):
        for x0, x1, rx0, rx1 in _spans(w, tile, math.ceil(halo), align):
            part = fn(x[:, :, ry0:ry1, rx0:rx1])
            if out is None:
                out = torch.empty(b, part.shape[1], round(h * scale), round(w * scale), dtype=part.dtype,
                                  device=part.device)
            oy, ox = round((y0 - ry0) * scale), round((x0 - rx0) * scale)
            th, tw = round((y1 - y0) * scale), round((x1 - x0) * scale)
            out[:, :, round(y0 * scale):round(y0 * scale) + th, round(x0 * scale):round(x0 * scale) + tw] = \
                part[:, :, oy:oy + th, ox:ox + tw]
            del part
    return out


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
