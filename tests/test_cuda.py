"""CUDA checks (marker `cuda`, run with `make test-cuda` on a GPU machine; `make test` deselects them).

fp32 on CUDA must equal the CPU/diffusers results to the same tolerance as on CPU (TF32 is off for fp32);
fp16/bf16 must stay within the documented quality cost; the CLI, tiling budget and SVD run end to end.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import diffusers_kl
from vaecli import media, metrics, tiling
from vaecli.checkpoints import kl_state_dict
from vaecli.codec import build_model, load_codec
from vaecli.registry import REGISTRY

pytestmark = pytest.mark.cuda

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "retina.jpg"]


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need a CUDA device: run them with `make test-cuda` on a GPU machine")


def photo(shared_images, name: str, side: int = 512) -> torch.Tensor:
    img, _ = media.read_image(shared_images / name)
    return img[:, :, :side, :side]


@pytest.mark.parametrize("name", PHOTOS)
def test_taef2_fp32_cuda_equals_cpu(real_weights, shared_images, name):
    x = photo(shared_images, name)
    size = (x.shape[-1], x.shape[-2])
    cpu = load_codec("taef2", device="cpu")
    gpu = load_codec("taef2", device="cuda")
    z_cpu, meta = cpu.encode_image(x, size)
    z_gpu, _ = gpu.encode_image(x, size)
    # The encoder's GroupNorm blocks amplify kernel rounding (1e-6 after the first convs) to ~4e-4 on retina.jpg.
    assert (z_cpu - z_gpu).abs().max().item() <= 1e-3, "encode"
    y_cpu, y_gpu = cpu.decode_latent(z_cpu, meta), gpu.decode_latent(z_cpu, meta)
    assert (y_cpu - y_gpu).abs().max().item() <= 1e-4, "decode"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_taef2_half_precision_cuda_psnr_cost(real_weights, shared_images, dtype):
    """Low precision on CUDA costs at most 0.3 dB of round-trip PSNR on the shared photos."""
    full = load_codec("taef2", device="cuda")
    half = load_codec("taef2", device="cuda", dtype=dtype)
    for name in PHOTOS:
        x = photo(shared_images, name)
        size = (x.shape[-1], x.shape[-2])
        ref = full.decode_latent(*full.encode_image(x, size))
        low = half.decode_latent(*half.encode_image(x, size))
        assert torch.isfinite(low).all()
        cost = metrics.psnr(media.quantize8(ref), x) - metrics.psnr(media.quantize8(low), x)
        assert cost <= 0.3, f"{name}: {dtype} loses {cost:.3f} dB"


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux1", "flux2"])
def test_kl_fp32_cuda_matches_diffusers(name):
    spec = REGISTRY[name]
    ref = diffusers_kl(name).cuda()
    ours = build_model(spec).eval()
    ours.load_state_dict(kl_state_dict(ref.state_dict(), len(spec.config.channel_mult), name), strict=True)
    ours = ours.cuda()
    torch.manual_seed(3)
    pixels = torch.rand(1, 3, 64, 96, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        post = ref.encode(pixels * 2 - 1).latent_dist
        mean, _ = ours.moments(pixels)
        assert (mean - post.mean).abs().max().item() <= 1e-4
        ref_pixels = ((ref.decode(post.mean).sample + 1) / 2).clamp(0, 1)
        assert (ours.decode(post.mean) - ref_pixels).abs().max().item() <= 1e-4


def test_sdxl_fp16_keeps_decoder_fp32_and_finite(kl_files):
    files = kl_files("sdxl")
    codec = load_codec("sdxl", [files["diffusers"]], device="cuda", dtype="fp16")
    assert next(codec.model.encoder.parameters()).dtype == torch.float16
    assert next(codec.model.decoder.parameters()).dtype == torch.float32
    assert codec.memory_format == torch.contiguous_format  # CUDA GroupNorm is slow on channels_last
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    out = codec.decode_latent(*codec.encode_image(x, (64, 64)))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_svd_cuda_matches_cpu(kl_files):
    files = kl_files("svd")
    cpu = load_codec("svd", [files["diffusers"]], device="cpu")
    gpu = load_codec("svd", [files["diffusers"]], device="cuda")
    torch.manual_seed(5)
    frames = torch.rand(4, 3, 32, 40)
    latents, meta = cpu.encode_batch(frames, (40, 32))
    a = cpu.decode_frames(latents, meta, chunk=2)
    b = gpu.decode_frames(latents, meta, chunk=2)
    assert (a - b).abs().max().item() <= 1e-4


def test_cuda_budget_comes_from_free_gpu_memory(real_weights, shared_images):
    codec = load_codec("taef2", None, ("decoder",), device="cuda")
    free, _ = torch.cuda.mem_get_info()
    assert tiling.default_budget(torch.device("cuda")) == pytest.approx(free // 2, rel=0.05)
    assert codec.tile_size(4096 * 4096) is None  # 4096^2 fits half of an 80 GB card untiled


def test_cuda_tiled_decode_equals_untiled(real_weights, shared_images):
    x, _ = media.read_image(shared_images / "retina.jpg")
    size = (x.shape[-1], x.shape[-2])
    whole = load_codec("taef2", device="cuda", tile=None)
    tiles = load_codec("taef2", device="cuda", tile=256)
    z, meta = whole.encode_image(x, size)
    z_tiled, _ = tiles.encode_image(x, size)
    # cuDNN picks other conv algorithms for tile shapes; the GroupNorm blocks amplify that to ~0.04 at a few
    # latent cells of retina.jpg (4e-4 with cuDNN off), which stays within one 8-bit level once decoded.
    assert (z - z_tiled).abs().max().item() <= 0.1, "encode"
    untiled = media.quantize8(whole.decode_latent(z, meta))
    for name, pixels in (("encode", whole.decode_latent(z_tiled, meta)), ("decode", tiles.decode_latent(z, meta))):
        diff = (media.quantize8(pixels) - untiled).abs().max().item()
        assert diff <= 1 / 255 + 1e-6, f"tiled {name}: {diff * 255:.2f} levels"


def test_cuda_row_bands_past_the_budget_equal_untiled(real_weights, shared_images):
    x, _ = media.read_image(shared_images / "retina.jpg")
    size = (x.shape[-1], x.shape[-2])
    whole = load_codec("taef2", device="cuda", tile=None)
    banded = load_codec("taef2", device="cuda", budget=48 << 20)
    assert banded.tile_size(size[0] * size[1]) is not None  # past the budget: row bands
    z, meta = whole.encode_image(x, size)
    z_rows, _ = banded.encode_image(x, size)
    assert (z - z_rows).abs().max().item() <= 0.1, "encode"  # cuDNN's algorithms per shape, as for tiles
    untiled = media.quantize8(whole.decode_latent(z, meta))
    diff = (media.quantize8(banded.decode_latent(z, meta)) - untiled).abs().max().item()
    assert diff <= 1 / 255 + 1e-6, f"row bands: {diff * 255:.2f} levels"


def test_cli_roundtrip_on_cuda(vae, real_weights, shared_images, tmp_path):
    out = tmp_path / "recon.png"
    result = vae("roundtrip", shared_images / "astronaut.png", "-o", out, "--device", "cuda", "--dtype", "fp16",
                 "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["status"] == "ok" and record["psnr"] >= 30.5
    assert out.exists()


def test_kl_tiled_decode_and_encode_on_cuda_equal_untiled(kl_files):
    """Exact KL tiling on the GPU: 512x512 in 2x2 tiles, GroupNorm statistics gathered across them."""
    files = kl_files("sd15")
    whole = load_codec("sd15", [files["diffusers"]], device="cuda", tile=None)
    tiled = load_codec("sd15", [files["diffusers"]], device="cuda", tile=256)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 512, 512)
    z, meta = whole.encode_image(x, (512, 512))
    z_tiled, _ = tiled.encode_image(x, (512, 512))
    assert (z - z_tiled).abs().max().item() <= 1e-3
    assert (whole.decode_latent(z, meta) - tiled.decode_latent(z, meta)).abs().max().item() <= 1e-3
