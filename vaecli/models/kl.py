"""KL autoencoders of the LDM lineage: SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2 (one implementation, configured).

Module names follow the original LDM/CompVis and BFL checkpoints (`encoder.down.0.block.0.norm1`,
`encoder.mid.attn_1.q`, `decoder.up.3.upsample.conv`, `quant_conv`), so those files load with a plain
strict `load_state_dict`; `vaecli.checkpoints` converts diffusers' names into these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaecli.registry import KLConfig


def norm(channels: int) -> nn.GroupNorm:
    """The GroupNorm used throughout: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        # In place on fresh tensors only: at full resolution every saved copy is hundreds of MB.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        h += x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h


SCORE_BYTES = 1 << 28  # attention scores held at once; queries are taken in chunks beyond it


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact softmax attention of queries (B, heads, N, C) over keys and values (B, heads, M, C) -> (B, heads, N, C)."""
    # SDPA's fused kernels (CPU flash included) hold only blocks of scores; its math path materializes them and their
    # softmax, so queries go in chunks of at most SCORE_BYTES of scores (B x heads x chunk x M) in case it is taken.
    # The fused kernels need unit stride along C; without it SDPA takes the math path, several times slower.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, heads, n, _ = q.shape
    step = max(1, SCORE_BYTES // (max(4, q.element_size()) * b * heads * k.shape[2]))
    if n <= step:
        return F.scaled_dot_product_attention(q, k, v)
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])  # filled in place: a cat of the chunks would hold the output twice
    for i in range(0, n, step):
        out[:, :, i:i + step] = F.scaled_dot_product_attention(q[:, :, i:i + step], k, v)
    return out


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections; exact at every size."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C), C innermost as the fused kernels need: a view when x is channels_last; a copy
        # otherwise, made here so the NCHW projection is freed at once.
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2).contiguous() for proj in (self.q, self.k, self.v))
        y = attention(q, k, v)
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (0, 1, 0, 1) zero pad, as LDM trained it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    scale_factor = 2.0  # read by tiling's receptive-field walk

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """Resnet, self-attention, resnet at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels (B, 3, H, W) in [-1, 1] -> Gaussian moments (B, 2C, H/f, W/f): mean then log-variance."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        n_in = widths[0]
        for level, n_out in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(n_in, n_out))
                n_in = n_out
            if level != len(widths) - 1:
                stage.downsample = Downsample(n_out)
            self.down.append(stage)
        self.mid = MidBlock(n_in)
        self.norm_out = norm(n_in)
        self.conv_out = nn.Conv2d(n_in, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2C, H/f, W/f)."""
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=True))


def up_stages(cfg: KLConfig, block: type[nn.Module]) -> nn.ModuleList:
    """The decoder's levels, `up[i]` at level i: `num_res_blocks + 1` blocks each, then an upsample (not level 0)."""
    widths = [cfg.channels * m for m in cfg.channel_mult]
    n_in, up = widths[-1], []
    for level in reversed(range(len(widths))):
        stage = nn.Module()
        stage.block = nn.ModuleList()
        for _ in range(cfg.num_res_blocks + 1):
            stage.block.append(block(n_in, widths[level]))
            n_in = widths[level]
        if level != 0:
            stage.upsample = Upsample(n_in)
        up.insert(0, stage)
    return nn.ModuleList(up)


class Decoder(nn.Module):
    """Latents (B, C, h, w) -> pixels (B, 3, f*h, f*w) in about [-1, 1]; `up[i]` is level i, applied deepest first."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        n_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, n_in, 3, padding=1)
        self.mid = MidBlock(n_in)
        self.up = up_stages(cfg, ResnetBlock)
        self.norm_out = norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, f*h, f*w)."""
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class KLAutoencoder(nn.Module):
    """A KL autoencoder; `encode`/`decode` work in [0, 1] pixels and raw (unscaled) latents."""

    def __init__(self, cfg: KLConfig, encoder: bool = True, decoder: bool = True,
                 decoder_cls: type[nn.Module] | None = None):
        super().__init__()
        self.cfg = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg) if encoder else None
        # SVD passes its TemporalDecoder (`vaecli.models.temporal`, which builds on this module).
        self.decoder = (decoder_cls or Decoder)(cfg) if decoder else None
        post_quant = cfg.quant_conv if cfg.post_quant_conv is None else cfg.post_quant_conv
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.quant_conv and encoder else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if post_quant and decoder else None
        # FLUX.2: running statistics of the 2x2-patchified latents, used to normalize them for the denoiser.
        p = cfg.patch_size
        self.bn = (nn.BatchNorm2d(c * p * p, eps=cfg.batch_norm_eps, affine=False)
                   if cfg.batch_norm else None)

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> posterior mean and log-variance, each (B, C, H/f, W/f)."""
        h = self.encoder(pixels * 2 - 1)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return self.split_moments(h)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False, moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> raw latents (B, C, H/f, W/f): the posterior mode, or a draw if `sample`
        (from `moments` when the caller computed them, e.g. tiled)."""
        mean, logvar = moments or self.moments(pixels)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> pixels (B, 3, f*h, f*w) clamped to [0, 1].

        A temporal decoder treats the batch as clips of `num_frames` consecutive frames (default: one clip).
        """
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        if self.cfg.temporal_decoder:
            pixels = self.decoder(z, num_frames or z.shape[0])
        else:
            pixels = self.decoder(z)
        return ((pixels + 1) / 2).clamp(0, 1)

    def encoder_plan(self) -> tuple[list[nn.Module], nn.Module]:
        """The encoder as a chain of local blocks (for `tiling.streamed`, on pixels in [-1, 1]) and a tail run whole
        at latent resolution (mid-block attention, output conv, quant_conv) giving the moments."""
        e = self.encoder
        blocks = [e.conv_in] + [b for stage in e.down for b in (*stage.block, getattr(stage, "downsample", None))
                                if b is not None]
        tail = [e.mid, e.norm_out, nn.SiLU(), e.conv_out] + ([self.quant_conv] if self.quant_conv is not None else [])
        return blocks, nn.Sequential(*tail)

    def decoder_plan(self) -> tuple[nn.Module, list[nn.Module]]:
        """The 2-D decoder as a head run whole at latent resolution (post_quant_conv, conv_in, mid-block attention)
        and a chain of local blocks for `tiling.streamed`, ending in pixels in about [-1, 1]."""
        d = self.decoder
        head = [m for m in (self.post_quant_conv, d.conv_in, d.mid) if m is not None]
        blocks = [b for stage in reversed(d.up) for b in (*stage.block, getattr(stage, "upsample", None))
                  if b is not None]
        return nn.Sequential(*head), blocks + [nn.Sequential(d.norm_out, nn.SiLU(), d.conv_out)]

    def split_moments(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's (B, 2C, h, w) output -> posterior mean and clamped log-variance, each (B, C, h, w)."""
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """FLUX.2: raw (B, C, h, w) -> patchified, batch-norm-normalized (B, 4C, h/2, w/2), as the denoiser takes."""
        b, c, h, w = z.shape
        p = self.cfg.patch_size
        z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)
        mean, std = self._bn_stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """FLUX.2: the inverse of `normalize`, (B, 4C, h/2, w/2) -> raw (B, C, h, w)."""
        mean, std = self._bn_stats(z)
        z = z * std + mean
        b, cp, h, w = z.shape
        p = self.cfg.patch_size
        c = cp // (p * p)
        return z.reshape(b, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * p)

    def _bn_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(z.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.cfg.batch_norm_eps).to(z.dtype)
        return mean, std
