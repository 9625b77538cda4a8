"""Numerical parity of the KL family with diffusers (AutoencoderKL, AutoencoderKLFlux2) on random weights."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import diffusers_kl
from vaecli import winograd
from vaecli.checkpoints import kl_state_dict
from vaecli.codec import build_model, load_codec
from vaecli.registry import REGISTRY

KL_MODELS = [name for name, spec in REGISTRY.items() if spec.family in ("kl", "svd")]
TOL = 1e-4


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(3)
    return torch.rand(1, 3, 48, 64)


@pytest.mark.parametrize("name", KL_MODELS)
def test_every_kl_entry_matches_diffusers(name, pixels):
    """Encode (posterior mean and log-variance) and decode, at the production channel configuration."""
    spec = REGISTRY[name]
    ref = diffusers_kl(name)
    ours = build_model(spec).eval()
    ours.load_state_dict(kl_state_dict(ref.state_dict(), len(spec.config.channel_mult), name), strict=True)
    with torch.inference_mode():
        post = ref.encode(pixels * 2 - 1).latent_dist
        mean, logvar = ours.moments(pixels)
        assert mean.shape == (1, spec.latent_channels, 6, 8)
        assert (mean - post.mean).abs().max().item() <= TOL
        assert (logvar - post.logvar).abs().max().item() <= TOL
        extra = {"num_frames": 1} if spec.config.temporal_decoder else {}
        ref_pixels = ((ref.decode(post.mean, **extra).sample + 1) / 2).clamp(0, 1)
        assert (ours.decode(post.mean) - ref_pixels).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def svd_clip(kl_files):
    """The random-weight SVD codec, diffusers' reference, and the latents of a 25-frame 40x32 clip."""
    files = kl_files("svd")
    codec = load_codec("svd", [files["diffusers"]], device="cpu")
    torch.manual_seed(5)
    frames = torch.rand(25, 3, 32, 40)
    latents, meta = codec.encode_batch(frames, (40, 32))
    return codec, files["reference"], latents, meta


@pytest.mark.parametrize("frames, chunk, budget", [
    (14, None, 0), (14, 1, 0), (14, 3, 1), (14, 14, 1 << 30), (25, 4, 1), (25, None, 1 << 30), (1, None, 0)])
def test_svd_chunks_equal_the_whole_clip(svd_clip, frames, chunk, budget):
    """Any chunk size and budget gives diffusers' decode(z, num_frames=T) of the whole clip (SVD: T = 14, SVD-XT:
    25): whole-clip GroupNorm statistics and neighbouring frames across chunks; budget 1 byte puts every layer in
    scratch files."""
    codec, ref, latents, meta = svd_clip
    codec = replace(codec, budget=budget)
    z = latents[:frames]
    with torch.inference_mode():
        expected = ((ref.decode(z / 0.18215, num_frames=frames).sample + 1) / 2).clamp(0, 1)
        ours = codec.decode_frames(z, meta, chunk=chunk)
    assert ours.shape == (frames, 3, 32, 40)
    assert (ours - expected).abs().max().item() <= TOL
    if budget == 1:
        assert codec.scratch_bytes > 0


def test_svd_frames_past_the_budget_go_band_by_band(svd_clip, monkeypatch):
    """A frame whose working set alone passes the budget runs one at a time, a band of rows at a time, through
    the layer-by-layer engine (a frame here takes ~5.2 MB; at 4 MB the clip's small layers stay in RAM and its
    large ones go to scratch files; the 1-byte budgets above put everything in files): still diffusers' whole-clip
    decode."""
    from vaecli import layerwise

    codec, ref, latents, meta = svd_clip
    codec, frames = replace(codec, budget=4 << 20), 14
    calls = []
    run_rows = layerwise.run_rows
    monkeypatch.setattr(layerwise, "run_rows", lambda *a, **k: calls.append(a[2]) or run_rows(*a, **k))
    z = latents[:frames]
    with torch.inference_mode():
        expected = ((ref.decode(z / 0.18215, num_frames=frames).sample + 1) / 2).clamp(0, 1)
        ours = codec.decode_frames(z, meta)
    assert (ours - expected).abs().max().item() <= TOL
    widths = [codec.spec.config.channels * m for m in codec.spec.config.channel_mult]
    assert (widths[0], 32, 40) in calls  # the widest layers at full resolution went band by band
    assert len(calls) % frames == 0 and codec.scratch_bytes > 0


