"""TAESD-family tiny autoencoders (taesd, taesdxl, taesd3, taef1, taef2, taesana).

Layer indices follow the original `taesd.py` Sequentials, so the published `*_encoder.pth` /
`*_decoder.pth` state dicts load with a plain strict `load_state_dict` into `.encoder` / `.decoder`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaecli import allocator, banded, fused, metrics, rows, tiling
from vaecli.codec import Codec
from vaecli.registry import ModelSpec, TinyConfig

# On the CPU a pass runs whole only while its widest activation (the network's width over every pixel of its
# images) is at most this, a 512x512 fp32 image's with 64 channels: each larger tensor is a fresh mapping that the
# kernel faults in and zeroes, layer after layer, so row bands, which reuse their windows, finish sooner and hold
# less (bench/whole_or_rows.py).
WHOLE_ACTIVATION_BYTES = 64 << 20


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    """3x3 convolution with 'same' padding."""
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3), as the decoders were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) any range -> same shape in (-3, 3)."""
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block; with `midblock_gn` a 1x1-conv/GroupNorm branch is added first (TAEF2)."""

    def __init__(self, n_in: int, n_out: int, midblock_gn: bool = False):
        super().__init__()
        # In-place ReLUs and add: each acts on a fresh conv output, and saving the copies is ~10% of the time.
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(inplace=True), conv(n_out, n_out), nn.ReLU(inplace=True),
                                  conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU(inplace=True)
        self.pool = None
        if midblock_gn:
            # GroupNorm pools statistics over the whole image: the only non-local op in the family.
            n_gn = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, n_gn, 1, bias=False), nn.GroupNorm(4, n_gn), nn.ReLU(inplace=True),
                nn.Conv2d(n_gn, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor, reuse_input: bool = False) -> torch.Tensor:
        """(B, n_in, H, W) -> (B, n_out, H, W); with `reuse_input` the output may be written over `x`."""
        if self.pool is not None:
            x, reuse_input = x + self.pool(x), True
        if fused.onednn(x):
            c0, _, c1, _, c2 = self.conv
            h = fused.conv_relu(c1, fused.conv_relu(c0, x))
            # Over the input where it is ours to overwrite: one activation-sized allocation fewer per block.
            into = reuse_input and isinstance(self.skip, nn.Identity) and \
                x.is_contiguous(memory_format=torch.channels_last)
            return fused.conv_add_relu(c2, h, self.skip(x), into_other=into)
        h = self.conv(x)
        h += self.skip(x)
        return self.fuse(h)


class Stack(nn.Sequential):
    """nn.Sequential (same state-dict keys) whose Blocks may write over inputs that the stack itself made."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the last layer's output; the caller's `x` is never written to by a Block."""
        storage = x.untyped_storage().data_ptr()
        layers, i = list(self), 0
        while i < len(layers):
            layer, up = layers[i], upsampled_conv(layers, i)
            if up is not None and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
                # Exported graphs keep the reference's upsample and 3x3 conv.
                x, i = banded.upsample_conv(up, x), i + 2
                continue
            if isinstance(layer, Block):
                x = layer(x, reuse_input=x.untyped_storage().data_ptr() != storage)
            elif isinstance(layer, nn.Conv2d) and fused.onednn(x):
                # oneDNN whatever the size, as the row bands run it: torch takes a small image through its own
                # convolution, whose sums round differently from a band's.
                x = fused.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)
            else:
                x = layer(x)
            i += 1
        return x


def upsampled_conv(layers: list[nn.Module], i: int) -> nn.Conv2d | None:
    """The 3x3 'same' convolution after a nearest 2x upsampling at `layers[i]`, which runs as four 2x2 convolutions
    of the source rows (`vaecli.banded.upsample_conv`), or None."""
    c = layers[i + 1] if i + 1 < len(layers) else None
    return c if banded.phased(layers[i], c) else None


def make_encoder(cfg: TinyConfig) -> nn.Sequential:
    """Encoder: pixels (B, 3, H, W) in [0, 1] -> latents (B, C, H/f, W/f)."""
    w, gn = cfg.width, cfg.midblock_gn
    if cfg.encoder_stem:
        stem: list[nn.Module] = []
        n_in = 3
        for n_out in cfg.encoder_stem:
            stem += [conv(n_in, n_out, stride=2), nn.ReLU(inplace=True)]
            n_in = n_out
    else:
        stem = [conv(3, w)]
    return Stack(
        *stem, Block(w, w),
        conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        conv(w, w, stride=2, bias=False), Block(w, w), Block(w, w), Block(w, w),
        conv(w, w, stride=2, bias=False), Block(w, w, gn), Block(w, w, gn), Block(w, w, gn),
        conv(w, cfg.latent_channels),
    )


