"""PSNR / SSIM: the banded float32 metrics against the original whole-image float64 implementation."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from vaecli import metrics

PSNR_TOL = 1e-5  # measured up to 1.3e-6 dB
SSIM_TOL = 1e-5  # measured up to 6.2e-7


# The original implementation, kept verbatim as the oracle: float64 over the whole image, 11x11 non-separable window.
def old_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else -10.0 * torch.log10(torch.tensor(mse)).item()


def _old_gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def old_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    c = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    w = _old_gaussian_window(size).to(a.device).expand(c, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def smooth_pair(shape: tuple[int, ...], seed: int = 0, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """An image with structure at several scales, and a noisy copy of it."""
    gen = torch.Generator().manual_seed(seed)
    bsz, c, h, w = shape
    a = torch.zeros(shape)
    for scale in (2, 8, 32):
        coarse = torch.rand(bsz, c, max(1, h // scale), max(1, w // scale), generator=gen)
        a += F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) / 3
    b = (a + noise * torch.randn(shape, generator=gen)).clamp(0, 1)
    return a, b


def check(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    want_p, want_s = old_psnr(a, b), old_ssim(a, b)
    p, s = metrics.psnr_ssim(a, b)
    assert p == pytest.approx(want_p, abs=PSNR_TOL)
    assert s == pytest.approx(want_s, abs=SSIM_TOL)
    assert metrics.psnr(a, b) == p
    assert metrics.ssim(a, b) == s
    return p, s


@pytest.mark.parametrize("size", [(61, 45), (45, 61), (128, 129), (11, 11), (12, 200)])
def test_odd_sizes_match_old(size):
    p, s = check(*smooth_pair((1, 3, *size)))
    assert 20 < p < 40 and 0.1 < s < 0.99


@pytest.mark.parametrize("size", [(7, 9), (9, 7), (3, 40), (40, 2), (10, 10), (1, 1)])
def test_images_smaller_than_the_window(size):
    check(*smooth_pair((1, 3, *size), seed=1))


@pytest.mark.parametrize("shape", [(4, 3, 50, 70), (3, 1, 33, 20), (2, 3, 9, 16)])
def test_batches_average_over_everything(shape):
    check(*smooth_pair(shape, seed=2))


def test_default_bands_with_a_ragged_last_band():
    rows = metrics._BAND_ELEMENTS // (3 * 451)
    assert rows >= metrics._MIN_ROWS and 290 % rows != 0 and 290 // rows >= 2
    check(*smooth_pair((1, 3, 300, 451), seed=3))


def test_default_bands_ending_exactly_on_a_boundary():
    rows = metrics._BAND_ELEMENTS // (3 * 512)
    assert rows >= metrics._MIN_ROWS
    check(*smooth_pair((1, 3, 2 * rows + 10, 512), seed=4))


@pytest.mark.parametrize("rows", [1, 2, 5, 12, 16, 17, 35])
@pytest.mark.parametrize("size", [(61, 45), (46, 40)])
def test_any_band_height_gives_the_same_figures(monkeypatch, rows, size):
    # 51 and 36 valid rows: heights dividing them end exactly on a band boundary, the others leave a short last band.
    h, w = size
    monkeypatch.setattr(metrics, "_MIN_ROWS", 1)
    monkeypatch.setattr(metrics, "_BAND_ELEMENTS", 3 * w * rows)
    check(*smooth_pair((2, 3, h, w), seed=5))


def test_several_images_per_band_with_a_ragged_last_group(monkeypatch):
    # Room for two whole 12x12 images per band: groups of 2, 2 and 1.
    monkeypatch.setattr(metrics, "_BAND_ELEMENTS", 2 * 3 * 12 * 12)
    check(*smooth_pair((5, 3, 12, 12), seed=6))


def test_identical_images():
    a, _ = smooth_pair((2, 3, 64, 80), seed=7)
    p, s = metrics.psnr_ssim(a, a.clone())
    assert p == math.inf
    assert metrics.psnr(a, a) == math.inf
    assert s == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-6)


def test_channels_last_non_contiguous_and_float64_inputs():
    a, b = smooth_pair((2, 3, 70, 90), seed=8)
    want = metrics.psnr_ssim(a, b)
    cl = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    assert not cl[0].is_contiguous()
    got = check(*cl)
    assert got == pytest.approx(want, abs=1e-6)
    # A view with gaps between its columns.
    wide_a = torch.zeros(2, 3, 70, 180)
    wide_b = torch.zeros(2, 3, 70, 180)
    wide_a[..., ::2], wide_b[..., ::2] = a, b
    assert check(wide_a[..., ::2], wide_b[..., ::2]) == pytest.approx(want, abs=1e-6)
    assert check(a.double(), b.double()) == pytest.approx(want, abs=1e-6)


def _tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return Image.open(buf)


def test_real_photos(shared_images):
    astronaut = Image.open(shared_images / "astronaut.png")
    ref = _tensor(astronaut)
    p_blur, s_blur = check(_tensor(astronaut.filter(ImageFilter.GaussianBlur(2))), ref)
    p_jpeg, s_jpeg = check(_tensor(_jpeg(astronaut, 30)), ref)
    assert p_jpeg > p_blur and s_jpeg > s_blur
    # Non-square, and the permuted HWC array is what an image loader hands over before any copy.
    chelsea = Image.open(shared_images / "chelsea.png")
    ref = _tensor(chelsea)
    assert ref.is_contiguous(memory_format=torch.channels_last)
    check(_tensor(_jpeg(chelsea, 50)), ref)


_MEMORY_SCRIPT = """
import json, resource, torch
from vaecli import metrics
torch.set_num_threads(1)
metrics.psnr_ssim(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
gen = torch.Generator().manual_seed(0)
a = torch.rand(1, 3, 4096, 4096, generator=gen)
b = torch.rand(1, 3, 4096, 4096, generator=gen)
def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
before = status_kib("VmRSS")
p, s = metrics.psnr_ssim(a, b)
# VmHWM, not ru_maxrss: the latter carries over the parent's peak across fork and exec (here pytest's, gigabytes).
peak = status_kib("VmHWM")
print(json.dumps({"before": before, "peak": peak, "psnr": p, "ssim": s}))
"""


def test_memory_is_bounded_by_the_band_not_the_image():
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # Each input is ~200 MB; a float64 copy of one would be ~400 MB.
    assert (r["peak"] - r["before"]) / 1024 < 150
    # Two independent uniform images: MSE 1/6.
    assert r["psnr"] == pytest.approx(-10 * math.log10(1 / 6), abs=0.01)
    assert 0 < r["ssim"] < 0.02


@pytest.mark.parametrize("level", [1, 128, 250, 254])
def test_flat_8bit_areas_with_sparse_one_level_changes(level):
    # Near-zero variances next to large means: where float32 E[x^2] - E[x]^2 loses the most.
    a = torch.full((1, 3, 120, 130), level / 255)
    b = a.clone()
    b[..., ::7, ::5] = (level + 1) / 255
    check(a, b)


def test_half_precision_inputs():
    a, b = smooth_pair((1, 3, 40, 50), seed=9)
    a, b = a.half(), b.half()
    check(a, b)
    check(a.bfloat16(), b.bfloat16())
