"""The Wan causal 3D video VAE: Wan 2.1 (also Wan 2.2 14B and Qwen-Image) and Wan 2.2 5B (48 channels, 2x2 patchify).

Module names are diffusers' (`AutoencoderKLWan`, `AutoencoderKLQwenImage`), so `vae/diffusion_pytorch_model.safetensors`
loads with a strict `load_state_dict`; `vaecli.models.wan_keys` renames the original checkpoints (`Wan2.1_VAE.pth`,
`Wan2.2_VAE.pth`). Clips are (B, 3, T, H, W) in [0, 1]; T = 1 + 4k frames give 1 + k latent frames, an image is T = 1.
Everything runs chunk by chunk over time (as Wan does: the first frame, then groups of 4; decoding one latent frame at
a time) with each causal convolution carrying its last input frames across chunks, so `stream_encoder()` and
`stream_decoder()` give exactly the whole-clip result in memory that does not grow with the clip's length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaecli.causal import CausalFamily
from vaecli.clip_tiles import Split, local_cost
from vaecli.models.kl import attention
from vaecli.models.wan22 import avg_down, dup_up, patchify, unpatchify
from vaecli.models.wan_keys import original_to_diffusers
from vaecli.registry import WAN21_CONFIG, WAN22_CONFIG, WanConfig

CACHE_T = 2  # frames of the previous chunk a kernel-3 causal convolution needs
Cache = dict  # module -> its carried state; one per stream


WAN21, QWEN_IMAGE, WAN22 = WAN21_CONFIG, WAN21_CONFIG, WAN22_CONFIG  # registry names, kept for callers
CONFIGS = {"wan2.1": WAN21, "wan2.2": WAN22, "qwen-image": QWEN_IMAGE}


def frames_used(n: int) -> int:
    """The frames of an n-frame clip that are encoded: the largest 1 + 4k <= n (the rest are dropped, as in Wan)."""
    if n < 1:
        raise ValueError("a clip needs at least one frame")
    return 1 + 4 * ((n - 1) // 4)


class CausalConv3d(nn.Conv3d):
    """A 3D convolution padded only into the past: with zeros, or with the frames the cache kept from the last chunk."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride)
        p = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad, self.space_pad = 2 * p[0], (p[2], p[2], p[1], p[1])

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C', T', H', W'), continuing the previous chunk of the same stream when cached."""
        prev = None
        if cache is not None and self.time_pad:
            prev = cache.get(self)
            keep = x[:, :, -CACHE_T:]
            if keep.shape[2] < CACHE_T and prev is not None:
                keep = torch.cat([prev[:, :, -1:], keep], 2)
            cache[self] = keep.clone()  # a copy: a view would hold the whole chunk until the next one
            if prev is not None:
                x = torch.cat([prev, x], 2)
        pad_t = self.time_pad - (0 if prev is None else prev.shape[2])
        return super().forward(F.pad(x, self.space_pad + (pad_t, 0)))


class RMSNorm(nn.Module):
    """Channel-wise RMS normalization with a learned gain (`gamma`), over (B, C, ...) inputs."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) -> (B, C, ...)."""
        y = F.normalize(x if x.dtype == torch.float32 else x.float(), dim=1).to(x.dtype)  # half would lose the sum
        return y * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """RMSNorm-SiLU-causal conv twice, with a 1x1x1 `conv_shortcut` when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = RMSNorm(cin), CausalConv3d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = RMSNorm(cout), CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, C_out, T, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame, with 1x1-conv projections."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, T, H, W)."""
        b, c, t, h, w = x.shape
        y = self.to_qkv(self.norm(x.transpose(1, 2).reshape(b * t, c, h, w)))
        q, k, v = y.reshape(b * t, 1, 3 * c, h * w).transpose(-1, -2).chunk(3, dim=-1)
        y = self.proj(attention(q, k, v).transpose(-1, -2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial down/upsampling per frame (`resample.1`), and for the 3d modes 2x in time (`time_conv`)."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C', T', 2H or H/2, 2W or W/2); 3d modes: T' = 2T or T/2 after the first chunk."""
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            if self not in cache:  # the first latent frame gives one frame, later ones two; zeros precede the second
                cache[self] = True
                cache[self.time_conv] = x.new_zeros(b, c, CACHE_T, h, w)
            else:
                x = self.time_conv(x, cache).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)
                t *= 2
                x = x.reshape(b, c, t, h, w)
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:  # the first chunk (one frame) passes through unchanged
                x = self.time_conv(torch.cat([prev, x], 2))
        return x


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, C, T, h, w) -> (B, C, T, h, w)."""
        return self.resnets[1](self.attentions[0](self.resnets[0](x, cache)), cache)


class DownBlock(nn.Module):
    """Wan 2.2's encoder level: residual blocks and a downsampler, plus the `avg_down` shortcut around them."""

    def __init__(self, cin: int, cout: int, n: int, t_down: bool, down: bool):
        super().__init__()
        self.shortcut = (cout, 2 if t_down else 1, 2 if down else 1)
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout) for i in range(n)])
        self.downsampler = Resample(cout, "downsample3d" if t_down else "downsample2d") if down else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, C_out, T', H', W')."""
        h = x
        for block in self.resnets:
            h = block(h, cache)
        if self.downsampler is not None:
            h = self.downsampler(h, cache)
        return h + avg_down(x, *self.shortcut)


