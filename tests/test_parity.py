"""Numerical parity: vaecli's tiny models against diffusers' AutoencoderTiny and the reference TAEF2 figures."""

from __future__ import annotations

import pytest
import torch

from vaecli import media, metrics
from vaecli.codec import load_codec


@pytest.fixture(scope="module")
def reference(random_taesd):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(random_taesd / "diffusers").eval()


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 96)


@pytest.mark.parametrize("layout", ["diffusers-folder", "diffusers-file", "original-files", "original-folder"])
def test_taesd_matches_diffusers(random_taesd, reference, pixels, layout):
    weights = {
        "diffusers-folder": [random_taesd / "diffusers"],
        "diffusers-file": [random_taesd / "diffusers" / "diffusion_pytorch_model.safetensors"],
        "original-files": [random_taesd / "original" / "taesd_encoder.pth",
                           random_taesd / "original" / "taesd_decoder.pth"],
        "original-folder": [random_taesd / "original"],
    }[layout]
    codec = load_codec("taesd", weights, device="cpu")
    with torch.inference_mode():
        ref_latent = reference.encode(pixels * 2 - 1).latents
        ours_latent = codec.model.encode(pixels)
        assert ours_latent.shape == (2, 4, 8, 12)
        assert (ours_latent - ref_latent).abs().max().item() <= 1e-5
        ref_pixels = (reference.decode(ref_latent).sample + 1) / 2
        ours_pixels = codec.model.decoder(ref_latent)  # unclamped, as diffusers returns it
        assert (ours_pixels - ref_pixels).abs().max().item() <= 1e-5


def test_taef2_real_weights_match_reference_psnr(real_weights, shared_images):
    """The reference TAESD implementation gives 31.19 dB on astronaut.png with these weights (fp32)."""
    codec = load_codec("taef2", device="cpu")
    x, info = media.read_image(shared_images / "astronaut.png")
    latent, meta = codec.encode_image(x, info.size)
    assert list(latent.shape) == [32, 64, 64]
    y = codec.decode_latent(latent, meta)
    assert metrics.psnr(y, x) == pytest.approx(31.19, abs=0.01)


def test_taesana_encoder_is_32x(real_weights, shared_images):
    codec = load_codec("taesana", roles=("encoder",), device="cpu")
    x, info = media.read_image(shared_images / "chelsea.png")
    latent, meta = codec.encode_image(x, info.size)
    assert list(latent.shape) == [32, 10, 15]  # 451x300 padded to 480x320, / 32
    assert meta["padding"] == [0, 0, 29, 20]
    assert 0.5 < latent.std().item() < 2.0


def test_fp16_weights_load_into_requested_dtype(real_weights):
    codec = load_codec("taef2", device="cpu", dtype="bf16")
    assert {p.dtype for p in codec.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_blocks_match_the_plain_path(real_weights, shared_images, monkeypatch, dtype):
    """On the CPU each block runs as fused oneDNN conv+ReLU / conv+add+ReLU calls (in bf16 where oneDNN has bf16
    kernels: AVX-512 or AVX-NE-CONVERT; on an AVX2-only CPU module by module), written over the block's input: the
    module-by-module path's numbers in fp32 (the same sums, each rounded as there), to bf16 rounding in bf16."""
    from vaecli import fused, metrics

    calls = []
    add_relu = fused.conv_add_relu
    monkeypatch.setattr(fused, "conv_add_relu", lambda *a, **k: calls.append(k["into_other"]) or add_relu(*a, **k))
    codec = load_codec("taef2", device="cpu", dtype=dtype)
    x, info = media.read_image(shared_images / "astronaut.png")
    with torch.inference_mode():
        latent, meta = codec.encode_image(x, info.size)
        out = codec.decode_latent(latent, meta)
        # every block (10 in each half), each over an input the stack made
        assert calls == ([True] * 20 if dtype == "fp32" or fused._bf16_kernels() else [])
        monkeypatch.setattr(fused, "onednn", lambda t: False)
        plain_latent, _ = codec.encode_image(x, info.size)
        plain = codec.decode_latent(plain_latent, meta)
    if dtype == "fp32":
        assert (latent - plain_latent).abs().max().item() <= 1e-6 and (out - plain).abs().max().item() <= 1e-6
    else:
        assert (latent - plain_latent).float().abs().mean().item() <= 0.02  # bf16 rounding, spread over 10 blocks
        assert metrics.psnr(out, plain) >= 40


def test_bf16_blocks_write_over_stack_made_inputs_only(random_taesd):
    """A bf16 Block adds its residual in place only into a tensor made inside the same stack: a caller's tensor,
    even when the stack starts with a Block (a tiling segment could), is left as it was, and the numbers are those
    of the out-of-place call (in place only where the fused oneDNN calls run: CPUs with bf16 kernels)."""
    from vaecli import fused
    from vaecli.models import tiny

    codec = load_codec("taesd", weights=[random_taesd / "diffusers"], device="cpu", dtype="bf16")
    stack = codec.model.decoder[3:6]  # three Blocks
    assert isinstance(stack, tiny.Stack) and all(isinstance(b, tiny.Block) for b in stack)
    torch.manual_seed(0)
    x = torch.randn(1, 64, 16, 16, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.inference_mode():
        out = stack(x)
        first = stack[0](x)
        expected = stack[2](stack[1](first.clone()).clone())
        second = stack[1](first, reuse_input=True)
    assert torch.equal(x, kept)
    assert torch.equal(out, expected)
    assert (second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()) == fused._bf16_kernels()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")  # the TorchScript ONNX exporter traces
def test_tiny_decoder_upsampling_convs_run_as_phases_and_export_the_reference_graph(random_taesd, monkeypatch):
    """Each nearest-2x upsampling and the 3x3 conv after it run as four 2x2 convs of the source (4 taps per output
    instead of 9): the upsampled conv's numbers to fp32 rounding, at 1x1 latents and odd sizes too; a traced
    (exported) decoder keeps the reference's upsample and 3x3 conv, and its blocks' plain layers (not the fused
    oneDNN calls the CPU runs them as, which have no symbolic form)."""
    from torch import nn

    from vaecli import banded

    codec = load_codec("taesd", weights=[random_taesd / "diffusers"], device="cpu")
    decoder = codec.model.decoder
    calls = []
    phased = banded.upsample_conv
    monkeypatch.setattr(banded, "upsample_conv", lambda c, x, *a, **k: calls.append(tuple(x.shape)) or
                        phased(c, x, *a, **k))
    torch.manual_seed(0)
    for shape in [(1, 4, 1, 1), (2, 4, 5, 3), (1, 4, 12, 16)]:
        z = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        calls.clear()
        with torch.inference_mode():
            ours = decoder(z)
            ref = nn.Sequential.forward(decoder, z)  # module by module: nn.Upsample, then the 3x3 conv
        n, _, h, w = shape
        assert calls == [(n, 64, h * s, w * s) for s in (1, 2, 4)]
        assert ours.shape == ref.shape == (n, 3, 8 * h, 8 * w)
        assert (ours - ref).abs().max().item() <= 1e-5
    calls.clear()
    with torch.no_grad():
        traced = torch.jit.trace(decoder, z, check_trace=False)
        assert (traced(z) - ref).abs().max().item() <= 1e-5
    graph = str(traced.inlined_graph)
    assert calls == [] and "upsample_nearest2d" in graph and "_convolution_pointwise" not in graph
