"""Causal video networks over exact spatial tiles, one tile at a time through the whole clip.

Streamed frame by frame, a causal 3-D network keeps each temporal convolution's last input frames: at 720p and up
these caches alone outgrow RAM. Past the memory budget the clip runs tile-major instead. The network is cut in two:
a `whole` part that needs whole frames (attention within a latent frame; small, at latent resolution) and a `local`
part of convolutions only. The whole part runs frame by frame into a whole layer kept in a scratch store
(`vaecli.scratch`: RAM within the budget, an unlinked temporary file past it); then each spatial tile, read with a
halo of the local part's receptive field, runs through every frame of the clip with caches of its own, and its exact
centre is written into the next whole layer. Only one tile's caches and activations are held at a time, and the
numbers are the whole frames' (no blending). Encoding spools the input frames to a store first, since every tile
reads every frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vaecli import allocator, tiling
from vaecli.scratch import FrameStore, Scratch


@dataclass(frozen=True)
class Split:
    """A causal network cut where tiles can start. `local(x, cache, first)` maps (1, C, k, H, W) tiles to
    (1, C', k', H * scale, W * scale); `whole(x, cache)` maps (1, C, k, h, w) whole frames likewise without resizing
    them (each with a dict `cache` of its own per stream). `halo` and `align` are in tile units (the local part's
    input cells, `unit_px` pixels of the clip each); `unit_bytes` is the local part's memory per tile unit (its
    caches and one step's activations)."""

    whole: Callable[..., torch.Tensor]
    local: Callable[..., torch.Tensor]
    halo: float
    scale: float
    align: int
    unit_bytes: int
    unit_px: float


def local_cost(modules: nn.Module, frames: int, elem: int, unit: float = 1.0) -> tuple[float, int]:
    """(receptive radius, bytes per input cell) of a chain of convolutions and resamplers run over `frames` frames
    a step with `elem`-byte values: every temporal convolution's cache of 2 input frames, plus the widest step's
    input, output and their working copies; both per tile unit, `unit` tile units to an input cell (a 2x2 patchify
    before the chain: 2 pixels)."""
    radius = tiling.receptive_radius(modules) * unit
    area, cache, widest = 1.0, 0.0, 0.0  # area: cells at the current resolution per input cell
    for layer in modules.modules():
        if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            out_area = area / layer.stride[-1] ** 2
            if isinstance(layer, nn.Conv3d) and layer.kernel_size[0] > 1:
                cache += 2 * layer.in_channels * area
            # input, output, and the normalised and time-padded copies a causal block makes on the way
            widest = max(widest, frames * 3 * (layer.in_channels * area + layer.out_channels * out_area))
            area = out_area
        elif tiling.upscale(layer) != 1:
            area *= tiling.upscale(layer) ** 2
    return radius, math.ceil(elem * (cache + widest) / (unit * unit))


