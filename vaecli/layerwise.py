"""KL chains layer by layer out of core: every layer computed once, whole layers in RAM or in scratch files.

`run` is `vaecli.tiling.streamed`'s default engine for chains of KL blocks under a memory budget. Each layer reads
its input whole layer band by band (with the rows of halo its convolution needs) and writes its output whole layer;
the statistics of the next GroupNorm are gathered from each band as it is written (count, mean and M2 merged in
float64, every pixel once), so nothing is recomputed. Whole layers stay in RAM while they fit the budget and past it
go to unlinked scratch files (`vaecli.scratch.RowStore`: rows of (W, C), a band one contiguous read).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaecli import allocator, banded, winograd
from vaecli.models.kl import Downsample, MidBlock, ResnetBlock, Upsample, attention
from vaecli.scratch import RowStore, Scratch
from vaecli.tiling import Moments, group_moments, norm_affine

CHUNK_BYTES = 32 << 20  # bytes of a layer read or written per scratch-file call (and held for it); budget/16 at most


def supports(blocks: list[nn.Module]) -> bool:
    """Whether `run` knows every block: KL resnets, 2x upsamplers and downsamplers, plain convs, output heads."""
    return bool(blocks) and banded.supports(blocks)


def _out_norm(block: nn.Module) -> nn.GroupNorm | None:
    """The GroupNorm `block` applies to its input first, if any (its statistics are gathered as that input is
    written)."""
    if isinstance(block, ResnetBlock):
        return block.norm1
    return block[0] if banded._is_out_head(block) else None


def _block_shape(block: nn.Module, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) of `block`'s output for an input of (C, H, W) `shape`."""
    c, h, w = shape
    if isinstance(block, ResnetBlock):
        return block.conv2.out_channels, h, w
    if isinstance(block, Upsample):
        return block.conv.out_channels, 2 * h, 2 * w
    if isinstance(block, Downsample):
        return c, (h - 2) // 2 + 1, (w - 2) // 2 + 1  # a (0, 1, 0, 1) pad, then a 3x3 stride-2 conv
    return (block if isinstance(block, nn.Conv2d) else block[-1]).out_channels, h, w


