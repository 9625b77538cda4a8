"""Latent file formats: safetensors metadata, the PNG mosaic, quantization, atomic writes."""

from __future__ import annotations

import errno
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from vaecli import latents, media
from vaecli.codec import check_latent_fits
from vaecli.errors import LatentFormatError, OutputError
from vaecli.files import atomic_write
from vaecli.registry import REGISTRY


def _meta(name="taef2", size=(61, 45), padding=(0, 0, 3, 3)):
    return latents.make_metadata(REGISTRY[name], size, padding, "fp32")


def test_safetensors_roundtrip_exact(tmp_path):
    x = torch.randn(32, 6, 8)
    latents.save_safetensors(tmp_path / "a.latent", x, _meta())
    y, meta = latents.load_latent(tmp_path / "a.latent")
    assert torch.equal(x, y)
    assert meta == _meta()


@pytest.mark.parametrize("channels, grid", [(4, (1, 1)), (16, (2, 2)), (32, (2, 4)), (6, (1, 2))])
def test_png_mosaic_layout_and_quantization(tmp_path, channels, grid):
    x = torch.randn(channels, 5, 7) * 2
    meta = {**_meta(size=(53, 37)), "model": "custom", "channels": channels}  # a model this vaecli does not know
    latents.save_png(tmp_path / "a.png", x, meta)
    with Image.open(tmp_path / "a.png") as img:
        assert img.mode == "RGBA"
        assert img.size == (7 * grid[1], 5 * grid[0])
    y, back = latents.load_latent(tmp_path / "a.png")
    assert y.shape == x.shape
    assert back == meta
    step = 6 / 255
    assert (y - x.clamp(-3, 3)).abs().max() <= step / 2 + 1e-6
    assert torch.equal(y, latents.quantize_png(x))


def test_png_scheme_matches_taesd_formula(tmp_path):
    x = torch.tensor([-4.0, -3.0, 0.0, 1.0]).reshape(4, 1, 1)
    latents.save_png(tmp_path / "a.png", x, {**_meta(), "channels": 4})
    with Image.open(tmp_path / "a.png") as img:
        assert list(img.getpixel((0, 0))) == [0, 0, 128, 170]  # round(clamp(x/6 + 0.5, 0, 1) * 255)


def test_channel_mismatch_in_metadata(tmp_path):
    with pytest.raises(latents.LatentFormatError) as exc:
        latents.save_safetensors(tmp_path / "a.latent", torch.zeros(4, 2, 2), _meta())
    assert str(exc.value) == f"{tmp_path / 'a.latent'}: metadata says 32 channels, tensor has 4"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def explode(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.latent", explode)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    (tmp_path / "out.latent").write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError) as err:
        atomic_write(tmp_path / "out.latent", fail)
    assert str(err.value) == f"{tmp_path / 'out.latent'}: cannot write: no space left on the device"
    assert (tmp_path / "out.latent").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.latent"]


def test_output_permissions_follow_umask(tmp_path):
    atomic_write(tmp_path / "o.bin", lambda p: p.write_bytes(b"x"))
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o.bin").stat().st_mode & 0o777 == 0o666 & ~umask


_VIDEO_READ_SCRIPT = """
import sys, torch
from vaecli.latents import open_latent_video
def status_kib(key):  # VmHWM: ru_maxrss would carry over the parent's peak across fork and exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
meta, shape, read = open_latent_video(sys.argv[1])
before = status_kib("VmHWM")
total = sum(float(read(i, i + 2).sum()) for i in range(0, shape[0], 2))
print((status_kib("VmHWM") - before) // 1024, total)
"""


def test_latent_video_frames_are_read_in_flat_memory(tmp_path):
    """Reading a long latent video a few frames at a time keeps no more than those frames resident."""
    import subprocess
    import sys

    path = tmp_path / "long.latent"
    writer = latents.LatentVideoWriter(path)
    frame = torch.ones(2, 16, 256, 256)  # 8 MB a pair of frames, 256 MB in all
    for _ in range(16):
        writer.write(frame)
    writer.close({"format": latents.FORMAT, "version": 1, "model": "taef1", "kind": "video", "fps": 24.0,
                  "image_size": [2048, 2048], "channels": 16})
    out = subprocess.run([sys.executable, "-c", _VIDEO_READ_SCRIPT, str(path)], capture_output=True, text=True,
                         check=True)
    grown_mb, total = out.stdout.split()
    assert float(total) == 32 * 16 * 256 * 256
    assert int(grown_mb) < 32  # two frames are 8 MB; read through the memory map it grew by 55 MB here


# --- hostile latents: refused with one line naming what was expected and what was found ----------------------

def _write_st(path, tensor, meta, key="latent"):
    """A `.safetensors` latent as any writer could make it (vaecli's own writer refuses some of these tensors)."""
    save_file({key: tensor}, str(path), {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    return path


@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.uint8, "U8"), (torch.bool, "BOOL"),
                                         (torch.float64, "F64")])