def test_svd_bf16_layers_go_to_scratch_files_as_bf16(svd_clip, kl_files):
    """bf16 layers past the budget are stored and read back as bf16 (they once came back as float32 and the next
    convolution refused them): the clip decodes as close to fp32 as with every layer in RAM, at half the scratch
    bytes of fp32."""
    codec, _, latents, meta = svd_clip
    bf16 = load_codec("svd", [kl_files("svd")["diffusers"]], device="cpu", dtype="bf16")
    with torch.inference_mode():
        in_ram = bf16.decode_frames(latents[:3], meta)
        files, fp32 = replace(bf16, budget=1), replace(codec, budget=1)
        in_files = files.decode_frames(latents[:3], meta)
        exact = fp32.decode_frames(latents[:3], meta)
    assert (in_files - exact).abs().max().item() <= 1.5 * (in_ram - exact).abs().max().item()
    assert (in_files - exact).abs().mean().item() <= 1.5 * (in_ram - exact).abs().mean().item()
    assert files.scratch_bytes * 2 == fp32.scratch_bytes


@pytest.mark.parametrize("name", ["sd15", "flux1", "flux2"])
@pytest.mark.parametrize("layout", ["diffusers", "ldm", "full"])
def test_checkpoint_layouts_load_to_the_same_model(kl_files, name, layout, pixels):
    files = kl_files(name)
    ref = files["reference"]
    codec = load_codec(name, [files[layout]], device="cpu")
    spec = REGISTRY[name]
    with torch.inference_mode():
        latent, meta = codec.encode_image(pixels, (64, 48))
        mean = ref.encode(pixels * 2 - 1).latent_dist.mean
        expected = (mean - spec.shift_factor) * spec.scaling_factor  # diffusers' convention
        tol = TOL if layout != "full" else 2e-2  # the full checkpoint is stored in fp16
        assert (latent - expected[0]).abs().max().item() <= tol
        decoded = codec.decode_latent(latent, meta)
        ref_pixels = ((ref.decode(mean).sample + 1) / 2).clamp(0, 1)
        assert (decoded - ref_pixels).abs().max().item() <= (TOL if layout != "full" else 5e-2)