class UpBlock(nn.Module):
    """A decoder level: residual blocks then an upsampler (`upsamplers.0`; Wan 2.2: `upsampler` plus `dup_up`)."""

    def __init__(self, cin: int, cout: int, n: int, mode: str | None, residual: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout) for i in range(n)])
        self.residual, self.shortcut = residual, None
        if residual:
            self.upsampler = Resample(cout, mode, cout) if mode else None
            if mode:
                self.shortcut = (cout, 2 if mode == "upsample3d" else 1, 2)
        else:
            self.upsamplers = nn.ModuleList([Resample(cout, mode)]) if mode else None

    def forward(self, x: torch.Tensor, cache: Cache, first: bool) -> torch.Tensor:
        """(B, C_in, T, h, w) -> (B, C_out, T', 2h or h, 2w or w)."""
        h = x
        for block in self.resnets:
            h = block(h, cache)
        up = self.upsampler if self.residual else (self.upsamplers[0] if self.upsamplers else None)
        if up is not None:
            h = up(h, cache)
        return h if self.shortcut is None else h + dup_up(x, *self.shortcut, first)


class Encoder(nn.Module):
    """One chunk of pixels (B, 3p^2, T, H, W) in [-1, 1] -> Gaussian moments (B, 2z, T', H/8, W/8)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv_in = CausalConv3d(3 * cfg.patch_size**2, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
            t_down = i != last and cfg.temperal_downsample[i]
            if cfg.is_residual:
                self.down_blocks.append(DownBlock(cin, cout, cfg.num_res_blocks, t_down, i != last))
                continue
            for j in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(cin if j == 0 else cout, cout))
            if i != last:
                self.down_blocks.append(Resample(cout, "downsample3d" if t_down else "downsample2d"))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, 3p^2, T, H, W) -> (B, 2z, T', H/8, W/8), continuing the stream's previous chunks."""
        return self.whole(self.local(x, cache), cache)

    def local(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """The convolutions before the mid block (they tile): (B, 3p^2, T, H, W) -> (B, C, T', H/8, W/8)."""
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        return x

    def whole(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """The mid block (attention over whole latent frames) and the output head: (B, C, T, h, w) -> (B, 2z, ...)."""
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x, cache))), cache)