def test_image_latent_of_another_dtype_is_refused(tmp_path, dtype, name):
    path = _write_st(tmp_path / "a.latent", torch.zeros(32, 6, 8).to(dtype), _meta())
    for read in (latents.load_latent, latents.read_metadata):
        with pytest.raises(LatentFormatError) as err:
            read(path)
        assert str(err.value) == f"{path}: expected a float32/float16/bfloat16 latent, got {name}"


@pytest.mark.parametrize("key", ["latent", "latent_tensor"])
def test_a_header_past_16_mib_is_refused_unparsed(tmp_path, monkeypatch, key):
    """Parsing a header costs many times its size (a 92 MB header of metadata keys took 2.3 GB and a minute, within
    safetensors' own 100 MB limit): a latent file's, vaecli's or ComfyUI's, is refused from its length alone."""
    tensor = torch.zeros(1, 32, 6, 8) if key == "latent_tensor" else torch.zeros(32, 6, 8)
    meta = {**_meta(size=(64, 48), padding=(0, 0, 0, 0)), "workflow": "x" * latents.LATENT_MAX_HEADER}
    path = _write_st(tmp_path / "a.latent", tensor, meta, key)
    n = int.from_bytes(path.read_bytes()[:8], "little")
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("header parsed"))
    for read in (latents.load_latent, latents.read_metadata):
        with pytest.raises(LatentFormatError) as err:
            read(path, "taef2")
        assert str(err.value) == (f"{path}: expected a safetensors header of at most 16777216 bytes for a latent "
                                  f"file, got {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_image_latent_is_refused(tmp_path, dtype):
    x = torch.zeros(32, 6, 8)
    x[0, 0, 0], x[5, 2, 3] = float("nan"), float("-inf")
    path = _write_st(tmp_path / "a.latent", x.to(dtype), _meta())
    with pytest.raises(LatentFormatError) as err:
        latents.load_latent(path)
    assert str(err.value) == f"{path}: expected finite latent values, found 2 NaN/Inf"


def test_non_finite_latent_video_is_refused_chunk_by_chunk(tmp_path):
    """Frames are checked as they are read: frames 0-1 read fine, the NaN in frame 2 stops the read that holds it."""
    path = tmp_path / "v.latent"
    frames = torch.zeros(3, 32, 6, 8)
    frames[2, 1] = float("nan")
    _write_st(path, frames, {**_meta(), "kind": "video", "fps": 24.0})  # vaecli's writer refuses NaN
    meta, shape, read = latents.open_latent_video(path)
    assert shape == [3, 32, 6, 8] and torch.equal(read(0, 2), frames[:2])
    with pytest.raises(LatentFormatError) as err:
        read(1, 3)
    assert str(err.value) == f"{path}: expected finite latent values, found 48 NaN/Inf in latent frames 1-2"
    with pytest.raises(LatentFormatError) as err:
        read(2, 3)
    assert str(err.value) == f"{path}: expected finite latent values, found 48 NaN/Inf in latent frame 2"


def test_non_finite_comfyui_latent_is_refused(tmp_path):
    x = torch.zeros(1, 32, 6, 8)
    x[0, 3, 1, 1] = float("inf")
    path = tmp_path / "c.latent"
    save_file({latents.COMFYUI_KEY: x, latents.COMFYUI_MARKER: torch.zeros(0)}, str(path))
    with pytest.raises(LatentFormatError) as err:
        latents.load_latent(latents.latent_item(path, "taef2"))
    assert str(err.value) == f"{path}: expected finite latent values, found 1 NaN/Inf"


_BAD_METADATA = [
    ({"image_size": [5000, 5000]}, "metadata 'image_size' must be [W, H] with W in 57..64 and H in 41..48 for a 6x8 "
                                   "(h x w) latent at spatial factor 8, got [5000, 5000]"),
    ({"image_size": [1, 1]}, "metadata 'image_size' must be [W, H] with W in 57..64 and H in 41..48 for a 6x8 (h x w) "
                             "latent at spatial factor 8, got [1, 1]"),
    ({"padding": [999, 999, 0, 0]}, "metadata 'padding' must add 3 columns and 3 rows (left + right, top + bottom) "
                                    "to the 61x45 image of a 6x8 latent at spatial factor 8, got [999, 999, 0, 0]"),
    ({"padding": [0, 0, 3, 11]}, "metadata 'padding' must add 3 columns and 3 rows (left + right, top + bottom) to "
                                 "the 61x45 image of a 6x8 latent at spatial factor 8, got [0, 0, 3, 11]"),
    ({"image_size": None, "padding": [0, 0, 8, 0]},
     "metadata 'padding' must add under 8 columns and under 8 rows (left + right, top + bottom) at spatial factor 8, "
     "got [0, 0, 8, 0]"),
    ({"spatial_factor": 32}, "metadata 'spatial_factor' must be 8 for taef2 'raw' latents, got 32"),
    ({"spatial_factor": 0}, "metadata 'spatial_factor' must be a positive integer, got '0'"),
    ({"space": "bogus"}, "metadata 'space' must be one of raw, scaled, normalized, native, got 'bogus'"),
    ({"kind": "audio"}, "metadata 'kind' must be one of image, video, got 'audio'"),
    ({"model": "taesana", "space": "native"}, "metadata 'spatial_factor' must be 32 for taesana 'native' latents, "
                                              "got 8"),
    ({"model": "someone-elses-vae", "spatial_factor": 16},
     "metadata 'image_size' must be [W, H] with W in 113..128 and H in 81..96 for a 6x8 (h x w) latent at spatial "
     "factor 16, got [61, 45]"),
]


@pytest.mark.parametrize("change, message", _BAD_METADATA)
def test_metadata_contradicting_the_latent_is_refused(tmp_path, change, message):
    meta = {k: v for k, v in {**_meta(), **change}.items() if v is not None}
    path = _write_st(tmp_path / "a.latent", torch.zeros(32, 6, 8), meta)
    for read in (latents.load_latent, latents.read_metadata):
        with pytest.raises(LatentFormatError) as err:
            read(path)
        assert str(err.value) == f"{path}: {message}"


def test_comfyui_latent_with_contradicting_vaecli_metadata_is_refused(tmp_path):
    path = tmp_path / "c.latent"
    latents.save_comfyui(path, torch.zeros(32, 6, 8), {**_meta(), "space": "raw", "image_size": [5000, 5000]})
    with pytest.raises(LatentFormatError) as err:
        latents.read_metadata(latents.latent_item(path))
    assert str(err.value) == (f"{path}: metadata 'image_size' must be [W, H] with W in 57..64 and H in 41..48 for a "
                              f"6x8 (h x w) latent at spatial factor 8, got [5000, 5000]")


def test_empty_latent_dimension_is_refused(tmp_path):
    path = _write_st(tmp_path / "a.latent", torch.zeros(32, 0, 8), _meta())
    with pytest.raises(LatentFormatError) as err:
        latents.load_latent(path)
    assert str(err.value) == f"{path}: expected every latent dimension to be at least 1, got shape [32, 0, 8]"


def test_optional_metadata_may_be_missing(tmp_path):
    """Files without version, image_size, padding or spatial_factor still read (and decode uncropped)."""
    meta = {k: v for k, v in _meta().items() if k not in ("version", "image_size", "padding", "spatial_factor")}
    x = torch.randn(32, 6, 8)
    y, back = latents.load_latent(_write_st(tmp_path / "a.latent", x, meta))
    assert torch.equal(x, y) and back == meta
    check_latent_fits(REGISTRY["taef2"], y.shape, back)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_what_encode_records_fits_every_model_space_and_size(name):
    """The padding encode records (pad_to_multiple) and make_metadata's factor pass the checks, 1x1 images too."""
    spec = REGISTRY[name]
    for space in spec.spaces:
        f = latents.latent_factor(spec, space)
        channels = spec.latent_channels * (spec.normalized_patch ** 2 if space == "normalized" else 1)
        for w, h in [(1, 1), (3, 2), (61, 45), (f, f), (f + 1, 2 * f - 1)]:
            _, padding = media.pad_to_multiple(torch.zeros(1, 3, h, w), f)
            meta = latents.make_metadata(spec, (w, h), padding, "fp32", space, channels)
            latents._check_layout([channels, -(-h // f), -(-w // f)], meta, "x")
            check_latent_fits(spec, [channels, -(-h // f), -(-w // f)], meta)


def test_decoding_past_the_pixel_limit_is_refused_before_reading(tmp_path, monkeypatch):
    """A 6x8 taef2 latent decodes to 64x48 = 3072 pixels: refused under a lower VAE_MAX_PIXELS, by the file reader
    (before the tensor is read) and by the codec's check (for latents made in memory)."""
    x = torch.randn(32, 6, 8)
    latents.save_safetensors(tmp_path / "a.latent", x, _meta())
    monkeypatch.setenv("VAE_MAX_PIXELS", "3071")
    message = ("it decodes to 64x48 pixels, over the limit of 3071 pixels (set VAE_MAX_PIXELS to allow larger "
               "images)")
    with pytest.raises(LatentFormatError) as err:
        latents.load_latent(tmp_path / "a.latent")
    assert str(err.value) == f"{tmp_path / 'a.latent'}: {message}"
    with pytest.raises(LatentFormatError) as err:
        check_latent_fits(REGISTRY["taef2"], x.shape, _meta())
    assert str(err.value) == message
    monkeypatch.setenv("VAE_MAX_PIXELS", "3072")
    assert torch.equal(latents.load_latent(tmp_path / "a.latent")[0], x)


# --- latent PNGs: pixel limit, complete pixel data ---------------------------------------------------------

_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _hand_png(path, src, rows=None, interlace=False, text_last=False, depth=8):
    """Latent PNG `src` rebuilt by hand: its IDAT holding only `rows` rows, Adam7-interlaced, its text after it, or
    16 bits per channel (v * 257)."""
    with Image.open(src) as img:
        arr, text = np.asarray(img), img.info["vaecli"]
    h, w = arr.shape[:2]
    if depth == 16:
        arr = arr.astype(">u2") * 257
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    raw = b"".join(b"\0" + row.tobytes() for x0, y0, dx, dy in passes for row in arr[y0::dy, x0::dx] if row.size)
    raw = raw if rows is None else raw[:rows * (1 + 4 * w)]
    text_chunk = _png_chunk(b"tEXt", b"vaecli\0" + text.encode("latin-1"))
    body = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 6, 0, 0, int(interlace))), text_chunk,
            _png_chunk(b"IDAT", zlib.compress(raw)), _png_chunk(b"IEND", b"")]
    if text_last:
        body[1:3] = body[2:0:-1]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(body))
    return path


def _small_png_latent(tmp_path):
    """A (4, 2, 3) latent PNG: a 3x2 mosaic (26 bytes of pixel data), from a 24x16 image."""
    x = torch.randn(4, 2, 3)
    meta = latents.make_metadata(REGISTRY["taesd"], (24, 16), (0, 0, 0, 0), "fp32")
    latents.save_png(tmp_path / "a.latent.png", x, meta)
    return tmp_path / "a.latent.png", latents.quantize_png(x)


def test_truncated_png_pixel_data_is_refused(tmp_path):
    """Pillow zero-fills a well-formed but short IDAT stream; the mosaic must hold all its rows."""
    src, _ = _small_png_latent(tmp_path)
    bad = _hand_png(tmp_path / "t.latent.png", src, rows=1)
    with pytest.raises(LatentFormatError) as err:
        latents.load_latent(bad)
    assert str(err.value) == f"{bad}: truncated latent PNG: its pixel data holds 13 bytes, its size needs 26"


def test_a_png_grid_with_more_tiles_than_channel_groups_is_refused_unread(tmp_path, monkeypatch):
    """Every tile was read and made float, used or not: a 262 KB PNG declaring a 2000x2000 grid for 32 channels
    (8 tiles) took 2.7 GB to decode."""
    src, _ = _small_png_latent(tmp_path)  # (4, 2, 3): one tile
    with Image.open(src) as img:
        meta = {**json.loads(img.info["vaecli"]), "grid": [1, 2]}
    info = PngImagePlugin.PngInfo()
    info.add_text("vaecli", json.dumps(meta))
    Image.new("RGBA", (6, 2), (128, 128, 128, 128)).save(tmp_path / "g.latent.png", pnginfo=info)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("pixels read"))
    for read in (latents.load_latent, latents.read_metadata):
        with pytest.raises(LatentFormatError) as err:
            read(tmp_path / "g.latent.png")
        assert str(err.value) == f"{tmp_path / 'g.latent.png'}: a 1x2 grid holds 2 4-channel tiles, 4 channels need 1"


def test_a_16_bit_png_latent_is_refused(tmp_path):
    """Pillow reads a 16-bit RGBA PNG as RGBA, keeping each sample's high byte: its values were taken at 8 bits
    unsaid (the scheme's PNGs are 8-bit)."""
    src, _ = _small_png_latent(tmp_path)
    bad = _hand_png(tmp_path / "d.latent.png", src, depth=16)
    for read in (latents.load_latent, latents.read_metadata):
        with pytest.raises(LatentFormatError) as err:
            read(bad)
        assert str(err.value) == f"{bad}: expected an 8-bit RGBA latent PNG, got 16 bits per channel"


@pytest.mark.parametrize("how", [{"interlace": True}, {"text_last": True}])
def test_png_latents_other_tools_may_write_still_read(tmp_path, how):
    src, expected = _small_png_latent(tmp_path)
    y, meta = latents.load_latent(_hand_png(tmp_path / "b.latent.png", src, **how))
    assert torch.equal(y, expected) and meta["image_size"] == [24, 16]


def test_png_mosaic_over_the_pixel_limit_is_refused_without_warnings(tmp_path, monkeypatch):
    """A 3x2 mosaic is 6 pixels: over a limit of 5 Pillow would only warn, over 2 it raises; one error either way."""
    src, _ = _small_png_latent(tmp_path)
    for limit in ("5", "2"):
        monkeypatch.setenv("VAE_MAX_PIXELS", limit)
        for read in (latents.load_latent, latents.read_metadata):
            with pytest.raises(LatentFormatError) as err:
                read(src)
            assert str(err.value) == (f"{src}: latent PNG mosaic has 6 pixels, over the limit of {limit} pixels (set "
                                      f"VAE_MAX_PIXELS to allow larger latent PNG mosaics)")


def test_png_decode_size_is_checked_before_its_pixels_are_read(tmp_path, monkeypatch):
    src, _ = _small_png_latent(tmp_path)
    monkeypatch.setenv("VAE_MAX_PIXELS", "383")  # the mosaic (6 pixels) fits; its decode (24x16 = 384) does not
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("pixels read"))
    with pytest.raises(LatentFormatError) as err:
        latents.load_latent(src)
    assert str(err.value) == (f"{src}: it decodes to 24x16 pixels, over the limit of 383 pixels (set VAE_MAX_PIXELS "
                              f"to allow larger images)")


def test_png_text_after_the_pixels_is_found_without_decoding_them(tmp_path, monkeypatch):
    """A small file of zeros declaring a big picture (within the pixel limit) with the vaecli chunk after its pixel
    data, or none at all, is refused from its chunks: Pillow reached such a chunk only by decoding every pixel."""
    src, _ = _small_png_latent(tmp_path)
    with Image.open(src) as img:
        text = _png_chunk(b"tEXt", b"vaecli\0" + img.info["vaecli"].encode("latin-1"))
    z = zlib.compressobj(9)
    idat = _png_chunk(b"IDAT", b"".join(z.compress(bytes(1 + 4 * 2000)) for _ in range(2000)) + z.flush())
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2000, 2000, 8, 6, 0, 0, 0))
    (tmp_path / "after.latent.png").write_bytes(head + idat + text + _png_chunk(b"IEND", b""))
    (tmp_path / "none.latent.png").write_bytes(head + idat + _png_chunk(b"IEND", b""))
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("pixels read"))
    none = "a PNG without vaecli latent metadata (is it an image? use 'vae encode' on images)"
    for name, message in (("after", "mosaic is 2000x2000, expected 3x2 for a 4x2x3 latent"), ("none", none)):
        path = tmp_path / f"{name}.latent.png"
        for read in (latents.load_latent, latents.read_metadata):
            with pytest.raises(LatentFormatError) as err:
                read(path)
            assert str(err.value) == f"{path}: {message}"