@pytest.mark.parametrize("name", ["sd15", "sd3", "flux2"])
def test_original_layout_is_what_diffusers_converter_reads(name):
    """The LDM/BFL file vaecli reads is mapped back to the identical diffusers state dict by diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref = diffusers_kl(name)
    ldm = kl_state_dict(ref.state_dict(), 4, name)
    back = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    ref_sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("bn.")}
    back = {k: v for k, v in back.items() if not k.startswith("bn.")}
    assert set(back) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(back[k].reshape(v.shape), v), k


def test_flux2_normalized_space_matches_pipeline(kl_files, pixels):
    """FLUX.2's opt-in latent space is the pipeline's patchify + batch-norm normalization, and inverts exactly."""
    files = kl_files("flux2")
    ref = files["reference"]
    codec = load_codec("flux2", [files["diffusers"]], device="cpu")
    with torch.inference_mode():
        latent, meta = codec.encode_image(pixels, (64, 48), space="normalized")
        assert meta["space"] == "normalized" and meta["channels"] == 128 and meta["spatial_factor"] == 16
        mean = ref.encode(pixels * 2 - 1).latent_dist.mean
        b, c, h, w = mean.shape
        patched = mean.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        bn_mean = ref.bn.running_mean.view(1, -1, 1, 1)
        bn_std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
        assert (latent - ((patched - bn_mean) / bn_std)[0]).abs().max().item() <= TOL
        raw, _ = codec.encode_image(pixels, (64, 48), space="raw")
        back = codec.model.denormalize(latent[None])[0]
        assert (back - raw).abs().max().item() <= 1e-5
        decoded = codec.decode_latent(latent, meta)
        ref_pixels = ((ref.decode(mean).sample + 1) / 2).clamp(0, 1)
        assert (decoded - ref_pixels).abs().max().item() <= TOL


def test_sampling_is_seeded_and_follows_the_posterior(kl_files, pixels):
    codec = load_codec("sd15", [kl_files("sd15")["diffusers"]], roles=("encoder",), device="cpu")
    a, meta = codec.encode_image(pixels, (64, 48), sample=True, seed=7)
    b, _ = codec.encode_image(pixels, (64, 48), sample=True, seed=7)
    c, _ = codec.encode_image(pixels, (64, 48), sample=True, seed=8)
    mode, _ = codec.encode_image(pixels, (64, 48))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert meta["sample_seed"] == 7
    mean, logvar = codec.model.moments(pixels)
    gen = torch.Generator().manual_seed(7)
    expected = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * 0.18215
    assert (a - expected[0]).abs().max().item() <= 1e-5
    assert not torch.equal(a, mode)


def test_fp16_upcast_for_sdxl(kl_files):
    files = kl_files("sd15")  # same architecture as sdxl (its diffusers folder records SD 1.x's scaling_factor)
    codec = load_codec("sdxl", [files["ldm"]], device="cpu", dtype="fp16")
    assert next(codec.model.encoder.parameters()).dtype == torch.float16
    assert next(codec.model.decoder.parameters()).dtype == torch.float32
    fixed = load_codec("sdxl-fp16-fix", [files["ldm"]], device="cpu", dtype="fp16")
    assert next(fixed.model.decoder.parameters()).dtype == torch.float16


def test_diffusers_fp16_variant_folder(kl_files, tmp_path, pixels):
    """A diffusers folder holding only `diffusion_pytorch_model.fp16.safetensors` loads into fp32."""
    import shutil

    from safetensors.torch import save_file

    files = kl_files("flux1")
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(files["diffusers"] / "config.json", folder / "config.json")
    ref = files["reference"]
    save_file({k: v.half().contiguous() for k, v in ref.state_dict().items()},
              str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    codec = load_codec("flux1", [tmp_path], device="cpu")  # the model folder's vae/ subfolder is found too
    assert {p.dtype for p in codec.model.parameters()} == {torch.float32}
    latent, _ = codec.encode_image(pixels, (64, 48))
    with torch.inference_mode():
        expected = (ref.encode(pixels * 2 - 1).latent_dist.mean - 0.1159) * 0.3611
    assert (latent - expected[0]).abs().max().item() <= 2e-2


@pytest.mark.parametrize(("name", "band_bytes"), [("sd15", 1), ("sd15", 40_000), ("flux1", 1)])
def test_banded_codec_path_matches_diffusers(name, band_bytes, monkeypatch):
    """The CPU codec runs KL blocks band by band (one row per band, then a few): still diffusers' numbers."""
    from vaecli import banded
    from vaecli.families import family

    monkeypatch.setattr(banded, "BAND_BYTES", band_bytes)
    calls = []
    run_block, wino = banded.run_block, winograd._winograd
    monkeypatch.setattr(banded, "run_block", lambda block, x: calls.append(type(block).__name__) or run_block(block, x))
    monkeypatch.setattr(winograd, "_winograd", lambda x, u, *a: calls.append(f"winograd{u.shape[0]}") or wino(x, u, *a))
    spec = REGISTRY[name]
    ref = diffusers_kl(name)
    model = build_model(spec).eval()
    model.load_state_dict(kl_state_dict(ref.state_dict(), len(spec.config.channel_mult), name), strict=True)
    model = model.to(memory_format=torch.channels_last)
    codec = family(spec)(spec, model, torch.device("cpu"), torch.float32, tile=None)
    torch.manual_seed(5)
    pixels = torch.rand(1, 3, 40, 56)
    with torch.inference_mode():
        mean = ref.encode(pixels * 2 - 1).latent_dist.mean
        assert (codec.encode_raw(pixels.contiguous(memory_format=torch.channels_last), False, None) - mean
                ).abs().max().item() <= TOL
        assert {"Conv2d", "ResnetBlock", "Downsample"} <= set(calls)
        calls.clear()
        ref_pixels = ((ref.decode(mean).sample + 1) / 2).clamp(0, 1)
        assert (codec.decode_raw(mean.contiguous(memory_format=torch.channels_last)) - ref_pixels
                ).abs().max().item() <= TOL
        assert {"ResnetBlock", "Upsample", "Sequential", "winograd16", "winograd9"} <= set(calls)  # at 512 channels


