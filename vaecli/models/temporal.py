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

from vaecli import banded, layerwise, metrics, scratch, tiling
from vaecli.codec import check_room
from vaecli.errors import UsageError
from vaecli.models.kl import AttnBlock, KLAutoencoder, ResnetBlock, norm, up_stages
from vaecli.models.kl_family import Family as KLFamily
from vaecli.registry import KLConfig, ModelSpec
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
    clip's ends only: (e - s, C, h, w) channels_last."""
    lo = max(0, s - 1)
    x = read(lo, min(frames, e + 1), rows)
    n, c, h, w = x.shape
    weight = conv.weight.to(x.dtype)[:, :, :, 0, 0]  # (C', C, 3)
    taps = [weight[:, :, j].t() for j in range(3)]  # out[t] = sum_j x[t - 1 + j] @ W_j^T, per pixel
    out = torch.empty(e - s, weight.shape[0], h, w, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    pixels = x.permute(0, 2, 3, 1)  # channels_last frames as (h, w, C) matrices of pixels, views
    result = out.permute(0, 2, 3, 1)
    # Three GEMMs per frame, accumulated in place (oneDNN's Conv3d, or three 1x1 conv2d over a padded copy, are
    # slower); the clip's ends simply have fewer taps, which is the zero padding.
    for t in range(e - s):
        o = result[t].reshape(h * w, -1)
        centre = s + t - lo
        if conv.bias is not None:
            torch.addmm(conv.bias.to(x.dtype), pixels[centre].reshape(h * w, c), taps[1], out=o)
        else:
            torch.mm(pixels[centre].reshape(h * w, c), taps[1], out=o)
        if s + t > 0:
            o.addmm_(pixels[centre - 1].reshape(h * w, c), taps[0])
        if s + t + 1 < frames:
            o.addmm_(pixels[centre + 1].reshape(h * w, c), taps[2])
    return out
class Family(KLFamily):
    """SVD as a codec (`vaecli.families`): the KL encoder, frame by frame; the temporal decoder over a whole clip,
    streamed `--chunk` frames at a time through layers kept whole (in RAM within the budget, in scratch files past
    it), exactly as if the clip were decoded at once."""

    @staticmethod
    def build(spec: ModelSpec, encoder: bool = True, decoder: bool = True) -> KLAutoencoder:
        """An uninitialised network for `spec`: a KL encoder and the temporal decoder."""
        return KLAutoencoder(spec.config, encoder=encoder, decoder=decoder, decoder_cls=TemporalDecoder)

    @classmethod
    def load(cls, spec, sd, sources, roles, device, dtype, tile, budget, scratch) -> Family:
        """`Codec.load`; a fixed `--tile` is refused for the decoder, which tiles over frames."""
        if isinstance(tile, int) and "decoder" in roles:
            raise UsageError(f"--tile {tile}: {spec.name}'s temporal decoder tiles over frames (--chunk), not space")
        return super().load(spec, sd, sources, roles, device, dtype, tile, budget, scratch)

    @property
    def mixes_frames(self) -> bool:
        """Whether the decoder is loaded: it mixes the frames of a clip, which then decodes as a whole."""
        return self.model.decoder is not None

    def frame_bytes(self, width: int, height: int) -> tuple[int, int]:
        """The temporal decoder's working set per frame (its widest layer, ~8 copies) and the budget frame chunks
        and whole-clip layers share; the encoder's as the KL family's."""
        if not self.mixes_frames:
            return super().frame_bytes(width, height)
        return self._clip_frame_bytes(width * height), self._clip_budget()

    def _clip_budget(self) -> int:
        # What does not fit goes to scratch files, so the default is the tiny family's (1 GiB), not half the RAM: a
        # clip's layers live in the page cache, not the process.
        return self.budget or tiling.default_budget(self.device)

    def _clip_frame_bytes(self, pixels: int) -> int:
        cfg = self.spec.config
        return cfg.channels * cfg.channel_mult[0] * pixels * 8 * tiling.DTYPE_BYTES

    def decode_raw(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Raw latents (T, C, h, w) of one clip -> its pixels in [0, 1], by the plain forward over all of it."""
        return self.model.decode(z, num_frames)

    def decode_stream(self, read, frames: int, meta: dict, chunk: int | None = None) -> Iterator[torch.Tensor]:
        """The `frames` latents of one clip (`read(i, j)`: frames i .. j) -> its pixels as (k, 3, H, W) chunks in
        [0, 1], `chunk` frames at a time (None: as many as fit the budget), equal to the whole clip decoded at once:
        the layers the decoder needs whole are kept in RAM within the budget and in scratch files past it."""
        self._check_decode(chunk)
        with torch.inference_mode():
            z = self._decoder_input(read(0, frames), meta)
            if self.model.post_quant_conv is not None:
                z = self.model.post_quant_conv(z)
        f = self.spec.spatial_factor
        pixels = z.shape[-2] * z.shape[-1] * f * f
        chunk = chunk or self.frames_per_pass((z.shape[-1] * f, z.shape[-2] * f))
        budget, per_frame = self._clip_budget(), self._clip_frame_bytes(pixels)
        # A frame that alone passes the budget goes band by band (half the budget for its bands and buffers).
        frame_budget = budget // 2 if per_frame > budget else None
        store = scratch.Scratch(budget // 2 if frame_budget else max(0, budget - chunk * per_frame), self.device,
                                self.scratch_dir)
        store.check_space(self.model.decoder.clip_bytes(frames, pixels, z.dtype) - store.budget)
        try:
            with torch.inference_mode():
                stream = self.model.decoder.stream(z, chunk, store, frame_budget)
            while True:
                with torch.inference_mode():
                    part = next(stream, None)
                    if part is None:
                        break
                    out = self._cropped(((part + 1) / 2).clamp(0, 1), meta)
                self.scratch_bytes = max(self.scratch_bytes, store.peak_file_bytes)
                yield out
        finally:
            store.close()

    def verify_tiling(self, latent: torch.Tensor, meta: dict, pixels: torch.Tensor) -> dict:
        """`--verify` of a one-frame clip: compared with the plain forward over it."""
        ref = self.whole_clip(latent[None], meta)
        return {"tiled": True, "window": [0, 0, ref.shape[-1], ref.shape[-2]],
                "max_abs_diff": (pixels - ref).abs().max().item(), "psnr": metrics.psnr(pixels, ref)}

    def reference_frames(self, read, frames: int, meta: dict) -> tuple[Iterator[torch.Tensor], str]:
        """`--verify` of a latent clip: the temporal decoder's plain forward over the whole clip at once."""
        return iter([self.whole_clip(read(0, frames), meta)]), "the whole clip decoded at once"

    def whole_clip(self, latents: torch.Tensor, meta: dict) -> torch.Tensor:
        """(T, C, h, w) latents of one clip -> (T, 3, H, W) pixels in [0, 1] by the temporal decoder's plain forward
        over the whole clip at once (the reference `--verify` compares the streamed decode with); a UsageError when
        that would not fit in half the available memory."""
        h, w = latents.shape[-2:]
        f = self.spec.spatial_factor
        check_room(self.device, latents.shape[0] * self._clip_frame_bytes(h * w * f * f), "decoding the clip whole")
        with torch.inference_mode():
            pixels = self.model.decode(self._decoder_input(latents, meta), latents.shape[0])
        return self._cropped(pixels, meta)