def test_png_latent_cannot_be_a_video(tmp_path):
    meta = {**latents.make_metadata(REGISTRY["taef2"], (24, 16), (0, 0, 0, 0), "fp32", channels=4), "kind": "video"}
    info = PngImagePlugin.PngInfo()
    info.add_text("vaecli", json.dumps({**meta, "grid": [1, 1], "latent_shape": [4, 2, 3]}))
    Image.new("RGBA", (3, 2)).save(tmp_path / "v.latent.png", pnginfo=info)
    with pytest.raises(LatentFormatError) as err:
        latents.read_metadata(tmp_path / "v.latent.png")
    assert str(err.value) == (f"{tmp_path / 'v.latent.png'}: metadata 'kind' must be image in a latent PNG (it holds "
                              f"one latent), got 'video'")


def _write_header(path: Path, header, data: bytes) -> None:
    """A safetensors-shaped file of `header` (a dict, or raw JSON bytes) and `data`."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


# --- through the CLI: one Error line each, a JSON record each, exit 1, nothing written ------------------------

def test_decode_of_hostile_latents(vae, real_weights, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    good = torch.randn(32, 6, 8)
    latents.save_safetensors(folder / "good.latent", good, _meta())
    nan = good.clone()
    nan[0, 0, 0] = float("nan")
    _write_st(folder / "nan.latent", nan, _meta())
    _write_st(folder / "i32.latent", good.to(torch.int32), _meta())
    _write_st(folder / "size.latent", good, {**_meta(), "image_size": [5000, 5000]})
    _write_st(folder / "big.latent", torch.randn(32, 7, 8), _meta(size=(64, 56), padding=(0, 0, 0, 0)))
    latents.save_png(folder / "png.latent.png", good, _meta())
    _hand_png(folder / "trunc.latent.png", folder / "png.latent.png", rows=3)
    data = good.numpy().tobytes()  # crafted headers: a ComfyUI dtype that is a list, JSON nested 100000 deep
    _write_header(folder / "listdtype.latent", {"latent_tensor": {"dtype": ["F32"], "shape": [1, 32, 6, 8],
                                                                  "data_offsets": [0, len(data)]}}, data)
    _write_header(folder / "deep.latent", b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", data)
    _write_header(folder / "deepmeta.latent", {"latent": {"dtype": "F32", "shape": [32, 6, 8],
                                                          "data_offsets": [0, len(data)]},
                                               "__metadata__": {**{k: v if isinstance(v, str) else json.dumps(v)
                                                                   for k, v in _meta().items()},
                                                                "image_size": "[" * 100000 + "]" * 100000}}, data)
    monkeypatch.setenv("VAE_MAX_PIXELS", "3072")  # good (64x48) decodes, big (64x56) does not
    result = vae("decode", folder, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    records = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert records.pop("good.latent")["status"] == "ok" and records.pop("png.latent.png")["status"] == "ok"
    assert {n: r["error"] for n, r in records.items()} == {n: f"{folder / n}: {m}" for n, m in {
        "nan.latent": "expected finite latent values, found 1 NaN/Inf",
        "i32.latent": "expected a float32/float16/bfloat16 latent, got I32",
        "size.latent": "metadata 'image_size' must be [W, H] with W in 57..64 and H in 41..48 for a 6x8 (h x w) "
                       "latent at spatial factor 8, got [5000, 5000]",
        "big.latent": "it decodes to 64x56 pixels, over the limit of 3072 pixels (set VAE_MAX_PIXELS to allow larger "
                      "images)",
        "trunc.latent.png": "truncated latent PNG: its pixel data holds 387 bytes, its size needs 1548",
        "listdtype.latent": "expected a float32/float16/bfloat16 latent_tensor, got ['F32']",
        "deep.latent": "truncated or corrupt safetensors file (Error while deserializing header: invalid JSON in "
                       "header: recursion limit exceeded at line 1 column 132)",
        "deepmeta.latent": f"metadata 'image_size' must be [W, H] of positive integers, got {'[' * 40!r}",
    }.items()}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png", "png.png"]
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr


def test_decode_of_a_png_mosaic_past_the_limit_is_one_line(vae, real_weights, tmp_path, monkeypatch):
    """Between the limit and twice it Pillow only warns: no warning text reaches stderr, just the Error line."""
    latents.save_png(tmp_path / "a.latent.png", torch.randn(32, 6, 8), _meta())  # a 32x12 mosaic: 384 pixels
    monkeypatch.setenv("VAE_MAX_PIXELS", "200")
    result = vae("decode", tmp_path / "a.latent.png", "-o", tmp_path / "a.png")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"Error: {tmp_path / 'a.latent.png'}: latent PNG mosaic has 384 pixels, "
                                          f"over the limit of 200 pixels (set VAE_MAX_PIXELS to allow larger latent "
                                          f"PNG mosaics)"]
    assert not (tmp_path / "a.png").exists()


def test_atomic_write_takes_any_name_the_file_system_takes(tmp_path):
    """The temp file's name is longer than its output's: for a name near the limit it is cut (plus a digest of the
    whole), so a legal 255-byte output name is written, where it failed with 'File name too long'."""
    import os

    for name in ("a" * 251 + ".png", "é" * 125 + "x.png", "b" * 240 + ".latent"):
        assert len(os.fsencode(name)) <= 255
        dest = tmp_path / name
        atomic_write(dest, lambda p: p.write_bytes(b"x"))
        assert dest.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a" * 251 + ".png", "é" * 125 + "x.png", "b" * 240 + ".latent"])


def test_atomic_write_removes_abandoned_temp_files_but_not_a_live_writers(tmp_path):
    """A temp file left by a killed run is removed by the next write of that output; one that another run is
    writing at this moment (it holds the temp file's lock) is left to it."""
    import fcntl
    import os

    dest = tmp_path / "out.latent"
    abandoned = tmp_path / ".out.latent.abcd1234.part"
    abandoned.write_bytes(b"killed")
    live = tmp_path / ".out.latent.live5678.part"
    live.write_bytes(b"in progress")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        atomic_write(dest, lambda p: p.write_bytes(b"done"))
        assert not abandoned.exists()
        assert live.read_bytes() == b"in progress"
        assert dest.read_bytes() == b"done"
    finally:
        os.close(fd)
    atomic_write(dest, lambda p: p.write_bytes(b"again"))  # now unlocked: abandoned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.latent"]


def test_temp_names_are_cut_at_whole_characters(tmp_path):
    """A temp name cut to fit keeps whole UTF-8 characters (some file systems refuse invalid UTF-8 names)."""
    import os

    from vaecli.files import temp_prefix

    for name in ("é" * 125 + "x.png", "a" + "漢" * 84 + ".png", "b" * 251 + ".png"):
        prefix = temp_prefix(tmp_path / name)
        raw = os.fsencode(prefix)
        assert raw.decode("utf-8") == prefix and len(raw) + len("XXXXXXXX.part") <= 255
        assert prefix.startswith("." + name[:10]) and prefix.endswith(".")


def test_a_writer_holds_its_temp_file_while_another_run_writes_the_same_output(tmp_path):
    """Two runs writing one output: the second's stale-temp cleanup leaves the first's temp file, which it holds
    locked while writing; the last rename wins, and nothing is left behind."""
    dest = tmp_path / "out.latent"
    seen = {}

    def first(tmp):
        tmp.write_bytes(b"first")
        atomic_write(dest, lambda p: p.write_bytes(b"second"))  # meanwhile, another run
        seen["kept"] = tmp.exists() and tmp.read_bytes() == b"first"

    atomic_write(dest, first)
    assert seen["kept"]
    assert dest.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.latent"]


def test_stale_temp_cleanup_leaves_what_is_no_regular_file(tmp_path):
    """A FIFO named like a temp file would block an open() for reading: it is left alone, and the write goes on."""
    import os
    import signal

    fifo = tmp_path / ".out.latent.abcd1234.part"
    os.mkfifo(fifo)
    previous = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(RuntimeError("blocked")))
    signal.alarm(10)
    try:
        atomic_write(tmp_path / "out.latent", lambda p: p.write_bytes(b"x"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert fifo.exists() and (tmp_path / "out.latent").read_bytes() == b"x"


def _claiming(path: Path, shape: list[int], meta: dict) -> Path:
    """A latent whose header claims `shape` in a sparse file: its size on disk is the header's alone."""
    _write_header(path, {"__metadata__": {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()},
                         "latent": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * int(np.prod(shape))]}},
                  b"")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + 4 * int(np.prod(shape)))
    return path


