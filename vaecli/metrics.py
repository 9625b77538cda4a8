"""Image quality metrics: PSNR and SSIM on (B, C, H, W) tensors in [0, 1].

Both are computed band by band over rows in float32, so memory stays O(band x W) whatever the image size;
per-band sums are accumulated in float64 so that the result does not drift with the number of bands.
"""

from __future__ import annotations

import math

import torch

_C1, _C2 = 0.01**2, 0.03**2
_SIGMA = 1.5
_WINDOW = 11
# Elements of one band plane (items x channels x rows x width); SSIM keeps about 16 float32 planes alive, and the
# band has to stay cache-sized because every step below is a memory-bound pass over it.
_BAND_ELEMENTS = 1 << 17
# Fewer rows would spend most of the work on the window-1 rows each band shares with the next.
_MIN_ROWS = 32


def _gaussian(size: int) -> list[float]:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * _SIGMA**2))
    return (g / g.sum()).tolist()


def _blur(x: torch.Tensor, g: list[float], dim: int, out: torch.Tensor) -> torch.Tensor:
    """Valid 1-D convolution of ``x`` with ``g`` along ``dim``, written into ``out``.

    Summing shifted slices beats a depthwise conv2d on CPU for an 11-tap kernel, and needs no scratch memory.
    """
    n = out.shape[dim]
    torch.mul(x.narrow(dim, 0, n), g[0], out=out)
    for i in range(1, len(g)):
        out.add_(x.narrow(dim, i, n), alpha=g[i])
    return out


def _scan(a: torch.Tensor, b: torch.Tensor, want_psnr: bool, want_ssim: bool) -> tuple[float, float]:
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    bsz, c, h, w = a.shape
    k = min(_WINDOW, h, w)
    g = _gaussian(k)
    ho, wo = h - k + 1, w - k + 1
    # Differences in float64 when given float64, and never in less than float32.
    diff_dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)

    # Output rows per band; when whole images fit in the budget, several batch items share a band instead.
    rows = min(ho, max(_MIN_ROWS, _BAND_ELEMENTS // (c * w)))
    items = min(bsz, max(1, _BAND_ELEMENTS // (c * h * w))) if rows == ho else 1
    if want_ssim:
        # Planes a, b, a*a, b*b, a*b; then blurred along W; then along H.
        src = torch.empty(5, items, c, rows + k - 1, w, dtype=torch.float32, device=a.device)
        horiz = torch.empty(5, items, c, rows + k - 1, wo, dtype=torch.float32, device=a.device)
        vert = torch.empty(5, items, c, rows, wo, dtype=torch.float32, device=a.device)

    sse = torch.zeros((), dtype=torch.float64, device=a.device)
    ssim_sum = torch.zeros((), dtype=torch.float64, device=a.device)
    for i0 in range(0, bsz, items):
        m = min(bsz - i0, items)
        for r0 in range(0, ho, rows):
            n = min(ho - r0, rows)
            xa, xb = a[i0:i0 + m, :, r0:r0 + n + k - 1], b[i0:i0 + m, :, r0:r0 + n + k - 1]
            if want_psnr:
                # Each input row is counted once: a band owns its first n rows, the last band also the tail.
                own = xa.shape[2] if r0 + n == ho else n
                d = xa[:, :, :own].to(diff_dtype) - xb[:, :, :own].to(diff_dtype)
                sse += torch.sum(d * d, dtype=torch.float64)
            if not want_ssim:
                continue
            s = src[:, :m, :, :n + k - 1]
            # Centred on 0.5, the second moments are 4x smaller, and so is the float32 cancellation error of
            # E[x^2] - E[x]^2 on flat bright or dark areas, where the variances are tiny next to the means.
            s[0].copy_(xa)
            s[1].copy_(xb)
            s[:2].sub_(0.5)
            torch.mul(s[:2], s[:2], out=s[2:4])
            torch.mul(s[0], s[1], out=s[4])
            blurred = _blur(_blur(s, g, 4, horiz[:, :m, :, :n + k - 1]), g, 3, vert[:, :m, :, :n])
            mu_a, mu_b, e_aa, e_bb, e_ab = blurred
            # In place, the blurred moments become the factors of the SSIM numerator and denominator.
            e_ab.addcmul_(mu_a, mu_b, value=-1).mul_(2).add_(_C2)
            blurred[2:4].addcmul_(blurred[:2], blurred[:2], value=-1)
            e_aa.add_(e_bb).add_(_C2)
            blurred[:2].add_(0.5)
            num = torch.mul(mu_a, mu_b).mul_(2).add_(_C1).mul_(e_ab)
            blurred[:2].square_()
            den = mu_a.add_(mu_b).add_(_C1).mul_(e_aa)
            ssim_sum += torch.sum(num.div_(den), dtype=torch.float64)

    mse = sse.item() / a.numel()
    p = math.inf if mse == 0 else -10.0 * math.log10(mse)
    return p, ssim_sum.item() / (bsz * c * ho * wo)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two (B, C, H, W) tensors in [0, 1]; inf when identical."""
    return _scan(a, b, want_psnr=True, want_ssim=False)[0]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, valid region) of (B, C, H, W) tensors in [0, 1]."""
    return _scan(a, b, want_psnr=False, want_ssim=True)[1]


def psnr_ssim(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """PSNR in dB and mean SSIM of two (B, C, H, W) tensors in [0, 1], computed in one pass over the images."""
    return _scan(a, b, want_psnr=True, want_ssim=True)