def make_decoder(cfg: TinyConfig) -> nn.Sequential:
    """Decoder: latents (B, C, h, w) -> pixels (B, 3, 8h, 8w), roughly in [0, 1] (not clamped)."""
    w, gn = cfg.width, cfg.midblock_gn
    return Stack(
        Clamp(), conv(cfg.latent_channels, w), nn.ReLU(inplace=True),
        Block(w, w, gn), Block(w, w, gn), Block(w, w, gn), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
        Block(w, w), Block(w, w), Block(w, w), nn.Upsample(scale_factor=2), conv(w, w, bias=False),
        Block(w, w), conv(w, 3),
    )


class TinyAutoencoder(nn.Module):
    """A TAESD-family autoencoder; either half may be absent (e.g. TAESana has no decoder)."""

    def __init__(self, cfg: TinyConfig, encoder: bool = True, decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg) if encoder else None
        self.decoder = make_decoder(cfg) if decoder else None

    def encoder_segments(self) -> tuple[nn.Sequential, nn.Sequential]:
        """The encoder as (local part up to the last downsampling, the rest at latent resolution)."""
        last_down = max(i for i, m in enumerate(self.encoder) if isinstance(m, nn.Conv2d) and m.stride[0] == 2)
        return self.encoder[: last_down + 1], self.encoder[last_down + 1:]

    def decoder_segments(self) -> tuple[nn.Sequential, nn.Sequential]:
        """The decoder as (the part at latent resolution, holding any GroupNorm; the local rest)."""
        first_up = next(i for i, m in enumerate(self.decoder) if isinstance(m, nn.Upsample))
        return self.decoder[:first_up], self.decoder[first_up:]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of the spatial factor -> latents (B, C, H/f, W/f)."""
        return self.encoder(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> pixels (B, 3, 8h, 8w) clamped to [0, 1]."""
        return self.decoder(latents).clamp(0, 1)


def row_stream(layers: nn.Sequential) -> rows.Chain:
    """A local part of an encoder or decoder (convolutions, ReLUs, nearest upsamplings, Blocks without GroupNorm)
    as a `vaecli.rows` stream."""
    ops, items, i = [], list(layers), 0
    while i < len(items):
        layer = items[i]
        relu = i + 1 < len(items) and isinstance(items[i + 1], nn.ReLU)
        up = upsampled_conv(items, i)
        if up is not None:
            ops.append(rows.Conv(up, upsample=True))
            i += 2
            continue
        if isinstance(layer, nn.Conv2d):
            ops.append(rows.Conv(layer, relu))
            i += 2 if relu else 1
            continue
        if isinstance(layer, Block) and layer.pool is None:
            c0, _, c1, _, c2 = layer.conv
            ops.append(rows.Residual(rows.Chain([rows.Conv(c0, True), rows.Conv(c1, True), rows.Conv(c2)]),
                                     layer.skip))
        elif isinstance(layer, (nn.Upsample, Clamp)):
            ops.append(rows.Pointwise(layer))
        elif isinstance(layer, nn.ReLU):  # not in place: a band may be a view of the caller's input
            ops.append(rows.Pointwise(torch.relu))
        else:
            raise ValueError(f"no row stream for {type(layer).__name__}")
        i += 1
    return rows.Chain(ops)


