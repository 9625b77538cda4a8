"""Image reading: modes, EXIF orientation, alpha, 16-bit, decompression bombs; padding and cropping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vaecli import media
from vaecli.errors import InputError, OutputError


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=100)
    pixels, info = media.read_image(path)
    assert info.size == (20, 40)
    assert pixels.shape == (1, 3, 40, 20)
    assert pixels[0, 2, 2, 10] > 0.9 and pixels[0, 0, 2, 10] < 0.1  # the blue band is now on top


@pytest.mark.parametrize("alpha, expected", [("white", 1.0), ("black", 0.0), ("drop", 0.2)])
def test_rgba_alpha_modes(tmp_path, alpha, expected):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., :3] = 51  # 0.2
    arr[..., 3] = 0  # fully transparent
    path = tmp_path / "t.png"
    Image.fromarray(arr, "RGBA").save(path)
    pixels, info = media.read_image(path, alpha=alpha)
    assert info.had_alpha
    assert torch.allclose(pixels, torch.full_like(pixels, expected), atol=1e-6)


def test_grayscale_and_palette_become_rgb(tmp_path):
    Image.new("L", (9, 7), 128).save(tmp_path / "g.png")
    pal = Image.new("P", (9, 7), 3)
    pal.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20, 255, 0, 0])
    pal.save(tmp_path / "p.png")
    g, _ = media.read_image(tmp_path / "g.png")
    p, _ = media.read_image(tmp_path / "p.png")
    assert g.shape == p.shape == (1, 3, 7, 9)
    assert torch.allclose(g, torch.full_like(g, 128 / 255))
    assert torch.allclose(p[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_palette_with_transparency_is_composited(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 0])
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pt.png", transparency=1)
    pixels, info = media.read_image(tmp_path / "pt.png")
    assert info.had_alpha
    assert torch.allclose(pixels, torch.ones_like(pixels))


@pytest.mark.parametrize("mode, key, other", [("RGB", (10, 20, 30), (200, 100, 50)), ("L", 7, 200),
                                              ("I;16", 7000, 50000)])
@pytest.mark.parametrize("alpha, expected", [("white", 1.0), ("black", 0.0)])
def test_transparent_colour_key_is_composited(tmp_path, mode, key, other, alpha, expected):
    """A PNG's tRNS colour (RGB, grayscale, 16-bit grayscale) is transparency as an alpha channel is."""
    arr = np.array([[key, key, other, other]] * 2, dtype=np.uint16 if mode == "I;16" else np.uint8)
    img = Image.fromarray(arr)  # the left half is the transparent colour
    assert img.mode == mode
    img.save(tmp_path / "key.png", transparency=key)
    pixels, info = media.read_image(tmp_path / "key.png", alpha=alpha)
    assert info.had_alpha
    assert torch.equal(pixels[..., :2], torch.full((1, 3, 2, 2), expected))
    scale = 65535 if mode == "I;16" else 255
    kept = torch.tensor(other if mode == "RGB" else (other,) * 3, dtype=torch.float32) / scale
    assert torch.allclose(pixels[0, :, :, 2:], kept[:, None, None].expand(3, 2, 2), atol=1e-6)
    dropped, _ = media.read_image(tmp_path / "key.png", alpha="drop")
    assert torch.allclose(dropped[0, :, 0, 0], torch.tensor(key if mode == "RGB" else (key,) * 3) / scale,
                          atol=1e-6)


def test_sixteen_bit_grayscale_keeps_precision(tmp_path):
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 7).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    pixels, _ = media.read_image(tmp_path / "g16.png")
    expected = torch.from_numpy(arr.astype(np.float32) / 65535)
    assert torch.allclose(pixels[0, 1], expected, atol=1e-6)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setenv("VAE_MAX_PIXELS", "1000")
    with pytest.raises(InputError) as exc:
        media.read_image(tmp_path / "big.png")
    assert str(exc.value) == (f"{tmp_path / 'big.png'}: image has 1600 pixels, over the limit of 1000 pixels "
                              f"(set VAE_MAX_PIXELS to allow larger images)")
    monkeypatch.setenv("VAE_MAX_PIXELS", "100")  # past twice the limit Pillow raises instead of warning
    with pytest.raises(InputError) as exc:
        media.read_image(tmp_path / "big.png")
    assert str(exc.value).startswith(f"{tmp_path / 'big.png'}: image has 1600 pixels, over the limit of 100 pixels")
    monkeypatch.setenv("VAE_MAX_PIXELS", "1600")
    assert media.read_image(tmp_path / "big.png")[0].shape == (1, 3, 40, 40)


def test_bomb_limit_reaches_the_cli(vae, real_weights, tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setenv("VAE_MAX_PIXELS", "1000")
    result = vae("encode", tmp_path / "big.png", "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"Error: {tmp_path / 'big.png'}: image has 1600 pixels, over the limit of 1000 "
                                     f"pixels (set VAE_MAX_PIXELS to allow larger images)")


@pytest.mark.parametrize("h, w", [(45, 61), (3, 5), (16, 16)])
def test_pad_then_crop_restores(h, w):
    x = torch.rand(1, 3, h, w)
    padded, padding = media.pad_to_multiple(x, 8)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert torch.equal(padded[..., :h, :w], x)
    assert torch.equal(media.crop(padded, (w, h), padding), x)


def test_write_image_is_atomic_and_rounds(tmp_path):
    x = torch.full((1, 3, 4, 4), 0.5)
    media.write_image(tmp_path / "o.png", x)
    assert np.asarray(Image.open(tmp_path / "o.png")).max() == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


@pytest.mark.parametrize("ext, side, name", [(".jpg", 65500, "JPEG"), (".webp", 16383, "WebP")])
def test_an_image_past_the_encoders_limit_is_refused_before_writing(tmp_path, ext, side, name):
    """libjpeg and libwebp fail past their size limits without a word of why (libjpeg on stderr)."""
    path = tmp_path / f"wide{ext}"
    media.write_image(path, torch.zeros(1, 3, 1, side))  # the limit itself is written
    with pytest.raises(OutputError) as exc:
        media.write_image(path, torch.zeros(1, 3, 1, side + 1))
    assert str(exc.value) == (f"{path}: cannot write: expected at most {side} pixels a side for {name}, "
                              f"got {side + 1}x1 (write .png or .tif)")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