class Decoder(nn.Module):
    """One latent frame (B, z, 1, h, w) -> pixels (B, 3p^2, 1 (first) or 4, 8h, 8w) in about [-1, 1]."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.decoder_base_dim or cfg.base_dim
        dims = [d * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        t_up, last = cfg.temperal_downsample[::-1], len(cfg.dim_mult) - 1
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
            mode = None if i == last else ("upsample3d" if t_up[i] else "upsample2d")
            if i > 0 and not cfg.is_residual:  # Wan 2.1's upsamplers halve the width
                cin //= 2
            self.up_blocks.append(UpBlock(cin, cout, cfg.num_res_blocks + 1, mode, cfg.is_residual))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 3 * cfg.patch_size**2, 3, padding=1)

    def forward(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, z, 1, h, w) -> (B, 3p^2, T, 8h, 8w), continuing the stream's previous frames."""
        first = self.conv_in not in cache
        return self.local(self.whole(z, cache), cache, first)

    def whole(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        """The part run on whole frames: input conv, mid block (attention within each latent frame) and the first up
        block, whose halo would be the widest of any tile's: (B, z, 1, h, w) -> (B, C, 1 or 2, 2h, 2w)."""
        first = self.conv_in not in cache
        return self.up_blocks[0](self.mid_block(self.conv_in(z, cache), cache), cache, first)

    def local(self, x: torch.Tensor, cache: Cache, first: bool) -> torch.Tensor:
        """The rest, convolutions that tile: (B, C, k, 2h, 2w) -> (B, 3p^2, 1 (`first`) or 4, 8h, 8w)."""
        for block in self.up_blocks[1:]:
            x = block(x, cache, first)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class WanVAE(nn.Module):
    """A Wan VAE; `encode`/`decode` take clips (B, 3, T, H, W) in [0, 1] and raw latents (B, z, 1 + (T-1)//4, h, w)."""

    def __init__(self, cfg: WanConfig, encoder: bool = True, decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        z = cfg.z_dim
        self.encoder = Encoder(cfg) if encoder else None
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1) if encoder else None
        self.post_quant_conv = CausalConv3d(z, z, 1) if decoder else None
        self.decoder = Decoder(cfg) if decoder else None

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W) in [0, 1] -> posterior mean and clamped log-variance, each (B, z, 1 + (T-1)//4, h, w)."""
        mean, logvar = StreamEncoder(self).push_moments(pixels).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [0, 1] -> posterior mean (B, z, 1 + (T-1)//4, H/f, W/f); frames past 1 + 4k dropped."""
        return StreamEncoder(self).push(pixels)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, z, n, h, w) -> pixels (B, 3, 1 + 4(n-1), f*h, f*w) clamped to [0, 1]."""
        return StreamDecoder(self).push(z)

    def stream_encoder(self) -> StreamEncoder:
        """A fresh exact chunked encoder over one clip (see `StreamEncoder`)."""
        return StreamEncoder(self)

    def stream_decoder(self) -> StreamDecoder:
        """A fresh exact chunked decoder over one latent clip (see `StreamDecoder`)."""
        return StreamDecoder(self)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, z, ...) -> the denoiser's space (z - latents_mean) / latents_std, per channel."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents (B, z, ...) -> raw latents; the inverse of `normalize`."""
        mean, std = self._stats(z)
        return z * std + mean

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return tuple(torch.tensor(v, dtype=z.dtype, device=z.device).view(shape)
                     for v in (self.cfg.latents_mean, self.cfg.latents_std))


class StreamEncoder:
    """Exact chunked encoding of one clip: `push` pixel frames (B, 3, n, H, W) in [0, 1], any n, as they come.

    Returns the latent frames (B, z, k, H/f, W/f) they complete (k may be 0): frame 0 gives latent 0, then each 4
    frames one more. Holds at most 3 pending frames plus each causal conv's last 2 input frames, whatever the clip's
    length. `flush()` ends the clip: returns how many trailing frames (fewer than 4) were dropped, and resets.
    Runs without gradients.
    """

    def __init__(self, model: WanVAE):
        self.model, self.cache, self.pending, self.started = model, {}, None, False

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, n, H, W) in [0, 1] -> posterior means (B, z, k, H/f, W/f) of the latent frames now complete."""
        return self.push_moments(frames)[:, :self.model.cfg.z_dim].contiguous()  # a view would keep the logvars

    @torch.no_grad()
    def push_moments(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, n, H, W) in [0, 1] -> the encoder's moments (B, 2z, k, H/f, W/f): mean, then log-variance."""
        f = self.model.cfg.spatial_factor
        b, _, _, h, w = frames.shape
        if h % f or w % f:
            raise ValueError(f"frame size {w}x{h} is not a multiple of {f}")
        x = frames if self.pending is None else torch.cat([self.pending, frames], 2)
        out = [frames.new_empty(b, 2 * self.model.cfg.z_dim, 0, h // f, w // f)]
        while x.shape[2] >= (need := 4 if self.started else 1):
            chunk = patchify(x[:, :, :need] * 2 - 1, self.model.cfg.patch_size)
            out.append(self.model.quant_conv(self.model.encoder(chunk, self.cache)))
            x, self.started = x[:, :, need:], True
        self.pending = x.clone() if x.shape[2] else None  # a copy: a view would hold the caller's whole chunk
        return torch.cat(out, 2)

    def flush(self) -> int:
        """End the clip: the number of trailing frames dropped (frames past the last 1 + 4k); the stream resets."""
        dropped = 0 if self.pending is None else self.pending.shape[2]
        self.cache, self.pending, self.started = {}, None, False
        return dropped


class StreamDecoder:
    """Exact chunked decoding of one latent clip: `push` raw latent frames (B, z, n, h, w), any n, in order.

    Returns their pixels (B, 3, m, f*h, f*w) in [0, 1]: the clip's first latent frame gives 1 frame, each later one 4.
    Holds only each causal conv's last 2 input frames between pushes. `flush()` ends the clip (returns 0, nothing is
    dropped) and resets. Runs without gradients.
    """

    def __init__(self, model: WanVAE):
        self.model, self.cache = model, {}

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, n, h, w) raw latents -> (B, 3, m, f*h, f*w) pixels in [0, 1]."""
        m, p = self.model, self.model.cfg.patch_size
        b, _, n, h, w = z.shape
        out = [z.new_empty(b, 3, 0, h * m.cfg.spatial_factor, w * m.cfg.spatial_factor)]
        for i in range(n):
            x = unpatchify(m.decoder(m.post_quant_conv(z[:, :, i:i + 1]), self.cache), p)
            out.append((x.clamp(-1.0, 1.0) + 1) / 2)
        return torch.cat(out, 2)

    def flush(self) -> int:
        """End the clip and reset; returns 0 (every pushed latent frame was decoded)."""
        self.cache = {}
        return 0


class Family(CausalFamily):
    """vaecli's interface to this family (`vaecli.causal`): build, checkpoint keys, and clip streams on (T, C, h, w)
    latent frames and (T, 3, H, W) pixel frames in [0, 1], one clip at a time."""

    network_space = "raw"  # the encoder gives the posterior itself; the denoiser's space is per-channel normalized
    posterior = True  # the encoder streams give the posterior's moments: mean, then log-variance, on channels

    @staticmethod
    def build(spec, encoder: bool = True, decoder: bool = True) -> WanVAE:
        """An uninitialised network for registry entry `spec` with the requested halves."""
        return WanVAE(spec.config, encoder=encoder, decoder=decoder)

    @staticmethod
    def state_dict(spec, sd: dict, source: str) -> dict:
        """A checkpoint in the original Wan or diffusers layout, in this module's (diffusers') keys."""
        from vaecli.errors import WeightsError

        try:
            return original_to_diffusers(sd, spec.config)
        except ValueError as exc:
            raise WeightsError(f"{source}: {exc}") from None

    @staticmethod
    def encoder(model: WanVAE) -> _Frames:
        """A stream: push((k, 3, H, W) frames) -> the posterior's moments (k', 2C, h, w) of the raw latent frames;
        flush() -> (latents, dropped)."""
        stream = model.stream_encoder()
        return _Frames(lambda x: stream.push_moments(x.movedim(0, 1)[None])[0].movedim(1, 0),
                       lambda: (None, stream.flush()))

    @staticmethod
    def decoder(model: WanVAE, n_latents: int) -> _Frames:
        """A stream: push((k, C, h, w) raw latent frames) -> pixel frames (k', 3, H, W); flush() -> None."""
        stream = model.stream_decoder()
        return _Frames(lambda z: stream.push(z.movedim(0, 1)[None])[0].movedim(1, 0), lambda: stream.flush() and None)

    @staticmethod
    def chunks(model: WanVAE, frames: int) -> list[tuple[int, int]]:
        """The encoder's temporal steps over a clip of `frames` frames (1 + 4k used), each giving one latent frame."""
        return [(0, 1)] + [(a, a + 4) for a in range(1, frames_used(frames), 4)]

    @staticmethod
    def frame_counts(model: WanVAE, n_latents: int) -> list[int]:
        """Frames each of a clip's `n_latents` latent frames decodes to: 1, then 4 each."""
        return [1] + [4] * (n_latents - 1) if n_latents else []

    @staticmethod
    def decoder_split(model: WanVAE, n_latents: int | None = None) -> Split:
        """The decoder cut for tiles of the first up block's output cells (2x the latent's): that block and those
        before it whole, the rest tiled."""
        dec, p, dtype = model.decoder, model.cfg.patch_size, next(model.decoder.parameters()).dtype
        halo, unit_bytes = local_cost(nn.Sequential(dec.up_blocks[1:], dec.conv_out), 4, dtype.itemsize)

        def whole(z, cache):
            return dec.whole(model.post_quant_conv(z.to(dtype)), cache)

        def local(x, cache, first):
            return (unpatchify(dec.local(x.to(dtype), cache, first), p).clamp(-1.0, 1.0) + 1) / 2

        return Split(whole, local, halo, model.cfg.spatial_factor / 2, 1, unit_bytes, model.cfg.spatial_factor / 2)

    @staticmethod
    def encoder_split(model: WanVAE) -> Split:
        """The encoder cut for tiles of pixels: the convolutions before the mid block tiled, the rest whole."""
        enc, p, dtype = model.encoder, model.cfg.patch_size, next(model.encoder.parameters()).dtype
        f = model.cfg.spatial_factor
        halo, unit_bytes = local_cost(nn.Sequential(enc.conv_in, enc.down_blocks), 4, dtype.itemsize, p)

        def local(x, cache, first):
            return enc.local(patchify(x.to(dtype) * 2 - 1, p), cache)

        def whole(x, cache):
            return model.quant_conv(enc.whole(x.to(dtype), cache))

        return Split(whole, local, halo, 1 / f, f, unit_bytes, 1)


class _Frames:
    """A push/flush stream over frame-major tensors (T, C, H, W)."""

    def __init__(self, push, flush):
        self.push, self.flush = push, flush
