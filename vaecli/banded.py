"""KL blocks run whole-image but a band of rows at a time: the numbers of running them whole, in less memory.

A GroupNorm needs statistics of its whole input, so block inputs stay whole; what runs in bands is everything
after the statistics: normalise, SiLU, upsample, convolve and add the residual, a few rows of output at a time
into the output tensor. So the full-size normalised and upsampled copies are never made, each band's work stays
in cache, and a resnet block writes its output over the rows of its input it has consumed: sd15's 1024x1024
decode peaks at its input plus one half-width tensor instead of three full-width ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaecli import allocator, tiling, winograd

BAND_BYTES = 4 << 20  # input bytes read per band: a couple of L2 caches' worth


def supports(blocks: list[nn.Module]) -> bool:
    """Whether every block is one `run_block` knows (the KL decoder and encoder chains are)."""
    from vaecli.models.kl import Downsample, ResnetBlock, Upsample

    return all(isinstance(b, (ResnetBlock, Upsample, Downsample)) or _is_out_head(b) or _is_plain_conv(b)
               for b in blocks)


def run_chain(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run a chain of KL blocks on (B, C, H, W) in any range, banded; `x` is consumed (overwritten)."""
    for block in blocks:
        x = run_block(block, x)
        allocator.release_free_memory()
    return x


def run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One KL block on a whole (B, C, H, W) tensor, banded; may overwrite `x`."""
    from vaecli.models.kl import ResnetBlock, Upsample

    if isinstance(block, ResnetBlock):
        return _resnet(block, x)
    if isinstance(block, Upsample):
        return upsample_conv(block.conv, x)
    if _is_plain_conv(block):
        return _conv(block, x, _empty(x, block.out_channels))
    if _is_out_head(block):
        norm, _, conv = block
        return _conv(conv, x, _empty(x, conv.out_channels), affine=group_affine(x, norm))
    return block(x)


def group_affine(x: torch.Tensor, gn: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm `gn` of (B, C, H, W) `x` as a per-channel scale and shift, each (B, C, 1, 1) float32."""
    parts: dict[tuple[int, int], tiling.Moments] = {}  # per run of samples, merged over its row bands
    for b0, b1, r0, r1 in _windows(x, x.shape[-2]):
        parts[b0, b1] = tiling.merge_moments(parts.get((b0, b1)),
                                             tiling.group_moments(x[b0:b1, :, r0:r1], gn.num_groups))
    n = next(iter(parts.values()))[0]
    moments = (n, torch.cat([m[1] for m in parts.values()]), torch.cat([m[2] for m in parts.values()]))
    scale, shift = tiling.norm_affine(gn, moments, x.shape[1])
    return scale.float(), shift.float()


def _is_plain_conv(block: nn.Module) -> bool:
    return isinstance(block, nn.Conv2d) and block.stride == (1, 1) and block.padding[0] * 2 + 1 == block.kernel_size[0]


def _is_out_head(block: nn.Module) -> bool:
    return (isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[0], nn.GroupNorm)
            and isinstance(block[1], nn.SiLU) and isinstance(block[2], nn.Conv2d))


