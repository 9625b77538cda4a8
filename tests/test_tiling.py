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
    result = vae("encode", small_image, "--model", "sd15", "--weights", kl_files("sd15")["diffusers"],
                 "--tile", "256")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: --tile 256: tiling is implemented for the tiny (TAESD) family so far, "
                                     "not sd15")


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