def test_claimed_sizes_are_refused_from_the_header(tmp_path):
    """A few KB on disk claimed GBs that were read before the checks that needed only the header."""
    unknown = {"format": latents.FORMAT, "version": 1, "model": "elsewhere", "space": "raw"}
    cases = [
        ([4_000_000, 8, 8], {**_meta(size=(64, 64), padding=(0, 0, 0, 0)), "channels": 4_000_000},
         "expected 32 latent channels for taef2, got 4000000"),
        ([200, 8, 8], unknown, "expected at most 128 latent channels (the most any model here decodes), got 200"),
        # whichever model decodes it has a spatial factor of 8 or more
        ([32, 3000, 3000], unknown, "it decodes to 24000x24000 pixels, over the limit of 268435456 pixels (set "
                                    "VAE_MAX_PIXELS to allow larger images)"),
    ]
    for i, (shape, meta, message) in enumerate(cases):
        path = _claiming(tmp_path / f"{i}.latent", shape, meta)
        for read in (latents.load_latent, latents.read_metadata):
            with pytest.raises(LatentFormatError) as err:
                read(path)
            assert str(err.value) == f"{path}: {message}"


def test_latent_writers_refuse_nan_and_inf(tmp_path):
    """What a model gave that overflowed is never written: such a file is refused when read, or decodes to garbage."""
    from vaecli.errors import ComputeError

    x = torch.zeros(32, 6, 8)
    x[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for save, name in ((latents.save_safetensors, "a.latent"), (latents.save_png, "a.latent.png"),
                       (latents.save_comfyui, "c.latent")):
        with pytest.raises(ComputeError) as err:
            save(tmp_path / name, x, {**_meta(), "space": "raw"})
        assert str(err.value) == (f"{tmp_path / name}: expected finite latents to write, the model gave 3 NaN/Inf "
                                  f"(an overflow: try another --dtype); nothing was written")
    writer = latents.LatentVideoWriter(tmp_path / "v.latent")
    writer.write(torch.zeros(2, 32, 6, 8))
    with pytest.raises(ComputeError) as err:
        writer.write(x[None])
    writer.abort()
    assert str(err.value) == (f"{tmp_path / 'v.latent'}: expected finite latents to write, the model gave 3 NaN/Inf "
                              f"in latent frames from 2 (an overflow: try another --dtype); nothing was written")
    with pytest.raises(ComputeError) as err:
        media.to_uint8(x[:3])
    assert str(err.value) == "expected finite pixels, the model gave 3 NaN/Inf (an overflow: try another --dtype)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