@pytest.mark.parametrize(("r", "c_in", "c_out", "height", "width", "pad", "bias"), [
    (3, 256, 256, 8, 10, 1, True), (3, 256, 320, 7, 9, 1, False), (3, 320, 256, 5, 1, 1, True),
    (3, 256, 256, 3, 6, 0, True), (2, 256, 256, 8, 10, 0, True), (2, 320, 256, 5, 7, 0, False)])
def test_winograd_convolution_is_a_direct_one(r, c_in, c_out, height, width, pad, bias):
    """Winograd F(2x2, 3x3) and F(2x2, 2x2) (an upsampling conv's phases) for the wide layers give a float64 direct
    convolution's result to fp32 rounding, odd output sizes, unpadded sides and no bias included: within 1e-5 (outputs
    up to ~6), where oneDNN's fp32 direct convolution lands 2e-6 to 8e-6 off (by CPU: AVX-512 sums in another order
    than AVX2)."""
    torch.manual_seed(7)
    weight = (torch.randn(c_out, c_in, r, r) / (r * c_in ** 0.5)).contiguous(memory_format=torch.channels_last)
    b = torch.randn(c_out) if bias else None
    x = torch.randn(2, c_in, height + r - 1, width).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        u = winograd.prepare(weight, x.dtype, x.device)
        y = winograd.conv2d(x, weight, b, u, pad)
        exact = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), 1, (0, pad))
    assert u is not None and y.shape == exact.shape
    assert (y - exact).abs().max().item() <= 1e-5


def test_winograd_only_where_it_is_faster():
    """Narrow, 1x1, bf16 and autograd convolutions stay with the direct convolution."""
    cpu = torch.device("cpu")
    with torch.inference_mode():
        assert winograd.prepare(torch.ones(256, 256, 3, 3), torch.float32, cpu) is not None
        assert winograd.prepare(torch.ones(128, 256, 3, 3), torch.float32, cpu) is None
        assert winograd.prepare(torch.ones(256, 256, 1, 1), torch.float32, cpu) is None
        assert winograd.prepare(torch.ones(256, 256, 3, 3), torch.bfloat16, cpu) is None
    assert winograd.prepare(torch.ones(256, 256, 3, 3), torch.float32, cpu) is None  # autograd on


@pytest.mark.parametrize(("setting", "used"), [("0", False), ("1", True)])
def test_vae_winograd_0_turns_winograd_off(setting, used):
    """VAE_WINOGRAD=0 gives oneDNN's direct convolutions everywhere (to compare with, or for its exact bits)."""
    code = ("import torch; from vaecli import winograd; torch.set_grad_enabled(False); "
            "print(winograd.prepare(torch.ones(256, 256, 3, 3), torch.float32, torch.device('cpu')) is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "VAE_WINOGRAD": setting}).stdout
    assert out.strip() == str(used)


def test_banded_resnet_writes_over_its_consumed_input():
    """A width-halving resnet block's output shares its input's memory (the peak-memory saving) and is exact."""
    from vaecli import banded
    from vaecli.models.kl import ResnetBlock

    torch.manual_seed(6)
    block = ResnetBlock(64, 32).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 64, 24, 20).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = block(x)
        out = banded.run_block(block, x)
    assert out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert (out - expected).abs().max().item() <= 1e-5