def tile_for(split: Split, height: int, width: int, budget: int) -> int | None:
    """The tile side (tile units) for frames of `height` x `width` pixels within `budget`, or None when whole frames
    fit. Never below the halo (`min_bytes` is then what a tile takes): smaller tiles would spend nearly all their
    time on halos."""
    units = math.ceil(height / split.unit_px) * math.ceil(width / split.unit_px)
    if units * split.unit_bytes <= budget:
        return None
    side = int(math.sqrt(budget / split.unit_bytes)) - 2 * math.ceil(split.halo)
    return max(_min_side(split), side // split.align * split.align)


def _min_side(split: Split) -> int:
    return max(split.align, -(-math.ceil(split.halo) // split.align) * split.align)


def min_bytes(split: Split) -> int:
    """The memory a tile of the smallest side `tile_for` gives takes, halo included."""
    side = _min_side(split) + 2 * math.ceil(split.halo)
    return side * side * split.unit_bytes


def _tiles(height: int, width: int, tile: int, halo: float, align: int):
    for y0, y1, ry0, ry1 in tiling._spans(height, tile, math.ceil(halo), align):
        for x0, x1, rx0, rx1 in tiling._spans(width, tile, math.ceil(halo), align):
            yield (y0, y1, ry0, ry1), (x0, x1, rx0, rx1)


def _centre(part: torch.Tensor, rows, cols, scale: float) -> tuple[torch.Tensor, int, int]:
    """The exact centre of a tile's output (1, C, k, H, W) and where it goes: (centre, top, left)."""
    (y0, y1, ry0, _), (x0, x1, rx0, _) = rows, cols
    oy, ox = round((y0 - ry0) * scale), round((x0 - rx0) * scale)
    th, tw = round((y1 - y0) * scale), round((x1 - x0) * scale)
    return part[:, :, :, oy:oy + th, ox:ox + tw], round(y0 * scale), round(x0 * scale)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(1, C, k, H, W) -> (k, C, H, W)."""
    return x[0].movedim(1, 0)


def _clip(x: torch.Tensor) -> torch.Tensor:
    """(k, C, H, W) -> (1, C, k, H, W)."""
    return x.movedim(0, 1)[None]


def decode(split: Split, read: Callable[[int, int], torch.Tensor], n: int, counts: list[int], tile: int,
           store: Scratch) -> Iterator[torch.Tensor]:
    """Latent frames `read(i, j)` -> (j - i, C, h, w) of one n-frame clip -> its pixel frames (k, C', H, W), tile by
    tile; `counts[i]`: frames latent frame i gives. Yields the clip a latent frame's worth at a time."""
    mid, cache, bounds = Spool(store), {}, [0]  # bounds: the whole part's frames of each latent frame
    out: FrameStore | None = None
    try:
        for i in range(n):
            mid.push(_frames(split.whole(_clip(read(i, i + 1)), cache)))
            bounds.append(mid.frames)
        del cache
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        out = _local_pass(split, mid, list(zip(bounds[:-1], bounds[1:], strict=True)), starts, tile, store)
        mid.close()
        for i in range(n):
            yield out.read(starts[i], starts[i + 1])
    finally:
        mid.close()
        if out is not None:
            store.release(out)


def _local_pass(split: Split, src: Spool, steps: list[tuple[int, int]], starts: list[int], tile: int,
                store: Scratch) -> FrameStore:
    """The local part tile by tile over every step of a clip: step i reads frames steps[i] of `src` (each tile's
    rows and columns, halo included) and its output's exact centre is written at frames starts[i] ... of the
    returned store (starts[-1] frames in all)."""
    h, w = src.frame_shape[1:]
    out: FrameStore | None = None
    try:
        for rows, cols in _tiles(h, w, tile, split.halo, split.align):
            cache: dict = {}
            for i, (a, b) in enumerate(steps):
                part = _clip(src.read(a, b, rows[2:])[:, :, :, cols[2]:cols[3]])
                y, top, left = _centre(split.local(part, cache, i == 0), rows, cols, split.scale)
                if out is None:
                    out = store.frames(starts[-1], (y.shape[1], round(h * split.scale), round(w * split.scale)),
                                       y.dtype)
                out.write_region(starts[i], _frames(y), top, left)
            # The tile's freed activations would stay in the threads' heaps, and the next tile's come on top.
            allocator.release_free_memory()
    except BaseException:
        if out is not None:
            store.release(out)
        raise
    return out


class Spool:
    """Frames pushed as they come, any number at a time, kept in scratch stores for tile-major passes."""

    def __init__(self, store: Scratch):
        self.store, self.parts, self.frames = store, [], 0
        self.frame_shape: tuple[int, ...] = ()

    def push(self, x: torch.Tensor) -> None:
        """Append (k, C, H, W) frames."""
        part = self.store.frames(x.shape[0], tuple(x.shape[1:]), x.dtype)
        part.write(0, x)
        self.parts.append((self.frames, part))
        self.frames, self.frame_shape = self.frames + x.shape[0], tuple(x.shape[1:])

    def read(self, start: int, stop: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Frames start .. stop (only `rows` (first, stop) of each, if given) as (stop - start, C, H, W)."""
        pieces = []
        for first, part in self.parts:
            a, b = max(start, first), min(stop, first + part.frames)
            if a < b:
                pieces.append(part.read(a - first, b - first, rows))
        return torch.cat(pieces)

    def close(self) -> None:
        """Free every part."""
        for _, part in self.parts:
            self.store.release(part)
        self.parts = []


def encode(split: Split, spool: Spool, chunks: list[tuple[int, int]], tile: int, store: Scratch) -> torch.Tensor:
    """Spooled pixel frames of one clip, run in temporal `chunks` ((start, stop) frame ranges, each giving one
    latent frame) tile by tile -> the whole part's outputs (len(chunks), C, h, w)."""
    low = _local_pass(split, spool, chunks, list(range(len(chunks) + 1)), tile, store)
    try:
        cache, out = {}, []
        for i in range(len(chunks)):
            out.append(_frames(split.whole(_clip(low.read(i, i + 1)), cache)))
        return torch.cat(out)
    finally:
        store.release(low)
