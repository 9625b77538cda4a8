"""Exact tiling: tiled and untiled results agree; budgets pick tiles; seams are verified."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vaecli import tiling
from vaecli.codec import load_codec
from vaecli.errors import UsageError
from vaecli.latents import load_latent
from vaecli.registry import REGISTRY


def test_retina_tiled_equals_untiled(vae, real_weights, shared_images, tmp_path):
    retina = shared_images / "retina.jpg"
    assert vae("encode", retina, "-o", tmp_path / "whole.latent", "--tile", "off").exit_code == 0
    assert vae("encode", retina, "-o", tmp_path / "tiled.latent", "--tile", "256").exit_code == 0
    whole, _ = load_latent(tmp_path / "whole.latent")
    tiled, _ = load_latent(tmp_path / "tiled.latent")
    assert whole.shape == tiled.shape == (32, 177, 177)
    assert (whole - tiled).abs().max().item() <= 1 / 255

    assert vae("decode", tmp_path / "whole.latent", "-o", tmp_path / "whole.png", "--tile", "off").exit_code == 0
    result = vae("decode", tmp_path / "whole.latent", "-o", tmp_path / "tiled.png", "--tile", "192", "--verify",
                 "--json")
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)["verify"]
    assert check["tiled"] is True and check["max_abs_diff"] <= 1 / 255
    a = np.asarray(Image.open(tmp_path / "whole.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "tiled.png"), dtype=np.int16)
    assert a.shape == b.shape == (1411, 1411, 3)
    assert np.abs(a - b).max() <= 1


def test_memory_budget_chooses_tiles(real_weights, shared_images):
    from vaecli import media

    x, info = media.read_image(shared_images / "chelsea.png")
    whole = load_codec("taef2", device="cpu", tile=None)
    small = load_codec("taef2", device="cpu", budget=48 << 20)
    assert whole.tile_size(300 * 451) is None
    tile = small.tile_size(304 * 456)
    assert tile is not None and tile % 8 == 0 and tile < 300
    latent, meta = whole.encode_image(x, info.size)
    tiled_latent, _ = small.encode_image(x, info.size)
    assert (latent - tiled_latent).abs().max().item() <= 1e-4
    y, y_tiled = whole.decode_latent(latent, meta), small.decode_latent(latent, meta)
    assert (y - y_tiled).abs().max().item() <= 1 / 255
    check = small.verify_tiling(latent, meta, y_tiled)
    assert check["tiled"] and check["max_abs_diff"] <= 1 / 255 and check["psnr"] > 60


def test_verify_line_and_max_memory_option(vae, real_weights, small_image, tmp_path):
    lat = tmp_path / "s.latent"
    assert vae("encode", small_image, "-o", lat).exit_code == 0
    result = vae("decode", lat, "-o", tmp_path / "s.png", "--tile", "16", "--verify")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip().startswith(f"{lat} -> {tmp_path / 's.png'}  taef2 61x45  verify: max diff ")
    result = vae("decode", lat, "-o", tmp_path / "t.png", "--verify")
    assert result.stderr.strip().endswith("verify: not tiled")
    result = vae("decode", lat, "-o", tmp_path / "u.png", "--max-memory", "lots")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --max-memory lots: expected a size like 2GB, 512MB or 1.5GiB"


def test_tile_option_errors(vae, kl_files, small_image, tmp_path):
    result = vae("encode", small_image, "--tile", "big")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --tile big: expected auto, off or a tile size in pixels"
    svd = kl_files("svd")["diffusers"]
    assert vae("encode", small_image, "-o", tmp_path / "x.latent", "--model", "svd", "--weights", svd,
               "--tile", "32").exit_code == 0  # its encoder is a 2-D one: tiled like the others
    result = vae("decode", tmp_path / "x.latent", "--weights", svd, "--tile", "256")
    assert result.exit_code == 1  # decode loads each latent's model lazily: the error is that input's
    assert result.stderr.strip() == (f"Error: {tmp_path / 'x.latent'}: --tile 256: svd's temporal decoder tiles "
                                     "over frames (--chunk), not space")


def test_receptive_radius_of_tiny_segments():
    from vaecli.models.tiny import TinyAutoencoder

    model = TinyAutoencoder(REGISTRY["taef2"].config)
    local_enc, _ = model.encoder_segments()
    _, local_dec = model.decoder_segments()
    # decoder tail in latent cells: 0.5 + 4.5 + 0.25 + 2.25 + 0.125 + 0.5
    assert tiling.receptive_radius(local_dec) == pytest.approx(8.125)
    assert tiling.receptive_radius(local_enc) >= 65  # pixels; stride-2 convs counted conservatively
    sana = TinyAutoencoder(REGISTRY["taesana"].config, decoder=False)
    assert tiling.receptive_radius(sana.encoder_segments()[0]) > tiling.receptive_radius(local_enc)


@pytest.mark.parametrize("text, value", [("2GB", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("100", 100)])
def test_parse_size(text, value):
    assert tiling.parse_size(text) == value


def test_tiled_helper_matches_whole_for_a_conv_stack():
    torch.manual_seed(0)
    stack = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Upsample(scale_factor=2),
                                torch.nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(1, 3, 37, 29)
    with torch.no_grad():
        whole = stack(x)
        parts = tiling.tiled(stack, x, 8, tiling.receptive_radius(stack), 2)
    assert parts.shape == whole.shape
    assert (parts - whole).abs().max().item() <= 1e-5
    with pytest.raises(UsageError):
        tiling.resolve_tile("0")


# --- KL family: GroupNorm statistics gathered across tiles, one pass per norm; attention whole, in chunks ---


@pytest.fixture(scope="module")
def sd15():
    """Our sd15 model with seeded random weights (diffusers' layout converted), channels_last as load_codec has it."""
    from tests.conftest import diffusers_kl
    from vaecli.checkpoints import kl_state_dict
    from vaecli.codec import build_model

    model = build_model(REGISTRY["sd15"]).eval()
    model.load_state_dict(kl_state_dict(diffusers_kl("sd15").state_dict(), 4, "test"))
    return model.to(memory_format=torch.channels_last)


def codec_for(model, **kw):
    from vaecli.codec import Codec

    return Codec(REGISTRY["sd15"], model, torch.device("cpu"), torch.float32, **kw)


class SpanSpy:
    """Counts the tiles `tiling.tiled` cuts (per axis) and the segment lengths `streamed` runs."""

    def __init__(self, monkeypatch):
        self.tiles, self.segments = [], []
        spans, run = tiling._spans, tiling._run_segment
        monkeypatch.setattr(tiling, "_spans", lambda *a: self.tiles.append(len(spans(*a))) or spans(*a))
        monkeypatch.setattr(tiling, "_run_segment", lambda seg, *a: self.segments.append(len(seg)) or run(seg, *a))


def test_kl_decode_in_tiles_equals_untiled(sd15, monkeypatch):
    """sd15 configuration, 512x512 decoded in 2x2 tiles of 256 pixels at every level: <= 1e-3 from untiled."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, 64, 64).contiguous(memory_format=torch.channels_last)
    spy = SpanSpy(monkeypatch)
    with torch.inference_mode():
        whole = codec_for(sd15, tile=None)._decode_raw(z)
        tiled = codec_for(sd15, tile=256)._decode_raw(z)
    assert tiled.shape == whole.shape == (1, 3, 512, 512)
    assert (tiled - whole).abs().max().item() <= 1e-3
    assert spy.tiles and min(spy.tiles) >= 2  # every tiled pass cut each axis at least in two: 4+ tiles


def test_kl_small_budget_fuses_segments_and_stays_exact(sd15, monkeypatch):
    """A budget too small to keep full-resolution tensors whole runs several blocks per segment (more passes)."""
    torch.manual_seed(1)
    z = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    spy = SpanSpy(monkeypatch)
    small = codec_for(sd15, tile="auto", budget=3 << 20)  # full-resolution tensors are 2 MB each
    with torch.inference_mode():
        assert (small._decode_raw(z) - codec_for(sd15, tile=None)._decode_raw(z)).abs().max().item() <= 1e-3
        assert max(spy.segments) >= 2 and max(spy.tiles) >= 2
        spy.segments.clear()
        ref = codec_for(sd15, tile=None)._encode_raw(x, False, None)
        assert (small._encode_raw(x, False, None) - ref).abs().max().item() <= 1e-3
        assert max(spy.segments) >= 2


def test_stream_norm_pools_statistics_exactly():
    """Uneven tiles, overlapping halos and a large offset between tile means: the same as one GroupNorm."""
    torch.manual_seed(2)
    seq = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.GroupNorm(4, 16),
                              torch.nn.SiLU(), torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.GroupNorm(2, 8))
    x = torch.randn(2, 8, 23, 31) + torch.linspace(0, 50, 31)  # a ramp: tiles have very different means
    with torch.no_grad():
        whole = seq(x)
        parts = tiling.tiled(seq, x, 7, tiling.receptive_radius(seq), 1)
    assert (parts - whole).abs().max().item() <= 1e-4
    assert all(isinstance(m, torch.nn.GroupNorm) for m in (seq[1], seq[4]))  # the stand-ins are put back


def test_attention_in_query_chunks_is_exact(monkeypatch):
    """The block equals a float64 softmax attention whole, in query chunks, and in either memory layout."""
    import math

    import torch.nn.functional as F

    from vaecli.models import kl

    torch.manual_seed(3)
    block = kl.AttnBlock(32).eval()
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        y = block.norm(x).double()
        q, k, v = (F.conv2d(y, m.weight.double(), m.bias.double()).flatten(2).transpose(1, 2)
                   for m in (block.q, block.k, block.v))
        a = (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(32), dim=-1) @ v).transpose(1, 2).reshape(1, 32, 16, 16)
        expected = x.double() + F.conv2d(a, block.proj_out.weight.double(), block.proj_out.bias.double())
        assert (block(x) - expected).abs().max().item() <= 1e-5
        monkeypatch.setattr(kl, "SCORE_BYTES", 4 * 256 * 10)  # 10 queries at a time
        for layout in (torch.contiguous_format, torch.channels_last):
            assert (block(x.contiguous(memory_format=layout)) - expected).abs().max().item() <= 1e-5


def test_kl_cli_tiles_and_verifies(vae, kl_files, small_image, tmp_path):
    weights = kl_files("sd15")["diffusers"]
    lat = tmp_path / "s.latent"
    result = vae("encode", small_image, "-o", lat, "--model", "sd15", "--weights", weights, "--tile", "32")
    assert result.exit_code == 0, result.stderr
    result = vae("decode", lat, "-o", tmp_path / "s.png", "--weights", weights, "--tile", "32", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)["verify"]
    assert check["tiled"] is True and check["window"] == [0, 0, 61, 45] and check["max_abs_diff"] <= 1e-3


def test_default_budget_is_half_the_available_ram_under_the_cap():
    """The tiny family caps its budget at 1 GiB; KL models (cap=None) get half the available RAM."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    cpu = torch.device("cpu")
    assert tiling.default_budget(cpu) == min(tiling.DEFAULT_BUDGET, available // 2)
    assert abs(tiling.default_budget(cpu, cap=None) - available // 2) < 256 << 20  # RAM in use moves a little
    assert tiling.default_budget(cpu, cap=None) > tiling.DEFAULT_BUDGET  # this machine has over 2 GB free