class Family(Codec):
    """The tiny image family as a codec: the network works in its family's denoiser space. An image past the budget
    (on the CPU, past `WHOLE_ACTIVATION_BYTES` per layer) streams through the local layers band by band of rows
    (`vaecli.rows`: the whole image's numbers, nothing recomputed); `--tile N` runs tiles of N pixels with a halo of
    the network's receptive field instead."""

    @staticmethod
    def build(spec: ModelSpec, encoder: bool = True, decoder: bool = True) -> TinyAutoencoder:
        """An uninitialised network for `spec` with the requested halves."""
        return TinyAutoencoder(spec.config, encoder=encoder, decoder=decoder)

    @staticmethod
    def state_dict(spec: ModelSpec, sd: dict, source: str) -> dict:
        """A checkpoint in any tiny-family layout (`vaecli.checkpoints`), in the network's keys."""
        from vaecli.checkpoints import split_tiny_state_dict

        return {f"{role}.{k}": v for role, part in split_tiny_state_dict(sd, source).items() for k, v in part.items()}

    @classmethod
    def load(cls, spec, sd, sources, roles, device, dtype, tile, budget, scratch) -> Family:
        """`Codec.load`, keeping freed memory in the heap for bf16 on the CPU."""
        if device.type == "cpu" and dtype == "bf16":
            # bf16 is the speed mode: keeping freed 32-64 MB activations in the heap makes taef2's decoder ~1.6x
            # faster at 512x512. Not for fp32 or KL, whose larger activations fragment such a heap (taef2 fp32 at
            # 2048x2048: 1660 MB peak instead of 923).
            allocator.keep_freed_memory()
        return super().load(spec, sd, sources, roles, device, dtype, tile, budget, scratch)

    @property
    def network_space(self) -> str:
        """A tiny model produces and consumes its family's denoiser space."""
        return self.spec.latent_space

    def tile_size(self, pixels: int, batch: int = 1) -> int | None:
        """Tile side in pixels for a pass over `batch` images of `pixels` pixels (a tile spans the whole batch, so its
        side shrinks as the batch grows), or None to run it whole."""
        if self.tile is None:
            return None
        if self.tile != "auto":
            return int(self.tile)
        return tiling.tile_for_budget(pixels, self._bytes_per_pixel() * batch, self._whole_budget(),
                                      self._halo_px(), self.spec.spatial_factor)

    def frame_bytes(self, width: int, height: int) -> tuple[int, int]:
        """Bytes a frame's widest layers take, and what a pass may take whole (within the budget, 1 GiB by default)."""
        return self._bytes_per_pixel() * width * height, self._whole_budget()

    def _budget(self) -> int:
        return self.budget or tiling.default_budget(self.device)

    def _whole_budget(self) -> int:
        """Bytes a pass may take run whole: the budget; on the CPU no more than `WHOLE_ACTIVATION_BYTES` per layer."""
        if self.device.type != "cpu":
            return self._budget()
        return min(self._budget(), WHOLE_ACTIVATION_BYTES * self._bytes_per_pixel() // self._row_bytes())

    def _bytes_per_pixel(self) -> int:
        return self.spec.config.width * 6 * torch.finfo(self.dtype).bits // 8

    def _row_bytes(self) -> int:
        """Bytes per pixel of the widest local layer, per image."""
        return self.spec.config.width * torch.finfo(self.dtype).bits // 8

    def _halo_px(self) -> int:
        """Overlap in pixels the tiles of whichever half is loaded need (their receptive field)."""
        if self.model.encoder is not None:
            return math.ceil(tiling.receptive_radius(self.model.encoder_segments()[0]))
        return math.ceil(tiling.receptive_radius(self.model.decoder_segments()[1]) * self.spec.spatial_factor)

    def encode_raw(self, x: torch.Tensor, sample: bool, seed: int | None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> latents; past the budget the local layers in row bands (or `--tile N` tiles)."""
        tile = self.tile_size(x.shape[-2] * x.shape[-1], x.shape[0])
        if tile is None:
            return self.model.encode(x)
        local, rest = self.model.encoder_segments()
        if self.tile == "auto":
            band = rows.band_rows(x.shape[-1], self._row_bytes() * x.shape[0], budget=self._budget())
            return rest(rows.run(row_stream(local), x, band, 1 / self.spec.spatial_factor))
        f = self.spec.spatial_factor
        return rest(tiling.tiled(local, x, tile, tiling.receptive_radius(local), 1 / f, align=f))

    def decode_raw(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Latents -> pixels in [0, 1]: the part at latent resolution whole; past the budget the rest in row bands (or
        `--tile N` tiles)."""
        f = self.spec.spatial_factor
        tile = self.tile_size(z.shape[-2] * z.shape[-1] * f * f, z.shape[0])
        if tile is None:
            return self.model.decode(z)
        head, local = self.model.decoder_segments()
        h = head(z)
        if self.tile == "auto":
            band = rows.band_rows(h.shape[-1], self._row_bytes() * h.shape[0], f, self._budget())
            return rows.run(row_stream(local), h, band, f).clamp_(0, 1)
        return tiling.tiled(local, h, max(1, tile // f), tiling.receptive_radius(local), f).clamp(0, 1)

    def verify_tiling(self, latent: torch.Tensor, meta: dict, pixels: torch.Tensor) -> dict:
        """Decode a tile-sized window around the first tile seams (band edges, for row streams) untiled, with its
        receptive-field halo (exactly what the whole image gives there), and compare it with `pixels`, the tiled or
        row-streamed (1, 3, H, W) result."""
        f = self.spec.spatial_factor
        tile = self.tile_size(latent.shape[-2] * latent.shape[-1] * f * f)
        if tile is None:
            return {"tiled": False, "max_abs_diff": 0.0, "psnr": float("inf")}
        cells = max(1, tile // f)
        head, local = self.model.decoder_segments()
        halo = math.ceil(tiling.receptive_radius(local))
        h, w = latent.shape[-2:]
        # A tile-sized window straddling the first seams (tiles start at multiples of `cells`).
        y0, x0 = min(cells // 2, max(0, h - cells)), min(cells // 2, max(0, w - cells))
        y1, x1 = min(h, y0 + cells), min(w, x0 + cells)
        with torch.inference_mode():
            top = head(self._decoder_input(latent[None], meta))
            ry0, rx0 = max(0, y0 - halo), max(0, x0 - halo)
            ref = local(top[:, :, ry0:min(h, y1 + halo), rx0:min(w, x1 + halo)]).clamp(0, 1).float().cpu()
        ref = ref[:, :, (y0 - ry0) * f:(y1 - ry0) * f, (x0 - rx0) * f:(x1 - rx0) * f]
        ours = pixels[:, :, y0 * f:y1 * f, x0 * f:x1 * f]
        ref = ref[:, :, :ours.shape[-2], :ours.shape[-1]]
        return {"tiled": True, "window": [x0 * f, y0 * f, x1 * f, y1 * f],
                "max_abs_diff": (ours - ref).abs().max().item(), "psnr": metrics.psnr(ours, ref)}