def _empty(x: torch.Tensor, channels: int, scale: int = 1) -> torch.Tensor:
    b, _, h, w = x.shape
    return torch.empty(b, channels, h * scale, w * scale, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _windows(x: torch.Tensor, rows: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, r0, r1) windows of samples and rows covering `rows` rows of every sample of `x`, each reading about
    BAND_BYTES (at least one row of one sample): row bands of one sample at a time while a sample is larger than
    that (a clip's frames, each band as thick as in an image of that width), else runs of whole samples."""
    b = x.shape[0]
    per_row = max(1, x.shape[1] * x.shape[-1] * x.element_size())
    step = max(1, BAND_BYTES // per_row)
    if step < rows:
        return [(i, i + 1, r0, min(rows, r0 + step)) for i in range(b) for r0 in range(0, rows, step)]
    run = max(1, BAND_BYTES // (per_row * rows))
    return [(b0, min(b, b0 + run), 0, rows) for b0 in range(0, b, run)]


def _resnet(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = _conv(block.conv1, x, _empty(x, block.conv1.out_channels), affine=group_affine(x, block.norm1))
    c_in, c_out = x.shape[1], h.shape[1]
    if block.nin_shortcut is None:
        out = x  # each band's residual rows are read just before its output overwrites them
    elif c_out <= c_in and x.is_contiguous(memory_format=torch.channels_last):
        # Windows go sample by sample, row band by row band: the output's window fills bytes of input samples and
        # rows before the window's end, all consumed by then (the shortcut is 1x1).
        out = x.permute(0, 2, 3, 1).reshape(-1)[:h.numel()].view(x.shape[0], *h.shape[2:], c_out) \
            .permute(0, 3, 1, 2)
    else:
        out = _empty(h, c_out)
    return _conv(block.conv2, h, out, affine=group_affine(h, block.norm2), residual=x,
                 shortcut=block.nin_shortcut)


def _conv(conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor, affine=None, residual: torch.Tensor | None = None,
          shortcut: nn.Conv2d | None = None) -> torch.Tensor:
    """out[rows] = conv(silu(x * scale + shift) or x)[rows] (+ residual, through `shortcut`), band by band."""
    pad, height = conv.padding[0], x.shape[-2]
    u = winograd.prepare(conv.weight, x.dtype, x.device)
    for b0, b1, r0, r1 in _windows(x, out.shape[-2]):
        c0, c1 = max(0, r0 - pad), min(height, r1 + pad)  # input rows read; zero rows pad the image edges
        t = x[b0:b1, :, c0:c1]
        if affine is not None:
            t = F.silu(torch.addcmul(affine[1][b0:b1], t.float(), affine[0][b0:b1]), inplace=True).to(x.dtype)
        if c0 > r0 - pad or r1 + pad > c1:
            t = F.pad(t, (0, 0, c0 - (r0 - pad), r1 + pad - c1))
        y = winograd.conv2d(t, conv.weight, conv.bias, u, conv.padding[1])
        if residual is not None:
            res = residual[b0:b1, :, r0:r1]
            y += res if shortcut is None else shortcut(res)
        out[b0:b1, :, r0:r1] = y
    return out


# A 3x3 conv over a nearest-2x upsampled image is, at each of the four output phases (row a, column b), a 2x2 conv
# over the original: taps that land on the same source pixel add up. 4 taps instead of 9 per output, and the
# upsampled copy is never made. Rows of _FOLD[a] map the 3 kernel rows onto the 2 source rows phase a reads.
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)


def phase_kernels(conv: nn.Conv2d, dtype: torch.dtype, device: torch.device
                  ) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """For a 3x3, padding-1 `conv` after a nearest-2x upsample: per output phase [a][b], the 2x2 kernel (C', C, 2, 2)
    it is over the source image, channels_last, with its Winograd transform for `dtype` inputs on `device` (or None)."""
    fold, w64 = _FOLD.to(conv.weight.device), conv.weight.double()
    kernels = [[torch.einsum("pk,oikl,ql->oipq", fold[a], w64, fold[b]).to(conv.weight.dtype)
                .contiguous(memory_format=torch.channels_last) for b in range(2)] for a in range(2)]
    return [[(k, winograd.prepare(k, dtype, device)) for k in row] for row in kernels]


def phased(up: nn.Module, conv: nn.Module | None) -> bool:
    """Whether `conv(up(x))` is a nearest-2x upsampling then a 3x3 'same' convolution: what `upsample_conv` runs as
    four 2x2 convolutions of the source (4 taps per output instead of 9, no upsampled copy)."""
    return isinstance(up, nn.Upsample) and up.mode == "nearest" and up.scale_factor in (2, 2.0, (2.0, 2.0)) and \
        isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and \
        conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor, kernels=None, context: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """conv(nearest_2x(x)) for a 3x3, padding-1 `conv`, band by band: (B, C, H, W) in any range -> (B, C', 2H, 2W);
    with `context` the first and last rows of `x` are the rows above and below (zeros at the image's edges) and the
    output has 2(H - 2) rows. `kernels`: `phase_kernels(conv, ...)`, made here if not given; `out`: a channels_last
    tensor of the output's shape to write into, else a new one."""
    kernels = kernels or phase_kernels(conv, x.dtype, x.device)
    h, w = x.shape[-2] - 2 * context, x.shape[-1]
    if out is None:
        out = torch.empty(x.shape[0], conv.out_channels, 2 * h, 2 * w, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    phases = out.view(*out.shape[:2], h, 2, w, 2)  # (B, C', H, a, W, b)
    for b0, b1, l0, l1 in _windows(x, h):
        if context:
            t = F.pad(x[b0:b1, :, l0:l1 + 2], (1, 1))
        else:
            t = F.pad(x[b0:b1, :, max(0, l0 - 1):min(h, l1 + 1)], (1, 1, int(l0 == 0), int(l1 == h)))
        for a in range(2):
            for b in range(2):
                window = t[:, :, a:a + l1 - l0 + 1, b:b + w + 1]
                kernel, u = kernels[a][b]
                phases[b0:b1, :, l0:l1, a, :, b] = winograd.conv2d(window, kernel, conv.bias, u)
    return out
