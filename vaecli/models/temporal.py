"""Stable Video Diffusion's temporal decoder: the KL decoder with frame-mixing 3D convolutions.

Module names are those `vaecli.checkpoints.kl_state_dict` gives diffusers' `AutoencoderKLTemporalDecoder`
weights (`decoder.up.3.block.0.spatial_res_block.norm1`, `...temporal_res_block.conv1`,
`...time_mixer.mix_factor`, `decoder.time_conv_out`), so the encoder and decoder share one conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vaecli import banded, layerwise
from vaecli.models.kl import AttnBlock, ResnetBlock, norm, up_stages
from vaecli.registry import KLConfig
from vaecli.tiling import Moments, group_moments, merge_moments, norm_affine

# frames start .. stop of a layer (rows (r0, r1) of each, or all for None) as (k, C, H, W)
Frames = Callable[[int, int, "tuple[int, int] | None"], torch.Tensor]


class TemporalResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3d(3x1x1) twice over (B, C, T, H, W): mixes each pixel with its neighbouring frames."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, channels, eps=1e-5)
        self.conv1 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.norm2 = nn.GroupNorm(32, channels, eps=1e-5)
        self.conv2 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, T, H, W)."""
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        h += x
        return h


class TimeMixer(nn.Module):
    """Learned blend of the spatial and temporal paths: sigmoid(mix_factor) weighs the temporal one."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        """Two (B, C, T, H, W) tensors -> their blend, same shape."""
        alpha = torch.sigmoid(self.mix_factor).to(spatial.dtype)
        return (1.0 - alpha) * spatial + alpha * temporal


class SpatioTemporalBlock(nn.Module):
    """A per-frame ResnetBlock followed by a temporal block, blended by a learned factor."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.spatial_res_block = ResnetBlock(in_channels, out_channels)
        self.temporal_res_block = TemporalResBlock(out_channels)
        self.time_mixer = TimeMixer()

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B*T, C_in, H, W) -> (B*T, C_out, H, W), frames of one clip contiguous."""
        h = self.spatial_res_block(x)
        bt, c, hh, ww = h.shape
        h5 = h.reshape(bt // num_frames, num_frames, c, hh, ww).permute(0, 2, 1, 3, 4)
        mixed = self.time_mixer(h5, self.temporal_res_block(h5))
        return mixed.permute(0, 2, 1, 3, 4).reshape(bt, c, hh, ww)


class TemporalDecoder(nn.Module):
    """Latents (B*T, C, h, w) -> pixels (B*T, 3, f*h, f*w) in about [-1, 1], mixing the T frames of each clip."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        n_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, n_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = SpatioTemporalBlock(n_in, n_in)
        self.mid.attn_1 = AttnBlock(n_in)
        self.mid.block_2 = SpatioTemporalBlock(n_in, n_in)
        self.up = up_stages(cfg, SpatioTemporalBlock)
        self.norm_out = norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)
        self.time_conv_out = nn.Conv3d(3, 3, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B*T, C, h, w) with `num_frames` = T -> (B*T, 3, f*h, f*w)."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, num_frames)), num_frames)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h, num_frames)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h), inplace=True))
        bt, c, hh, ww = h.shape
        h5 = h.reshape(bt // num_frames, num_frames, c, hh, ww).permute(0, 2, 1, 3, 4)
        return self.time_conv_out(h5).permute(0, 2, 1, 3, 4).reshape(bt, c, hh, ww)

    def stream(self, z: torch.Tensor, chunk: int, store, frame_budget: int | None = None) -> Iterator[torch.Tensor]:
        """Latents (T, C, h, w) of one clip -> its pixels (k, 3, f*h, f*w) in about [-1, 1], `chunk` frames at a
        time, equal to `forward(z, T)`: the temporal GroupNorms take their statistics over the whole clip and the
        temporal convolutions see the neighbouring frames, through layers kept whole in `store` (a
        `vaecli.scratch.Scratch`), so memory follows `chunk`, not T. With `frame_budget` (bytes), frames too large
        to run whole go one at a time a band of rows at a time (`vaecli.layerwise`), so memory follows neither the
        clip's length nor its frame size."""
        frames = z.shape[0]
        src: Frames = lambda s, e, rows: z[s:e] if rows is None else z[s:e, :, rows[0]:rows[1]]  # noqa: E731
        shape = tuple(z.shape[1:])
        run = lambda src, shape, modules, gn: self._layer(src, shape, modules, frames, chunk, store, gn,  # noqa: E731
                                                          frame_budget, z.dtype)
        pending: list[nn.Module] = [self.conv_in]
        held: list = []
        for op in self._ops():
            if not isinstance(op, SpatioTemporalBlock):
                pending.append(op)
                continue
            tblock = op.temporal_res_block
            h_store, moments = run(src, shape, pending + [op.spatial_res_block], tblock.norm1)
            for old in held:
                store.release(old)
            act1 = _normed(h_store.read, tblock.norm1, moments)
            shape = h_store.frame_shape
            a_store, moments = run(lambda s, e, rows, c=tblock.conv1, a=act1: _tconv(c, a, s, e, frames, rows),
                                   shape, [], tblock.norm2)
            act2 = _normed(a_store.read, tblock.norm2, moments)

            def src(s, e, rows, op=op, h=h_store.read, a=act2):
                spatial = h(s, e, rows)
                return op.time_mixer(spatial, _tconv(op.temporal_res_block.conv2, a, s, e, frames, rows) + spatial)

            pending, held = [], [h_store, a_store]
        out, _ = run(src, shape, pending + [nn.Sequential(self.norm_out, nn.SiLU(), self.conv_out)], None)
        for old in held:
            store.release(old)
        try:
            for s in range(0, frames, chunk):
                yield _tconv(self.time_conv_out, out.read, s, min(frames, s + chunk), frames)
        finally:
            store.release(out)

    def clip_bytes(self, frames: int, pixels: int, dtype: torch.dtype) -> int:
        """Bytes `stream` keeps whole at most for a clip of `frames` frames of `pixels` pixels: three layers of the
        widest level (two of a block, one of the next), and three frames of it for a frame run band by band."""
        return 3 * (frames + 1) * self.conv_out.in_channels * pixels * (torch.finfo(dtype).bits // 8)

    def _ops(self) -> list[nn.Module]:
        """The decoder after conv_in as a flat list: SpatioTemporalBlocks and per-frame modules between them."""
        ops = [self.mid.block_1, self.mid.attn_1, self.mid.block_2]
        for stage in reversed(self.up):
            ops += list(stage.block) + ([stage.upsample] if hasattr(stage, "upsample") else [])
        return ops

    @staticmethod
    def _layer(src: Frames, shape: tuple[int, int, int], modules: list[nn.Module], frames: int, chunk: int, store,
               gn: nn.GroupNorm | None, frame_budget: int | None, dtype: torch.dtype) -> tuple:
        """Run per-frame `modules` over `src` (frames of (C, H, W) `shape`, computed in `dtype`) chunk by chunk
        into a new store; with `gn`, also the whole clip's statistics of the result for that temporal GroupNorm.
        With `frame_budget`, chains `vaecli.layerwise` knows (and pointwise steps, no modules) go frame by frame,
        band by band."""
        groups = gn.num_groups if gn is not None else None
        if frame_budget is not None and (not modules or layerwise.supports(modules)):
            c, h, w = shape
            layer = store.frames(frames, layerwise.chain_shape(modules, shape), dtype)
            row_bytes = w * c * torch.finfo(dtype).bits // 8  # a band of a pointwise step reads 3 frames' rows
            moments, rows = None, max(1, layerwise.io_sizes(store.device, frame_budget)[1] // row_bytes)
            for f in range(frames):
                if modules:
                    part = layerwise.run_rows(modules, lambda r0, r1, f=f: src(f, f + 1, (r0, r1)), shape,
                                              dtype, layer.frame_rows(f), store, frame_budget, groups)
                    moments = merge_moments(moments, part) if groups is not None else None
                    continue
                for r0 in range(0, h, rows):
                    x = src(f, f + 1, (r0, min(h, r0 + rows)))
                    layer.write_region(f, x, r0, 0)
                    if groups is not None:
                        moments = merge_moments(moments, _clip_moments(x, groups))
            return layer, moments
        layer, moments = None, None
        for s in range(0, frames, chunk):
            x = _per_frame(modules, src(s, min(frames, s + chunk), None))
            if layer is None:
                layer = store.frames(frames, tuple(x.shape[1:]), x.dtype)
            layer.write(s, x)
            if groups is not None:
                moments = merge_moments(moments, _clip_moments(x, groups))
            del x
        return layer, moments


def _per_frame(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Per-frame `modules` over (k, C, H, W) frames: the chain `vaecli.banded` knows a band of rows at a time on
    the CPU (the same numbers, each band's work in cache), what it does not know as it is."""
    rest = list(modules)
    while rest and not banded.supports(rest):
        x, rest = rest[0](x), rest[1:]
    if rest and x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last):
        return banded.run_chain(rest, x)
    for module in rest:
        x = module(x)
    return x


def _clip_moments(x: torch.Tensor, groups: int) -> Moments:
    """Moments of (k, C, H, W) frames of one clip, per group over all k frames, as a (1, G) batch."""
    n, mean, m2 = group_moments(x, groups)
    mu = mean.mean(0, keepdim=True)
    return n * x.shape[0], mu, m2.sum(0, keepdim=True) + n * (mean - mu).pow(2).sum(0, keepdim=True)


def _normed(read: Frames, gn: nn.GroupNorm, moments: Moments) -> Frames:
    """Frames of a layer through `gn` with the whole clip's `moments`, then SiLU (a temporal block's conv input)."""
    def frames(s: int, e: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        x = read(s, e, rows)
        scale, shift = norm_affine(gn, moments, x.shape[1])
        return F.silu(torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype)), inplace=True)
    return frames


def _tconv(conv: nn.Conv3d, read: Frames, s: int, e: int, frames: int,
           rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A (3, 1, 1) Conv3d over frames s .. e (rows r0 .. r1 of each, or all) of a T-frame clip, zero-padded at the
    clip's ends only."""
    x = read(max(0, s - 1), min(frames, e + 1), rows)
    pad = [torch.zeros_like(x[:1])]
    x = torch.cat((pad if s == 0 else []) + [x] + (pad if e == frames else []))  # frames s - 1 .. e
    k, weight = e - s, conv.weight.to(x.dtype)
    # out[t] = sum_j W_j x[t - 1 + j]: three 1x1 convolutions, GEMMs on channels_last (oneDNN's Conv3d is slower)
    out = F.conv2d(x[1:k + 1], weight[:, :, 1], conv.bias)
    out += F.conv2d(x[:k], weight[:, :, 0])
    out += F.conv2d(x[2:], weight[:, :, 2])
    return out