def io_sizes(device: torch.device, budget: int) -> tuple[int, int]:
    """(band, chunk) in bytes under `budget`: input bytes per band of rows, cache-sized on the CPU (banded's
    choice) and larger on a GPU (fewer launches); and bytes of a layer per store read or write (at least a band)."""
    band = max(1, min(banded.BAND_BYTES if device.type == "cpu" else 64 << 20, budget // 64))
    return band, max(band, min(CHUNK_BYTES, budget // 16))


def run(blocks: list[nn.Module], x: torch.Tensor, budget: int, scratch_dir: str | Path | None = None,
        stats: dict | None = None) -> torch.Tensor:
    """Run a chain of KL blocks (see `supports`) over (B, C, H, W) `x` layer by layer, exactly as whole.

    A resnet is two passes (norm1, SiLU, conv1; then norm2, SiLU, conv2 and the shortcut), an upsampler or a
    downsampler one: each reads its input whole layer band by band (with the rows of halo its convolution needs),
    writes its output whole layer, and gathers the moments of the next GroupNorm from each band it writes, so
    nothing is computed twice. Whole layers stay in RAM while they fit what `budget` leaves after `x`, the output
    and the bands; past that they go to unlinked scratch files (`vaecli.scratch`), read and written a chunk of rows
    per call. The scratch space a run needs is planned first and checked against the folder's free space. Images
    of a batch run one after another. `stats`, a dict, receives the scratch bytes and the RAM bytes at their peaks.
    """
    n, size = x.shape[0], x.element_size()
    c, h, w = chain_shape(blocks, tuple(x.shape[1:]))
    band, chunk = io_sizes(x.device, budget)
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


def run_latent_part(part: nn.Sequential, x: torch.Tensor, budget: int, scratch_dir: str | Path | None = None,
                    stats: dict | None = None) -> torch.Tensor:
    """A KL decoder head or encoder tail (modules run whole at latent resolution: convs of a few channels, a mid
    block, a GroupNorm-SiLU-conv output head) over (B, C, h, w) `x` in bounded memory: the mid block by
    `mid_block`, the output head by `run`, the rest as they are; `stats` as `run` gives them, at their peaks."""
    modules, i, parts = list(part), 0, [{"scratch_bytes": 0, "ram_bytes": 0}]
    while i < len(modules):
        head = nn.Sequential(*modules[i:i + 3])
        if isinstance(modules[i], MidBlock):
            parts.append({})
            x = mid_block(modules[i], x, budget, scratch_dir, parts[-1])
        elif banded._is_out_head(head):
            parts.append({})
            x = run([head], x, budget, scratch_dir, parts[-1])
            i += 2
        else:
            x = modules[i](x)
        i += 1
    if stats is not None:
        stats.update(path="layerwise", **{k: max(p[k] for p in parts) for k in ("scratch_bytes", "ram_bytes")})
    return x


def mid_block(mid: nn.Module, x: torch.Tensor, budget: int, scratch_dir: str | Path | None = None,
              stats: dict | None = None) -> torch.Tensor:
    """A KL mid block (resnet, attention, resnet) over (B, C, h, w) `x` in bounded memory: the resnets by `run`,
    the attention by `attention_block`; `stats` as `run` gives them, at their peaks over the three."""
    parts: list[dict] = [{}, {}]
    x = run([mid.block_1], x, budget, scratch_dir, parts[0])
    x = attention_block(mid.attn_1, x)
    x = run([mid.block_2], x, budget, scratch_dir, parts[1])
    if stats is not None:
        stats.update(path="layerwise", **{k: max(p[k] for p in parts) for k in ("scratch_bytes", "ram_bytes")})
    return x


def attention_block(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A KL `AttnBlock` over (B, C, h, w) `x`, written into `x` itself (returned): its keys and values are made
    whole a band of rows at a time, then queries, attention and the output projection go a band of rows at a time,
    so beside `x` only the keys and values are held whole (not the normalised copy, the queries or the output)."""
    b, c, h, w = x.shape
    gather = _Gather(attn.norm.num_groups)
    gather.add(x)
    scale, shift = _affine(attn.norm, gather.moments(), c)
    rows = max(1, CHUNK_BYTES // max(1, b * w * c * x.element_size()))

    def normed(r0: int, r1: int) -> torch.Tensor:
        return torch.addcmul(shift, x[:, :, r0:r1].float(), scale).to(x.dtype)

    def tokens(y: torch.Tensor) -> torch.Tensor:  # (B, C, r, w) -> (B, 1, r * w, C), C innermost for SDPA
        return y.permute(0, 2, 3, 1).reshape(b, 1, -1, c)

    k, v = x.new_empty(b, 1, h * w, c), x.new_empty(b, 1, h * w, c)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        y = normed(r0, r1)
        k[:, :, r0 * w:r1 * w], v[:, :, r0 * w:r1 * w] = tokens(attn.k(y)), tokens(attn.v(y))
    for r0 in range(0, h, rows):  # a band's rows are read before they are overwritten: k and v are already made
        r1 = min(h, r0 + rows)
        o = attention(tokens(attn.q(normed(r0, r1))), k, v)
        x[:, :, r0:r1] += attn.proj_out(o.reshape(b, r1 - r0, w, c).permute(0, 3, 1, 2))
    return x


def chain_shape(blocks: list[nn.Module], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) of what a chain of KL blocks (see `supports`) makes of an input of (C, H, W) `shape`."""
    for block in blocks:
        shape = _block_shape(block, shape)
    return shape


def run_rows(blocks: list[nn.Module], read, shape: tuple[int, int, int], dtype: torch.dtype, dst: RowStore,
             scratch: Scratch, budget: int, out_groups: int | None = None) -> Moments | None:
    """Run a chain of KL blocks (see `supports`) over one image of (C, H, W) `shape`, given band by band by
    `read(r0, r1)` -> (1, C, r1 - r0, W), into the caller's RowStore `dst`, layer by layer and exactly as whole,
    the input and intermediate layers from `scratch` (RAM within its budget, files past it), bands sized from
    `budget`: so one frame of a clip kept out of core runs in bounded memory. Returns dst's moments for
    `out_groups` GroupNorm groups (None without)."""
    c, h, w = shape
    src = scratch.rows(c, h, w, dtype)
    norm = _out_norm(blocks[0])
    gather = _Gather(norm.num_groups) if norm is not None else None
    band, chunk = io_sizes(scratch.device, budget)
    step = max(1, chunk // src.row_bytes)
    try:
        for r0 in range(0, h, step):
            x = read(r0, min(h, r0 + step))
            src.write(r0, x)
            if gather is not None:
                gather.add(x)
            del x
        return _chain(blocks, src, dst, scratch, chunk, band, gather.moments() if gather else None, out_groups)
    finally:
        scratch.release(src)


def _chain(blocks: list[nn.Module], src, final, scratch, chunk: int, band: int, moments: Moments | None = None,
           out_groups: int | None = None) -> Moments | None:
    """Run `blocks` from RowStore `src` (the caller's, left as it is) into RowStore `final`, intermediate layers
    from `scratch`; a dry `scratch` only plans (stores without data, nothing computed)."""
    compute = not scratch.dry
    bufs = {"writer": ThreadPoolExecutor(1, thread_name_prefix="vaecli-scratch")} if compute else {}
    try:
        return _run_chain(blocks, src, final, scratch, chunk, band, compute, bufs, moments, out_groups)
    finally:
        if compute:
            bufs["writer"].shutdown(wait=True)


def _run_chain(blocks: list[nn.Module], src, final, scratch, chunk: int, band: int, compute: bool, bufs: dict,
               moments: Moments | None, out_groups: int | None) -> Moments | None:
    owned = False
    norm = _out_norm(blocks[0])
    if compute and norm is not None and moments is None:
        moments = _moments_of(src, norm.num_groups)
    for i, block in enumerate(blocks):
        last = i + 1 == len(blocks)
        norm = None if last else _out_norm(blocks[i + 1])
        groups = out_groups if last else norm.num_groups if norm is not None else None
        c, h, w = _block_shape(block, (src.channels, src.height, src.width))
        io = {"chunk": chunk, "band": band, "bufs": bufs}
        if isinstance(block, ResnetBlock):
            mid = scratch.rows(block.conv1.out_channels, h, w, src.dtype)
            mid_moments = None
            if compute:
                mid_moments = _conv_pass(block.conv1, src, mid, affine=_affine(block.norm1, moments, src.channels),
                                         groups=block.norm2.num_groups, **io)
            # The output goes over the rows of the input already consumed (a resnet keeps or narrows the width).
            reuse = owned and not last and c <= src.channels
            dst = final if last else scratch.recast(src, c) if reuse else scratch.rows(c, h, w, src.dtype)
            if compute:
                moments = _conv_pass(block.conv2, mid, dst, affine=_affine(block.norm2, mid_moments, mid.channels),
                                     residual=src, shortcut=block.nin_shortcut, groups=groups, **io)
            scratch.release(mid)
            if owned and not reuse:
                scratch.release(src)
        else:
            dst = final if last else scratch.rows(c, h, w, src.dtype)
            if compute and isinstance(block, Upsample):
                moments = _up_pass(block.conv, src, dst, groups=groups, **io)
            elif compute and isinstance(block, Downsample):
                moments = _conv_pass(block.conv, src, dst, stride=2, pads=(0, 1, 0, 1), groups=groups, **io)
            elif compute and banded._is_out_head(block):
                moments = _conv_pass(block[2], src, dst, affine=_affine(block[0], moments, src.channels),
                                     groups=groups, **io)
            elif compute:
                moments = _conv_pass(block, src, dst, groups=groups, **io)
            if owned:
                scratch.release(src)
        src, owned = dst, not last
        if compute:
            allocator.release_free_memory()
    return moments


def _affine(gn: nn.GroupNorm, moments: Moments, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale, shift = norm_affine(gn, moments, channels)
    return scale.float(), shift.float()


MOMENT_BYTES = 2 << 20  # bytes per GroupNorm-statistics call: the kernel writes an output of the input's size, and
# outputs past glibc's mmap threshold (tens of MB) come as fresh pages each call, several times slower to fill


class _Gather:
    """Moments of a layer from its bands as they are written: `tiling.group_moments` per piece of at most
    MOMENT_BYTES, merged once at the end (the pairwise formula `merge_moments` applies, in one step for all the
    pieces): every pixel counted once."""

    def __init__(self, groups: int):
        self.groups, self.parts = groups, []

    def add(self, x: torch.Tensor) -> None:
        """Count (1, C, h, W) `x` (channels_last, or contiguous)."""
        b, c, h, w = x.shape
        step = max(1, MOMENT_BYTES // max(1, b * c * w * x.element_size()))
        for r0 in range(0, h, step):
            self.parts.append(group_moments(x[:, :, r0:r0 + step], self.groups))

    def moments(self) -> Moments | None:
        if not self.parts:
            return None
        counts = torch.tensor([p[0] for p in self.parts], dtype=torch.float64, device=self.parts[0][1].device)
        k = counts.view(-1, 1, 1)
        means = torch.stack([p[1] for p in self.parts])
        m2s = torch.stack([p[2] for p in self.parts])
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
    u = winograd.prepare(conv.weight, src.dtype, src.device) if stride == 1 else None
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
            y = winograd.conv2d(t, conv.weight, conv.bias, u, pc) if u is not None else \
                F.conv2d(t, conv.weight, conv.bias, stride, (0, pc))
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
    kernels = banded.phase_kernels(conv, src.dtype, src.device)
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
                    kernel, u = kernels[a][b]
                    phases[:, :, :, a, :, b] = winograd.conv2d(t[:, :, a:a + l1 - l0 + 1, b:b + width + 1], kernel,
                                                               conv.bias, u)
            out.collect(y)
        out.end()
    return out.finish()
