"""`vae video` and video latents through `vae decode`: selection, streaming outputs, odd sizes, bad input."""

from __future__ import annotations

import json

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from vaecli import clips, metrics, video
from vaecli.latents import load_latent, read_metadata
from vaecli.media import quantize8, read_image


def _frames(path) -> tuple[dict, np.ndarray]:
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    return meta, np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen])


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_fourteen_frames_encode_and_decode(vae, real_weights, clip, tmp_path):
    lat, mp4 = tmp_path / "x.latent", tmp_path / "x.mp4"
    result = vae("video", clip, "--frames", 14, "-o", lat, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["shape"] == [14, 32, 40, 64] and record["fps"] == 24.0 and record["size"] == [512, 320]
    latent, meta = load_latent(lat)
    assert list(latent.shape) == [14, 32, 40, 64]
    assert meta["kind"] == "video" and meta["frame_indices"] == list(range(14)) and meta["source_size"] == [512, 320]

    result = vae("decode", lat, "-o", mp4)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == f"{lat} -> {mp4}  taef2 14 frames 512x320 @ 24 fps"
    out_meta, decoded = _frames(mp4)
    _, source = _frames(clip)
    assert decoded.shape == (14, 320, 512, 3)
    assert out_meta["fps"] == 24.0
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    psnrs = [metrics.psnr(to_t(decoded[i:i + 1]), to_t(source[i:i + 1])) for i in range(14)]
    assert sum(psnrs) / 14 >= 28.0


def test_roundtrip_reports_psnr_per_frame(vae, real_weights, clip, tmp_path):
    result = vae("video", clip, "--frames", 3, "--stride", 4, "-o", tmp_path / "r.latent", "--roundtrip", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["recon"] == str(tmp_path / "r.recon.mp4")
    assert len(record["psnr"]) == 3 and record["mean_psnr"] == pytest.approx(sum(record["psnr"]) / 3, abs=1e-3)
    assert record["mean_psnr"] > 27
    assert read_metadata(tmp_path / "r.latent")["frame_indices"] == [0, 4, 8]
    meta, frames = _frames(tmp_path / "r.recon.mp4")
    assert frames.shape == (3, 320, 512, 3) and meta["fps"] == 6.0


@pytest.mark.parametrize("args, indices, fps", [
    (["--start", 10, "--frames", 3], [10, 11, 12], 24.0),
    (["--fps", 8, "--frames", 4], [0, 3, 6, 9], 8.0),
    (["--start", 45], [45, 46, 47], 24.0),
])
def test_frame_selection(vae, real_weights, clip, tmp_path, args, indices, fps):
    result = vae("video", clip, "-o", tmp_path / "s.latent", *args)
    assert result.exit_code == 0, result.stderr
    meta = read_metadata(tmp_path / "s.latent")
    assert meta["frame_indices"] == indices and meta["fps"] == fps and meta["shape"][0] == len(indices)


def test_frames_beyond_the_clip_are_clamped_with_a_note(vae, real_weights, clip, tmp_path):
    result = vae("video", clip, "--start", 46, "--frames", 10, "-o", tmp_path / "s.latent")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == (f"note: {clip} has only 2 frames to select from frame 46; "
                                             f"encoded 2 of --frames 10")


def test_odd_sized_gif(vae, real_weights, gif, tmp_path):
    lat = tmp_path / "g.latent"
    result = vae("video", gif, "-o", lat, "--roundtrip", "--recon", tmp_path / "g.gif", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["shape"] == [24, 32, 4, 2] and record["size"] == [14, 25]
    from PIL import Image

    with Image.open(tmp_path / "g.gif") as img:
        assert img.size == (14, 25) and img.n_frames == 24
    result = vae("decode", lat, "-o", tmp_path / "g.mp4", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["size"] == [14, 25] and record["written_size"] == [14, 26]
    meta, frames = _frames(tmp_path / "g.mp4")
    assert frames.shape == (24, 26, 14, 3)


def test_decode_as_png_frames(vae, real_weights, gif, tmp_path):
    lat = tmp_path / "g.latent"
    assert vae("video", gif, "-o", lat, "--frames", 5).exit_code == 0
    result = vae("decode", lat, "-o", tmp_path / "out", "--as-frames")
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "out" / "g").iterdir())
    assert names == [f"frame_{i:06d}.png" for i in range(5)]


def test_svd_decodes_the_whole_clip_in_any_chunks(vae, kl_files, gif, tmp_path):
    files = kl_files("svd")
    lat = tmp_path / "s.latent"
    result = vae("video", gif, "-o", lat, "--frames", 6, "--model", "svd", "--weights", files["diffusers"])
    assert result.exit_code == 0, result.stderr
    latent, meta = load_latent(lat)
    assert list(latent.shape) == [6, 4, 4, 2]
    outs = []
    for chunk in (6, 4, 1):
        out = tmp_path / f"c{chunk}"
        result = vae("decode", lat, "-o", out, "--chunk", chunk, "--as-frames", "--weights", files["diffusers"])
        assert result.exit_code == 0, result.stderr
        outs.append(torch.stack([read_image(p)[0][0] for p in sorted((out / "s").iterdir())]))
    with torch.inference_mode():
        expected = files["reference"].decode(latent / 0.18215, num_frames=6).sample
    expected = quantize8(((expected + 1) / 2).clamp(0, 1)[..., :25, :14])
    for frames in outs:
        assert frames.shape == expected.shape
        assert (frames - expected).abs().max().item() <= 1 / 255  # 8-bit frames: at most one level from rounding


def test_interrupted_encode_leaves_nothing(real_weights, clip, tmp_path, monkeypatch):
    from vaecli.codec import load_codec

    codec = load_codec("taef2", device="cpu")
    calls = []
    real = codec.encode_batch

    def encode_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(codec, "encode_batch", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        clips.encode_clip(codec, clip, tmp_path / "x.latent", frames=4, chunk=2, recon=tmp_path / "r.mp4")
    assert list(tmp_path.iterdir()) == []


def test_frames_are_read_lazily(clip):
    from vaecli import video

    info, frames = video.read_frames(clip)
    first = [next(frames) for _ in range(2)]
    assert [i for i, _ in first] == [0, 1] and first[0][1].shape == (3, 320, 512)
    frames.close()


# --- bad input ----------------------------------------------------------------------------------------------

def test_not_a_video(vae, real_weights, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n")
    result = vae("video", bad, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {bad}: not a video ffmpeg can read"
    assert not (tmp_path / "x.latent").exists()


def test_still_image_is_not_a_video(vae, real_weights, small_image, tmp_path):
    result = vae("video", small_image, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {small_image}: is a still image, not a video (use 'vae encode')"


def test_zero_frames_selected(vae, real_weights, clip, tmp_path):
    result = vae("video", clip, "--start", 100, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {clip}: no frames selected (the clip ends before frame 100)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--stride", 2, "--fps", 5], "Error: use --stride or --fps, not both"),
    (["--recon", "r.mp4"], "Error: --recon needs --roundtrip"),
    (["--frames", 0], "Error: --chunk, --stride and --frames must be at least 1, --start at least 0, "
                      "--fps positive"),
])
def test_video_usage_errors(vae, real_weights, clip, tmp_path, args, message):
    result = vae("video", clip, "-o", tmp_path / "x.latent", *args)
    assert result.exit_code == 2
    assert _error_line(result) == message


def test_video_latent_to_image_extension(vae, real_weights, gif, tmp_path):
    lat = tmp_path / "g.latent"
    assert vae("video", gif, "-o", lat, "--frames", 2).exit_code == 0
    result = vae("decode", lat, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert _error_line(result) == (f"Error: {lat}: a latent video; write it as .mp4, .mov, .mkv, .webm, .gif "
                                   f"or use --as-frames")


def test_svd_roundtrip_reconstructs_the_whole_clip(vae, kl_files, gif, tmp_path):
    """`--roundtrip` with SVD decodes the clip as one after encoding it (chunk 2 here), and its PSNRs are measured
    against the source frames read again."""
    files = kl_files("svd")
    lat, recon = tmp_path / "s.latent", tmp_path / "r.gif"
    result = vae("video", gif, "-o", lat, "--frames", 5, "--chunk", 2, "--model", "svd", "--weights",
                 files["diffusers"], "--roundtrip", "--recon", recon, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    latent, meta = load_latent(lat)
    from vaecli.codec import load_codec

    whole = load_codec("svd", [files["diffusers"]], device="cpu").decode_frames(latent, meta)
    _, stream = video.read_frames(gif, limit=5)
    expected = [metrics.psnr(quantize8(w)[None], src[None]) for w, (_, src) in zip(whole, stream, strict=True)]
    assert report["psnr"] == pytest.approx(expected, abs=1e-3)
    assert len(list(iio.imiter(recon))) == 5
