"""Latent file formats: safetensors metadata, the PNG mosaic, quantization, atomic writes."""

from __future__ import annotations

import errno

import pytest
import torch
from PIL import Image

from vaecli import latents
from vaecli.errors import OutputError
from vaecli.files import atomic_write
from vaecli.registry import REGISTRY


def _meta(name="taef2"):
    return latents.make_metadata(REGISTRY[name], (61, 45), (0, 0, 3, 3), "fp32")


def test_safetensors_roundtrip_exact(tmp_path):
    x = torch.randn(32, 6, 8)
    latents.save_safetensors(tmp_path / "a.latent", x, _meta())
    y, meta = latents.load_latent(tmp_path / "a.latent")
    assert torch.equal(x, y)
    assert meta == _meta()


@pytest.mark.parametrize("channels, grid", [(4, (1, 1)), (16, (2, 2)), (32, (2, 4)), (6, (1, 2))])
def test_png_mosaic_layout_and_quantization(tmp_path, channels, grid):
    x = torch.randn(channels, 5, 7) * 2
    meta = {**_meta(), "channels": channels}
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
    writer.close({"format": latents.FORMAT, "version": 1, "model": "taef2", "kind": "video", "fps": 24.0,
                  "image_size": [2048, 2048], "channels": 16})
    out = subprocess.run([sys.executable, "-c", _VIDEO_READ_SCRIPT, str(path)], capture_output=True, text=True,
                         check=True)
    grown_mb, total = out.stdout.split()
    assert float(total) == 32 * 16 * 256 * 256
    assert int(grown_mb) < 32  # two frames are 8 MB; read through the memory map it grew by 55 MB here
