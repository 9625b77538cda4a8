"""`vae video` and video latents through `vae decode`: selection, streaming outputs, odd sizes, bad input."""

from __future__ import annotations

import json

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import deny_search_of
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
    (["--fps", 24.024, "--frames", 3], [0, 1, 2], 24.0),  # 30 for a 29.97 fps clip: the clip's rate, every frame
    (["--fps", 23.976, "--frames", 3], [0, 1, 2], 24.0),
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


def test_svd_sample_draws_each_frame_from_its_own_seed(vae, kl_files, gif, tmp_path):
    """`vae video --sample --seed` with a KL encoder: latent frame i is the posterior mean plus its std times noise
    from `frame_seed(seed, i)`, whatever the chunk; the seed is recorded."""
    from vaecli.pipeline import frame_seed

    files = kl_files("svd")
    got = []
    for chunk in (1, 3):
        lat = tmp_path / f"s{chunk}.latent"
        result = vae("video", gif, "-o", lat, "--frames", 4, "--model", "svd", "--weights", files["diffusers"],
                     "--sample", "--seed", 5, "--chunk", chunk)
        assert result.exit_code == 0, result.stderr
        latent, meta = load_latent(lat)
        assert meta["sample_seed"] == 5
        got.append(latent)
    assert (got[0] - got[1]).abs().max().item() == 0.0
    x = _source(gif, 4)[0].movedim(1, 0)
    with torch.inference_mode():
        post = files["reference"].encode(x * 2 - 1).latent_dist
    noise = torch.stack([torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(frame_seed(5, i)))
                         for i in range(4)])
    expected = (post.mean + post.std * noise) * 0.18215
    assert (got[0] - expected[..., :4, :2]).abs().max().item() <= 1e-4
    assert (got[0] - post.mean[..., :4, :2] * 0.18215).abs().max().item() > 0.05


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


def test_an_empty_or_unreadable_clip_says_so(vae, real_weights, clip, tmp_path, monkeypatch):
    """Both were 'not a video ffmpeg can read' (ffmpeg's refusal), as if the file's content were at fault."""
    import builtins
    import errno
    import os

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    result = vae("video", empty, "-o", tmp_path / "x.latent", "--json")
    assert (result.exit_code, _error_line(result)) == (1, f"Error: {empty}: empty file, expected a video")
    assert json.loads(result.stdout)["error"] == f"{empty}: empty file, expected a video"
    small = _small_clip(tmp_path, clip)
    if os.geteuid() != 0:
        small.chmod(0)
    else:  # root ignores modes: refuse opening it
        real = builtins.open

        def deny(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == str(small):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", deny)
    result = vae("video", small, "-o", tmp_path / "x.latent")
    small.chmod(0o644)
    assert (result.exit_code, _error_line(result)) == (1, f"Error: {small}: cannot read: permission denied")
    assert not (tmp_path / "x.latent").exists()


def test_a_cut_off_avi_is_an_error(vae, real_weights, tmp_path):
    """An AVI cut in half lost its index: ffmpeg estimated the duration from what was left, decoded the frames before
    the cut and exited 0, so half the clip was encoded without a word. Its RIFF header still declares the length."""
    import subprocess

    whole, cut = tmp_path / "whole.avi", tmp_path / "cut.avi"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=64x48:rate=10", "-frames:v", "30", "-c:v", "mjpeg", whole], check=True)
    size = whole.stat().st_size
    cut.write_bytes(whole.read_bytes()[: size // 2])
    result = vae("video", cut, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    line = _error_line(result)
    assert line.startswith(f"Error: {cut}: truncated or corrupt video: the file holds {size // 2} of the {size} "
                           f"bytes its AVI header declares (") and line.endswith(")")
    assert not (tmp_path / "x.latent").exists()
    assert vae("video", cut, "-o", tmp_path / "first.latent", "--frames", 2).exit_code == 0  # before the cut
    result = vae("video", whole, "-o", tmp_path / "whole.latent", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["shape"][0] == 30


def test_a_truncated_video_is_an_error_and_a_longer_audio_track_is_not(vae, real_weights, clip, tmp_path):
    """ffmpeg reads a cut-off file up to the cut and exits 0: vaecli compares the frames with what the header
    promises and, short of them, asks ffmpeg to decode the stream to its first error; a clip whose audio outlasts
    its video (also short of the container's duration) decodes cleanly and is encoded."""
    import subprocess

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    whole = tmp_path / "whole.mp4"
    subprocess.run([ffmpeg, "-loglevel", "error", "-i", clip, "-vf", "scale=160:96", "-frames:v", "40", "-c:v",
                    "libx264", "-movflags", "+faststart", whole], check=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    result = vae("video", cut, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    line = _error_line(result)
    assert line.startswith(f"Error: {cut}: truncated or corrupt video: ffmpeg decoded ") and \
        " of the 40 frames its header promises (" in line and line.endswith(")") and "0x" not in line
    assert not (tmp_path / "x.latent").exists()
    result = vae("video", cut, "-o", tmp_path / "x.latent", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["error"] == line.removeprefix("Error: ")
    assert vae("video", cut, "-o", tmp_path / "first.latent", "--frames", 2).exit_code == 0  # before the cut

    audio = tmp_path / "audio.mp4"
    subprocess.run([ffmpeg, "-loglevel", "error", "-i", clip, "-f", "lavfi", "-t", "3", "-i",
                    "anullsrc=r=44100:cl=mono", "-map", "0:v", "-map", "1:a", "-vf", "trim=end_frame=10,scale=64:48",
                    "-c:v", "libx264", "-c:a", "aac", audio], check=True)
    result = vae("video", audio, "-o", tmp_path / "a.latent", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["shape"][0] == 10


def test_still_image_is_not_a_video(vae, real_weights, small_image, tmp_path):
    result = vae("video", small_image, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {small_image}: is a still image, not a video (use 'vae encode')"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WebP", "TIFF"])
def test_a_still_image_renamed_as_a_clip_is_not_a_video(vae, real_weights, small_image, tmp_path, fmt):
    """ffmpeg reads a picture by its content, as a clip of one frame at 25 fps: it was encoded so, with exit 0."""
    renamed = tmp_path / "photo.mp4"
    Image.open(small_image).convert("RGB").save(renamed, format=fmt)
    result = vae("video", renamed, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {renamed}: is a {fmt} image, not a video (use 'vae encode')"
    assert not (tmp_path / "x.latent").exists()


def test_a_stream_of_jpeg_pictures_is_a_video(vae, real_weights, small_image, tmp_path):
    """A .mjpeg file starts as a JPEG does, and is a clip: one frame per picture."""
    picture = tmp_path / "p.jpg"
    Image.open(small_image).convert("RGB").save(picture)
    stream = tmp_path / "cam.mjpeg"
    stream.write_bytes(picture.read_bytes() * 3)
    result = vae("video", stream, "-o", tmp_path / "x.latent")
    assert result.exit_code == 0, result.output
    assert load_latent(tmp_path / "x.latent")[0].shape[0] == 3


@pytest.mark.parametrize("output", [[], ["-o", "v.latent"]])
def test_a_latent_is_not_a_video(vae, clip_latent, tmp_path, monkeypatch, output):
    """It said 'refusing to overwrite input' (its default output is its own name), or 'not a video ffmpeg can read'."""
    monkeypatch.chdir(tmp_path)
    before = clip_latent.read_bytes()
    result = vae("video", clip_latent, *output)
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {clip_latent}: is a latent file, not a video (use 'vae decode')"
    assert clip_latent.read_bytes() == before and not (tmp_path / "v.latent").exists()


def test_options_are_checked_even_when_the_output_is_skipped(vae, real_weights, clip, tmp_path, monkeypatch):
    assert vae("video", clip, "-o", f"{tmp_path / 'out'}/", "--frames", 2).exit_code == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args, message in [(["--tile", "abc"], "Error: --tile abc: expected auto, off or a tile size in pixels"),
                          (["--max-memory", "0"], "Error: --max-memory 0: expected a size of at least 1 byte, like "
                                                  "2GB, 512MB or 1.5GiB"),
                          (["--device", "cuda"], "Error: --device cuda: CUDA is not available on this machine")]:
        result = vae("video", clip, "-o", f"{tmp_path / 'out'}/", "--frames", 2, *args)
        assert result.exit_code == 2
        assert _error_line(result) == message


def test_zero_frames_selected(vae, real_weights, clip, tmp_path):
    result = vae("video", clip, "--start", 100, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {clip}: no frames selected (the clip ends before frame 100)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--stride", 2, "--fps", 5], "Error: use --stride or --fps, not both"),
    (["--recon", "r.mp4"], "Error: --recon needs --roundtrip"),
    (["--frames", 0], "Error: --frames must be at least 1, got 0"),
    (["--stride", 0], "Error: --stride must be at least 1, got 0"),
    (["--start", -1], "Error: --start must be at least 0, got -1"),
    (["--fps", 0], "Error: --fps 0: expected fps between 0.001 and 1000"),
    (["--fps", "1e-300"], "Error: --fps 1e-300: expected fps between 0.001 and 1000"),
    (["--fps", "1e308"], "Error: --fps 1e+308: expected fps between 0.001 and 1000"),
    (["--fps", "nan"], "Error: --fps nan: expected fps between 0.001 and 1000"),
    (["--seed", 3], "Error: --seed only applies with --sample"),
    (["--chunk", "9" * 5000], f"Error: --chunk {'9' * 40}: expected auto or a number of frames from 1 to 100000"),
    (["--sample"], "Error: taef2 is deterministic: --sample needs a model with a posterior (KL, Wan)"),
])
def test_video_usage_errors(vae, real_weights, clip, tmp_path, args, message):
    result = vae("video", clip, "-o", tmp_path / "x.latent", *args)
    assert result.exit_code == 2
    assert _error_line(result) == message


def test_recon_paths_that_cannot_be_a_clip_are_refused_up_front(vae, real_weights, clip, tmp_path):
    """--recon r.txt suggested --as-frames, an option of 'vae decode' only, and did not name --recon; a folder
    named r.mp4 was found only after the whole clip was encoded ('cannot write: Is a directory')."""
    small = _small_clip(tmp_path, clip)
    result = vae("video", small, "-o", tmp_path / "x.latent", "--roundtrip", "--recon", tmp_path / "r.txt")
    assert (result.exit_code, _error_line(result)) == (
        2, f"Error: --recon {tmp_path / 'r.txt'}: expected a video file ending in .avi, .gif, .m4v, .mkv, .mov, "
           f".mp4, .webm")
    (tmp_path / "r.mp4").mkdir()
    result = vae("video", small, "-o", tmp_path / "x.latent", "--roundtrip", "--recon", tmp_path / "r.mp4", "--json")
    assert (result.exit_code, _error_line(result)) == (
        1, f"Error: {tmp_path / 'r.mp4'}: is a folder, expected an output file path")
    assert json.loads(result.stdout)["error"] == f"{tmp_path / 'r.mp4'}: is a folder, expected an output file path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.mp4", "small.mp4"]


def test_a_stride_below_the_lowest_fps_is_refused(vae, real_weights, clip, tmp_path):
    result = vae("video", clip, "--stride", 100000, "-o", tmp_path / "x.latent", "--roundtrip")
    assert result.exit_code == 1
    assert _error_line(result) == (f"Error: {clip}: 24 fps / --stride 100000 is 0.00024 fps: expected fps between "
                                   f"0.001 and 1000 (use --fps)")
    assert list(tmp_path.iterdir()) == []


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


# --- causal video families (Wan, Qwen-Image, TAEHV): the whole command against the references -----------------

TINY_WAN = dict(base_dim=8, z_dim=16, num_res_blocks=1)  # 16 channels: Wan 2.1's latent statistics apply


@pytest.fixture
def tiny_wan(monkeypatch, tmp_path_factory):
    """wan2.1 and qwen-image at tiny widths (registry entries swapped for the test), with a diffusers folder of
    seeded random weights, and diffusers' model as the reference."""
    from dataclasses import replace

    from diffusers import AutoencoderKLWan

    from vaecli.registry import REGISTRY, WanConfig

    for name in ("wan2.1", "qwen-image"):
        spec = REGISTRY[name]
        cfg = WanConfig(**TINY_WAN, latents_mean=spec.latents_mean, latents_std=spec.latents_std)
        monkeypatch.setitem(REGISTRY, name, replace(spec, config=cfg))
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY_WAN).eval()
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if key.endswith("gamma"):
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("wan") / "vae"
    ref.save_pretrained(folder)
    return ref, folder.parent


def _source(gif, n):
    """The first `n` frames of the GIF as vaecli reads them, reflect-padded to multiples of 8: (1, 3, n, 32, 16)."""
    from vaecli.media import pad_to_multiple

    _, stream = video.read_frames(gif, limit=n)
    frames = torch.stack([pixels for _, pixels in stream])
    return pad_to_multiple(frames, 8)[0].movedim(0, 1)[None]


def _normalized(z, spec):
    mean = torch.tensor(spec.latents_mean).view(-1, 1, 1)
    std = torch.tensor(spec.latents_std).view(-1, 1, 1)
    return (z - mean) / std


def test_wan_streams_a_clip_equal_to_diffusers(vae, tiny_wan, gif, tmp_path):
    """`vae video --model wan2.1`: 7 frames -> the first 5 encoded (1 + 4k), the posterior means of diffusers'
    whole-clip encode normalized for the denoiser; `vae decode` gives diffusers' decode of them."""
    from vaecli.registry import REGISTRY

    ref, weights = tiny_wan
    lat = tmp_path / "w.latent"
    result = vae("video", gif, "-o", lat, "--frames", 7, "--model", "wan2.1", "--weights", weights, "--chunk", 3,
                 "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["frames"], report["dropped"], report["shape"]) == (5, 2, [2, 16, 4, 2])
    assert result.stderr.splitlines()[0] == (f"note: wan2.1 encodes clips of 1 + 4k frames: the last 2 of 7 selected "
                                             f"frames of {gif} were not encoded")
    latent, meta = load_latent(lat)
    assert (meta["space"], meta["temporal_factor"], meta["frame_indices"]) == ("normalized", 4, [0, 1, 2, 3, 4])
    x = _source(gif, 5)
    with torch.inference_mode():
        mean = ref.encode(x * 2 - 1).latent_dist.mean[0].movedim(1, 0)
        expected = _normalized(mean, REGISTRY["wan2.1"])
        assert (latent - expected).abs().max().item() <= 1e-4
        frames = ((ref.decode(mean.movedim(0, 1)[None]).sample[0].movedim(1, 0) + 1) / 2).clamp(0, 1)
    out = tmp_path / "o"
    result = vae("decode", lat, "-o", out, "--as-frames", "--weights", weights, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["frames"] == 5
    decoded = torch.stack([read_image(p)[0][0] for p in sorted((out / "w").iterdir())])
    assert (decoded - quantize8(frames[..., :25, :14])).abs().max().item() <= 1 / 255


def test_wan_past_the_budget_goes_tile_by_tile_with_the_same_numbers(vae, tiny_wan, gif, tmp_path):
    """--max-memory 1 byte: frames too large for their caches go tile by tile through the clip (whole layers in
    scratch files in --scratch, gone on exit): `vae video`, `vae decode` and `--roundtrip` give the frame-stream
    numbers, and --json reports the scratch space."""
    _, weights = tiny_wan
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = ["video", gif, "--frames", 9, "--model", "wan2.1", "--weights", weights, "--json"]
    plain = vae(*args, "-o", tmp_path / "plain.latent", "--roundtrip")
    tiled = vae(*args, "-o", tmp_path / "tiled.latent", "--max-memory", "1", "--scratch", scratch, "--roundtrip")
    assert plain.exit_code == 0 and tiled.exit_code == 0, tiled.stderr
    assert json.loads(plain.stdout)["scratch_bytes"] == 0
    report = json.loads(tiled.stdout)
    assert report["scratch_bytes"] > 0 and report["shape"] == [3, 16, 4, 2] and list(scratch.iterdir()) == []
    a, b = load_latent(tmp_path / "plain.latent")[0], load_latent(tmp_path / "tiled.latent")[0]
    assert (a - b).abs().max().item() <= 1e-5
    outs = {}
    for name, extra in [("plain", []), ("tiled", ["--max-memory", "1", "--scratch", scratch])]:
        result = vae("decode", tmp_path / "plain.latent", "-o", tmp_path / name, "--as-frames", "--weights", weights,
                     "--json", "--verify", *extra)
        assert result.exit_code == 0, result.stderr
        decoded = json.loads(result.stdout)
        assert (decoded["scratch_bytes"] > 0) == (name == "tiled")
        if name == "tiled":  # every frame against the whole-frame stream
            assert decoded["verify"]["compared"] == "all 9 frames with the clip streamed in whole frames"
            assert decoded["verify"]["max_abs_diff"] <= 1e-5
        else:  # strict JSON: no Infinity
            assert decoded["verify"] == {"tiled": False, "max_abs_diff": 0.0, "psnr": None, "compared": "frame 0"}
        outs[name] = torch.stack([read_image(p)[0][0] for p in sorted((tmp_path / name / "plain").iterdir())])
    assert outs["plain"].shape == (9, 3, 25, 14)
    assert (outs["plain"] - outs["tiled"]).abs().max().item() <= 1 / 255
    recon = [pixels for _, pixels in video.read_frames(tmp_path / "tiled.recon.mp4")[1]]
    assert len(recon) == 9 and abs(report["mean_psnr"] - json.loads(plain.stdout)["mean_psnr"]) <= 0.01


def test_wan_sample_draws_each_latent_frame_from_its_own_seed(vae, tiny_wan, gif, tmp_path):
    """`vae video --model wan2.1 --sample --seed`: latent frame i = diffusers' posterior mean + std x noise from
    `frame_seed(seed, i)`, normalized; the same streamed in any chunk and tile by tile; TAEHV refuses."""
    from vaecli.pipeline import frame_seed
    from vaecli.registry import REGISTRY

    ref, weights = tiny_wan
    runs = {"plain": ["--chunk", 1], "chunked": ["--chunk", 3], "tiled": ["--max-memory", "1"]}
    got = {}
    for name, extra in runs.items():
        lat = tmp_path / f"{name}.latent"
        result = vae("video", gif, "-o", lat, "--frames", 9, "--model", "wan2.1", "--weights", weights, "--sample",
                     "--seed", 7, *extra)
        assert result.exit_code == 0, result.stderr
        got[name], meta = load_latent(lat)
        assert meta["sample_seed"] == 7
    assert max((got[n] - got["plain"]).abs().max().item() for n in runs) <= 1e-5
    with torch.inference_mode():
        post = ref.encode(_source(gif, 9) * 2 - 1).latent_dist
    mean, std = post.mean[0].movedim(1, 0), post.std[0].movedim(1, 0)
    noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(frame_seed(7, i)))
                         for i in range(mean.shape[0])])
    expected = _normalized(mean + std * noise, REGISTRY["wan2.1"])
    assert (got["plain"] - expected).abs().max().item() <= 1e-4
    assert (got["plain"] - _normalized(mean, REGISTRY["wan2.1"])).abs().max().item() > 0.05
    from vaecli.models.taehv import TAEHV

    torch.save(TAEHV(REGISTRY["taew2_1"].config).state_dict(), tmp_path / "taew2_1.pth")
    result = vae("video", gif, "-o", tmp_path / "t.latent", "--model", "taew2_1", "--sample", "--weights",
                 tmp_path / "taew2_1.pth")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == ("Error: taew2_1 is deterministic: --sample needs a model with a "
                                                      "posterior (KL, Wan)")


def test_qwen_image_encodes_a_photo_as_a_one_frame_clip(vae, tiny_wan, small_image, tmp_path):
    from vaecli.media import pad_to_multiple
    from vaecli.registry import REGISTRY

    ref, weights = tiny_wan
    lat = tmp_path / "q.latent"
    result = vae("encode", small_image, "-o", lat, "--model", "qwen-image", "--weights", weights)
    assert result.exit_code == 0, result.stderr
    latent, meta = load_latent(lat)
    assert list(latent.shape) == [16, 6, 8] and meta["space"] == "normalized"
    x = pad_to_multiple(read_image(small_image)[0], 8)[0]
    with torch.inference_mode():
        mean = ref.encode(x[:, :, None] * 2 - 1).latent_dist.mean[0, :, 0]
    assert (latent - _normalized(mean, REGISTRY["qwen-image"])).abs().max().item() <= 1e-4
    result = vae("decode", lat, "-o", tmp_path / "q.png", "--weights", weights)
    assert result.exit_code == 0, result.stderr
    assert read_image(tmp_path / "q.png")[0].shape == (1, 3, 45, 61)
    result = vae("decode", lat, "-o", tmp_path / "x.png", "--model", "taesd")
    assert result.exit_code == 1
    assert result.stderr.strip().endswith("cannot be decoded with taesd (SD 1.x/2.x latent space): decode with "
                                          "wan2.1, qwen-image, taew2_1")


def test_decode_refuses_a_tile_size_for_a_causal_model_before_any_input(vae, tiny_wan, gif, tmp_path):
    """`vae decode --model wan2.1 --tile 32` failed each input (exit 1) where `vae video` refuses it (exit 2);
    without --model the model is the latent's, known per input."""
    _, weights = tiny_wan
    lat = tmp_path / "w.latent"
    assert vae("video", gif, "-o", lat, "--frames", 1, "-m", "wan2.1", "-w", weights).exit_code == 0
    message = ("--tile 32: causal video models (wan2.1) take no fixed tile size; they go tile by tile by themselves "
               "when a frame's caches exceed --max-memory")
    result = vae("decode", lat, "-o", tmp_path / "w.mp4", "-m", "wan2.1", "-w", weights, "--tile", 32)
    assert (result.exit_code, _error_line(result)) == (2, f"Error: {message}")
    result = vae("decode", lat, "-o", tmp_path / "w.mp4", "-w", weights, "--tile", 32)
    assert (result.exit_code, _error_line(result)) == (1, f"Error: {lat}: {message}")
    assert not (tmp_path / "w.mp4").exists()


def test_an_output_never_replaces_the_weights(vae, tiny_wan, gif, small_image, tmp_path):
    """`-o w.safetensors` beside `-w w.safetensors` wrote the latents over the weights (they were read already, so
    nothing noticed); a diffusers folder's file likewise."""
    import shutil

    _, folder = tiny_wan
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights = tmp_path / "w.safetensors"
    shutil.copy(file, weights)
    before = weights.read_bytes(), file.read_bytes()
    for args, path in [(["video", gif, "--frames", 1, "-m", "wan2.1", "-w", weights], weights),
                       (["encode", small_image, "-m", "qwen-image", "-w", weights], weights),
                       (["video", gif, "--frames", 1, "-m", "wan2.1", "-w", folder], file)]:
        result = vae(*args, "-o", path)
        model = args[args.index("-m") + 1]
        assert (result.exit_code, _error_line(result)) == (1, (
            f"Error: refusing to overwrite input {path} (the {model} weights; choose another -o)"))
    assert (weights.read_bytes(), file.read_bytes()) == before


def test_taew2_1_previews_wan_latents_like_the_reference(vae, tiny_wan, gif, shared, tmp_path):
    """A Wan 2.1 latent decodes with the tiny twin (same latent space): frames equal to the reference taehv.py's
    decode of the raw latents; and taew2_1's own `vae video` equals the reference's encode."""
    import importlib.util

    from vaecli.models.taehv import TAEHV
    from vaecli.registry import REGISTRY

    _, weights = tiny_wan
    torch.manual_seed(1)
    tiny = TAEHV(REGISTRY["taew2_1"].config)
    with torch.no_grad():
        for p in tiny.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
        tiny.decoder[-1].bias += 0.5
    path = tmp_path / "taew2_1.pth"
    torch.save(tiny.state_dict(), path)
    spec = importlib.util.spec_from_file_location("reference_taehv", shared / "reference" / "taehv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ref = module.TAEHV(checkpoint_path=str(path)).eval()

    wan_lat = tmp_path / "w.latent"
    assert vae("video", gif, "-o", wan_lat, "--frames", 5, "--model", "wan2.1", "--weights", weights).exit_code == 0
    latent, meta = load_latent(wan_lat)
    out = tmp_path / "p"
    result = vae("decode", wan_lat, "-o", out, "--as-frames", "--model", "taew2_1", "--weights", path)
    assert result.exit_code == 0, result.stderr
    raw = latent * torch.tensor(REGISTRY["wan2.1"].latents_std).view(-1, 1, 1) + torch.tensor(
        REGISTRY["wan2.1"].latents_mean).view(-1, 1, 1)
    with torch.inference_mode():
        expected = ref.decode_video(raw[None], parallel=True, show_progress_bar=False)[0]
    decoded = torch.stack([read_image(p)[0][0] for p in sorted((out / "w").iterdir())])
    assert decoded.shape[0] == 5
    assert (decoded - quantize8(expected[..., :25, :14])).abs().max().item() <= 1 / 255

    own = tmp_path / "t.latent"
    result = vae("video", gif, "-o", own, "--frames", 9, "--model", "taew2_1", "--weights", path, "--chunk", 2)
    assert result.exit_code == 0, result.stderr
    latent, _ = load_latent(own)
    with torch.inference_mode():
        expected = ref.encode_video(_source(gif, 9).movedim(1, 2), parallel=True, show_progress_bar=False)[0]
    assert latent.shape == (3, 16, 4, 2)
    assert (latent - _normalized(expected, REGISTRY["taew2_1"])).abs().max().item() <= 1e-4

    # Past --max-memory the tiny video models go tile by tile through the clip too, with the same numbers.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    budget = ["--max-memory", "1", "--scratch", scratch, "--json"]
    result = vae("video", gif, "-o", tmp_path / "tt.latent", "--frames", 9, "--model", "taew2_1", "--weights", path,
                 *budget)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["scratch_bytes"] > 0 and list(scratch.iterdir()) == []
    assert (load_latent(tmp_path / "tt.latent")[0] - latent).abs().max().item() <= 1e-5
    result = vae("decode", wan_lat, "-o", tmp_path / "pt", "--as-frames", "--model", "taew2_1", "--weights", path,
                 "--verify", *budget)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["scratch_bytes"] > 0
    check = report["verify"]  # every frame against the whole-frame stream
    assert check["compared"] == "all 5 frames with the clip streamed in whole frames" and check["max_abs_diff"] <= 1e-5
    tiled = torch.stack([read_image(p)[0][0] for p in sorted((tmp_path / "pt" / "w").iterdir())])
    assert (tiled - decoded).abs().max().item() <= 1 / 255


# --- writing clips: ffmpeg's failures, its log, temp files --------------------------------------------------

def _fake_ffmpeg(tmp_path, body: str):
    """An executable standing in for ffmpeg (IMAGEIO_FFMPEG_EXE) that runs `body` in sh."""
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    return fake


def _vae_process(*args, env=None):
    """`vae` as its own process: ffmpeg inherits the process's stderr, which CliRunner would not see."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "vaecli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


ENOSPC_LOG = ("cat >/dev/null\n"
              "echo '[out#0/mp4 @ 0x55d0] Error writing trailer: No space left on device' >&2\n"
              "echo 'Error closing file: No space left on device' >&2\n"
              "exit 228")
ENCODER_LOG = ("cat >/dev/null\n"
               "echo '[libx264 @ 0x55d0] width not divisible by 2 (15x16)' >&2\n"
               "echo '[vost#0:0/libx264 @ 0x55d1] Error while opening encoder - maybe incorrect parameters' >&2\n"
               "echo 'Conversion failed!' >&2\n"
               "exit 1")


@pytest.mark.parametrize("log, why", [
    (ENOSPC_LOG, "no space left on the device"),  # as any other write on a full disk says it
    (ENCODER_LOG, "ffmpeg failed: width not divisible by 2 (15x16)"),  # the first line: the cause
])
def test_a_failed_ffmpeg_is_one_error_and_leaves_nothing(clip_latent, tmp_path, log, why):
    """ffmpeg exiting non-zero (a full disk, an encoder error) fails the input with one line and a JSON record,
    nothing of ffmpeg's own log on the terminal, and neither the output nor its temp file left."""
    out = tmp_path / "out" / "x.mp4"
    run = _vae_process("decode", clip_latent, "-o", out, "--json",
                       env={"IMAGEIO_FFMPEG_EXE": str(_fake_ffmpeg(tmp_path, log))})
    assert run.returncode == 1
    assert run.stderr.splitlines() == [f"Error: {clip_latent}: {out}: cannot write: {why}"]
    assert json.loads(run.stdout)["error"] == f"{out}: cannot write: {why}"
    assert list(out.parent.iterdir()) == []


def test_ffmpeg_log_stays_off_the_terminal_under_quiet(clip_latent, tmp_path):
    chatty = _fake_ffmpeg(tmp_path, f"echo 'ffmpeg: a warning nobody asked for' >&2\n"
                                    f"exec '{imageio_ffmpeg.get_ffmpeg_exe()}' \"$@\"")
    out = tmp_path / "x.mp4"
    run = _vae_process("decode", clip_latent, "-o", out, "-q", env={"IMAGEIO_FFMPEG_EXE": str(chatty)})
    assert (run.returncode, run.stderr, run.stdout) == (0, "", "")
    assert _frames(out)[1].shape == (2, 26, 14, 3)


def test_ffmpeg_dying_mid_clip_is_an_output_error(tmp_path, monkeypatch):
    """ffmpeg gone before the frames are all sent (a broken pipe): its log's cause, and no temp file."""
    from vaecli.errors import OutputError

    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(_fake_ffmpeg(
        tmp_path, "echo '[in#0 @ 0x1] Error opening input: Invalid argument' >&2\nexit 234")))
    out = tmp_path / "o" / "x.mp4"
    with pytest.raises(OutputError) as err, video.VideoWriter(out, 24.0, (128, 128)) as writer:
        for _ in range(10):  # more than a pipe holds: a write finds ffmpeg gone
            writer.write(torch.rand(3, 128, 128))
    assert str(err.value) == f"{out}: cannot write: ffmpeg failed: Error opening input: Invalid argument"
    assert list(out.parent.iterdir()) == []


def test_a_gif_that_cannot_be_written_leaves_no_temp_file(vae, clip_latent, tmp_path, monkeypatch):
    """A full disk while the GIF is written (its second frame): one error line, and the temp file is removed."""
    import errno

    from PIL import GifImagePlugin

    getdata, calls = GifImagePlugin.getdata, []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return getdata(*args, **kwargs)

    monkeypatch.setattr(GifImagePlugin, "getdata", full)
    out = tmp_path / "out" / "x.gif"
    result = vae("decode", clip_latent, "-o", out)
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {clip_latent}: {out}: cannot write: no space left on the device"
    assert list(out.parent.iterdir()) == []


def _with_fps(lat, fps):
    """A copy of latent video `lat` whose metadata says `fps`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(lat), framework="pt") as f:
        meta, latent = f.metadata(), f.get_tensor("latent")
    path = lat.with_name(f"fps{fps:g}.latent")
    save_file({"latent": latent}, str(path), {**meta, "fps": json.dumps(fps)})
    return path


@pytest.mark.parametrize("fps", [1e308, 1e-300, 0.0])
def test_a_latent_fps_out_of_range_is_refused(vae, clip_latent, tmp_path, fps):
    lat = _with_fps(clip_latent, fps)
    out = tmp_path / "out" / "x.mp4"
    result = vae("decode", lat, "-o", out, "--json")
    assert result.exit_code == 1
    message = f"{lat}: metadata 'fps' must be a number between 0.001 and 1000, got {str(fps)!r}"
    assert _error_line(result) == f"Error: {message}"
    assert json.loads(result.stdout)["error"] == message
    assert not out.parent.exists()


def test_a_gif_too_slow_to_hold_is_refused(vae, clip_latent, tmp_path):
    """0.001 fps is a valid latent's rate, but a GIF frame lasts at most 655.35 s."""
    lat = _with_fps(clip_latent, 0.001)
    out = tmp_path / "out" / "x.gif"
    result = vae("decode", lat, "-o", out)
    assert result.exit_code == 1
    assert _error_line(result) == (f"Error: {lat}: {out}: a GIF frame lasts at most 655.35 s, got 0.001 fps "
                                   f"(expected at least 0.00153 fps; write .mp4 instead)")
    assert not out.parent.exists()  # refused before anything was made
    result = vae("decode", lat, "-o", tmp_path / "out" / "x.mp4", "--json")
    assert result.exit_code == 0, result.stderr
    assert _frames(tmp_path / "out" / "x.mp4")[1].shape[0] == 2


def test_a_gif_too_fast_to_play_is_refused(vae, clip_latent, tmp_path):
    """A GIF delay is whole centiseconds and browsers play those under 2 as 10: 1000 fps was written with no delay
    at all, 60 fps as 10 fps. Past 50 fps a GIF is refused like a too slow one; 50 fps is written (2 cs)."""
    from PIL import Image

    for fps in (1000, 60):
        lat = _with_fps(clip_latent, fps)
        out = tmp_path / "out" / "x.gif"
        result = vae("decode", lat, "-o", out)
        assert result.exit_code == 1
        assert _error_line(result) == (f"Error: {lat}: {out}: a GIF frame lasts at least 0.02 s where it is played, "
                                       f"got {fps} fps (expected at most 50 fps; write .mp4 instead)")
        assert not out.parent.exists()
    for fps, centis in ((50, 2), (15, 7)):
        result = vae("decode", _with_fps(clip_latent, fps), "-o", tmp_path / f"{fps}.gif")
        assert result.exit_code == 0, result.stderr
        with Image.open(tmp_path / f"{fps}.gif") as gif:
            assert gif.info["duration"] == centis * 10


def test_video_writer_refuses_an_absurd_fps(tmp_path):
    from vaecli.errors import InputError

    with pytest.raises(InputError) as err:
        video.VideoWriter(tmp_path / "x.gif", 1e-300, (4, 4))
    assert str(err.value) == f"{tmp_path / 'x.gif'}: expected fps between 0.001 and 1000, got 1e-300"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["recon", "latent"])
def test_roundtrip_leaves_both_outputs_or_neither(vae, real_weights, clip, tmp_path, monkeypatch, failing):
    from vaecli import latents
    from vaecli.errors import OutputError

    target = (video.VideoWriter, "close") if failing == "recon" else (latents.LatentVideoWriter, "close")

    def close(self, *args):  # as a full disk at the end of a write does: the writer drops its temp file
        self.abort()
        raise OutputError(f"{failing}: cannot write: no space left on the device")

    monkeypatch.setattr(*target, close)
    result = vae("video", clip, "--frames", 2, "-o", tmp_path / "r.latent", "--roundtrip", "--json")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {clip}: {failing}: cannot write: no space left on the device"
    assert json.loads(result.stdout)["status"] == "error"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_clip_whose_name_looks_like_a_protocol_is_read_as_named(vae, real_weights, gif, tmp_path, monkeypatch):
    """ffmpeg takes 'file:' (or any 'name:') at the start of a relative path for a protocol: 'file:x.mp4' read x.mp4
    instead and 'a:b.mp4' was refused. The file named is the file read."""
    import subprocess

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    monkeypatch.chdir(tmp_path)
    subprocess.run([ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc=size=32x16:rate=10", "-frames:v", "2",
                    "-pix_fmt", "yuv420p", "named.mp4"], check=True)
    subprocess.run([ffmpeg, "-v", "error", "-i", str(gif), "-frames:v", "3", "-pix_fmt", "yuv420p",
                    "-vf", "scale=16:24", "x.mp4"], check=True)  # what 'file:x.mp4' read
    previous = "named.mp4"
    for name in ("file:x.mp4", "a:b.mp4"):
        (tmp_path / previous).rename(tmp_path / name)
        previous = name
        result = vae("video", name, "-o", "out.latent", "--json")
        assert result.exit_code == 0, result.stderr
        record = json.loads(result.stdout)
        assert (record["input"], record["frames"], record["size"]) == (name, 2, [32, 16])


def test_chunk_never_changes_a_bit_of_frame_by_frame_models(vae, real_weights, gif, tmp_path):
    """On the CPU each frame of a chunk runs its own pass (oneDNN's arithmetic follows the batch size, 3e-6 apart):
    the latents are the same bytes at any --chunk, each equal to `vae encode` of its frame, and so are the frames
    decoded from them."""
    lats = {}
    for chunk in ("1", "3", "auto"):
        lat = tmp_path / f"c{chunk}.latent"
        assert vae("video", gif, "--frames", 5, "-o", lat, "--chunk", chunk).exit_code == 0
        lats[chunk] = load_latent(lat)[0]
    assert all(torch.equal(lats[c], lats["1"]) for c in lats)
    _, frames = video.read_frames(gif, limit=3)
    frame = [pixels for i, pixels in frames if i == 2][0]
    png = tmp_path / "frame2.png"
    from vaecli.media import write_image

    write_image(png, frame[None])
    assert vae("encode", png, "-o", tmp_path / "frame2.latent").exit_code == 0
    assert torch.equal(load_latent(tmp_path / "frame2.latent")[0], lats["1"][2])
    for chunk in ("1", "4"):
        assert vae("decode", tmp_path / "c1.latent", "--as-frames", "-o", tmp_path / f"f{chunk}", "--chunk",
                   chunk).exit_code == 0
    frames1 = sorted((tmp_path / "f1").rglob("*.png"))
    assert len(frames1) == 5
    for path in frames1:
        assert np.array_equal(iio.imread(path), iio.imread(tmp_path / "f4" / path.relative_to(tmp_path / "f1")))


def test_taecvx_roundtrip_leaves_out_the_startup_frames_it_decodes(vae, gif, tmp_path):
    """taecvx decodes startup frames before the clip (for even or, streaming, unknown latent counts): the round
    trip paired them with source frames and ran out of them (IndexError, StopIteration). The recon is the clip."""
    from PIL import Image

    from vaecli.models.taehv import TAEHV
    from vaecli.models.taehv_keys import variant_config

    model = TAEHV(variant_config("taecvx"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    torch.save(model.state_dict(), tmp_path / "taecvx.pth")
    for frames, extra in ((1, ()), (5, ()), (5, ("--max-memory", "1"))):  # streamed; odd and even latent counts
        stem = tmp_path / f"c{frames}{len(extra)}"
        result = vae("video", gif, "-o", f"{stem}.latent", "--frames", frames, "-m", "taecvx", "-w",
                     tmp_path / "taecvx.pth", "--roundtrip", "--recon", f"{stem}.gif", "--json", *extra)
        assert result.exit_code == 0, result.stderr
        (record,) = map(json.loads, result.stdout.splitlines())
        assert record["frames"] == frames and len(record["psnr"]) == frames
        assert iio.imread(f"{stem}.gif", index=None).shape[0] == frames
        # the PSNRs are those of the decode's frames, the startup frames left out
        assert vae("decode", f"{stem}.latent", "-o", f"{stem}.frames", "--as-frames", "-q", "-w",
                   tmp_path / "taecvx.pth").exit_code == 0
        decoded = sorted((tmp_path / f"{stem.name}.frames").iterdir())
        assert len(decoded) == {1: 1, 5: 8}[frames]  # the reference's frame rule: 2 latents keep the startup frames
        _, source = video.read_frames(gif, limit=frames)
        for psnr, path, (_, original) in zip(record["psnr"], decoded[len(decoded) - frames:], source, strict=True):
            pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1) / 255
            assert psnr == pytest.approx(metrics.psnr(pixels[None], original[None]), abs=0.01)


def test_gif_frames_are_written_as_they_come_with_pillows_pixels(clip, tmp_path):
    """GIFs went through Pillow's save_all, which holds every frame until it writes the file: memory grew with the
    clip. Frames now go to the file as they come, each quantized as save_all does it."""
    from PIL import Image

    _, stream = video.read_frames(clip, limit=4)
    frames = [pixels for _, pixels in stream]
    writer = video.VideoWriter(tmp_path / "a.gif", 10.0, (frames[0].shape[-1], frames[0].shape[-2]))
    sizes = []
    for frame in frames:
        writer.write(frame)
        sizes.append(next(tmp_path.glob(".a.gif*")).stat().st_size)
    assert sizes == sorted(set(sizes))  # each frame lands in the temp file when written
    writer.close()
    rgb = [Image.fromarray((f.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for f in frames]
    rgb[0].save(tmp_path / "pillow.gif", save_all=True, append_images=rgb[1:], duration=100, loop=0)
    got, want = Image.open(tmp_path / "a.gif"), Image.open(tmp_path / "pillow.gif")
    assert got.n_frames == want.n_frames == 4 and got.info["loop"] == 0
    for i in range(4):
        got.seek(i)
        want.seek(i)
        assert got.info["duration"] == 100
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "pillow.gif"]


def _small_clip(tmp_path, clip, frames: int = 3):
    """The first `frames` frames of `clip` at 64x40."""
    import subprocess

    out = tmp_path / "small.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(clip), "-frames:v", str(frames),
                    "-vf", "scale=64:40", str(out)], check=True)
    return out


def test_video_options_that_cannot_be_met_are_refused(vae, real_weights, clip, tmp_path, monkeypatch):
    """--fps above the clip's rate kept every frame and recorded the higher rate (the clip played faster); frames
    past VAE_MAX_PIXELS were encoded (only images were checked); a --chunk past Python's integers was an
    'unexpected ValueError'."""
    small = _small_clip(tmp_path, clip)
    result = vae("video", small, "-o", tmp_path / "a.latent", "--fps", 24.03)
    assert (result.exit_code, _error_line(result)) == (1, (
        f"Error: {small}: --fps 24.03 is above the clip's 24 fps: frames are dropped to lower the rate, never repeated "
        f"(leave --fps out to keep every frame)"))
    monkeypatch.setenv("VAE_MAX_PIXELS", "2559")
    result = vae("video", small, "-o", tmp_path / "a.latent")
    assert (result.exit_code, _error_line(result)) == (1, (
        f"Error: {small}: video frames have 2560 pixels (64x40), over the limit of 2559 pixels (set VAE_MAX_PIXELS "
        f"to allow larger frames)"))
    monkeypatch.delenv("VAE_MAX_PIXELS")
    result = vae("video", small, "-o", tmp_path / "a.latent", "--chunk", "9" * 25)
    assert (result.exit_code, _error_line(result)) == (
        2, f"Error: --chunk {'9' * 25}: expected auto or a number of frames from 1 to 100000")
    assert not (tmp_path / "a.latent").exists()


def test_video_output_folders_and_quiet_runs(vae, real_weights, clip, tmp_path):
    """-o naming an existing folder was refused for want of a .latent suffix; a rerun into a folder re-encoded
    (the help says it skips); --recon's clash named -o; a rotated clip printed imageio-ffmpeg's warning under -q."""
    small = _small_clip(tmp_path, clip)
    (tmp_path / "out").mkdir()
    result = vae("video", small, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "out" / "small.latent")
    result = vae("video", small, "-o", tmp_path / "out", "--json")
    assert json.loads(result.stdout)["status"] == "skipped"
    assert json.loads(vae("video", small, "-o", tmp_path / "out", "--json", "--overwrite").stdout)["status"] == "ok"
    result = vae("video", small, "--roundtrip", "--recon", small)
    assert (result.exit_code, _error_line(result)) == (1, f"Error: refusing to overwrite input {small} (choose "
                                                          f"another --recon)")
    import subprocess

    rotated = tmp_path / "rot.mp4"  # as phones record portrait clips
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-display_rotation", "90", "-i",
                    str(small), "-c", "copy", str(rotated)], check=True)
    result = vae("video", rotated, "-o", tmp_path / "rot.latent", "-q")
    assert (result.exit_code, result.stderr) == (0, "")
    assert read_metadata(tmp_path / "rot.latent")["image_size"] == [40, 64]


def test_a_variable_frame_rate_clip_keeps_each_frame_once(vae, real_weights, tmp_path):
    """ffmpeg's image pipe is constant-rate: a GIF or phone clip whose frames last unequally came out with frames
    repeated to its base rate (6 frames over 1.5 s read as 15) yet recorded at its mean rate (4 fps), so the latent
    and the decoded clip lasted 3.75 s. Each source frame is now read once, at the mean rate: 6 frames, 1.5 s."""
    frames = [Image.new("RGB", (32, 24), (40 * i, 0, 0)) for i in range(6)]
    src = tmp_path / "vfr.gif"
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=[100, 100, 100, 400, 400, 400], loop=0)
    lat = tmp_path / "vfr.latent"
    result = vae("video", src, "-o", lat, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["frames"], record["fps"]) == (6, 4.0)
    assert read_metadata(lat)["frame_indices"] == list(range(6))
    assert vae("decode", lat, "-o", tmp_path / "vfr.mp4").exit_code == 0
    meta, decoded = _frames(tmp_path / "vfr.mp4")
    assert (decoded.shape[0], meta["fps"]) == (6, 4.0)


def test_a_cut_off_matroska_clip_is_an_error(vae, real_weights, tmp_path):
    """A Matroska or WebM clip cut off keeps the duration in its header, and ffmpeg reads it to the cut, says 'File
    ended prematurely' and exits 0: a clip of 24 frames cut at 60% was encoded as 1 (mkv) or 9 (webm) frames without
    a word. An error ffmpeg logs while decoding a clip short of its header's frames now makes it truncated."""
    import subprocess

    for ext in ("mkv", "webm"):
        whole, cut = tmp_path / f"whole.{ext}", tmp_path / f"cut.{ext}"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc=size=64x48:rate=12", "-frames:v", "24", "-pix_fmt", "yuv420p", whole], check=True)
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
        result = vae("video", cut, "-o", tmp_path / f"{ext}.latent", "--json")
        assert result.exit_code == 1
        line = _error_line(result)
        assert line.startswith(f"Error: {cut}: truncated or corrupt video: ffmpeg decoded ") and \
            line.endswith(" of the 24 frames its header promises (File ended prematurely)")
        assert json.loads(result.stdout)["error"] == line.removeprefix("Error: ")
        assert not (tmp_path / f"{ext}.latent").exists()
        result = vae("video", whole, "-o", tmp_path / f"{ext}.latent", "--json")
        assert result.exit_code == 0 and json.loads(result.stdout)["frames"] == 24


def test_a_cut_off_gif_is_an_error(vae, real_weights, tmp_path):
    """A GIF records no duration and ffmpeg reads one cut off to the cut without a word: 24 frames cut at 60% were
    encoded as 14. A GIF ends with its trailer byte; one without it is now truncated."""
    whole, cut = tmp_path / "whole.gif", tmp_path / "cut.gif"
    frames = [Image.new("RGB", (32, 24), (10 * i, 255 - 10 * i, 0)) for i in range(24)]
    frames[0].save(whole, save_all=True, append_images=frames[1:], duration=80, loop=0)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    result = vae("video", cut, "-o", tmp_path / "cut.latent", "--json")
    assert result.exit_code == 1
    line = _error_line(result)
    assert line == (f"Error: {cut}: truncated or corrupt video: ffmpeg decoded 14 frames and the GIF ends without its "
                    f"trailer (expected a final ';' byte)")
    assert json.loads(result.stdout)["error"] == line.removeprefix("Error: ")
    assert not (tmp_path / "cut.latent").exists()
    assert vae("video", cut, "-o", tmp_path / "first.latent", "--frames", 2).exit_code == 0  # before the cut
    padded = tmp_path / "padded.gif"  # zeros after the trailer, as some writers leave, are no cut
    padded.write_bytes(whole.read_bytes() + bytes(100))
    for clip in (whole, padded):
        result = vae("video", clip, "-o", tmp_path / "whole.latent", "--json")
        assert result.exit_code == 0 and json.loads(result.stdout)["frames"] == 24


def test_a_still_gif_is_not_a_video(vae, real_weights, tmp_path):
    """A GIF of one picture with no frame delay has a video stream but no frame rate: it was 'not a video ffmpeg can
    read (no video stream)'. It is a still image, as a PNG is; one with a delay is a 1-frame clip at its rate (it was
    read as 10 frames at 10 fps, its one frame repeated to ffmpeg's GIF time base)."""
    still, timed = tmp_path / "still.gif", tmp_path / "timed.gif"
    Image.new("RGB", (32, 24), (40, 0, 0)).save(still)
    Image.new("RGB", (32, 24), (40, 0, 0)).save(timed, duration=100)
    result = vae("video", still, "-o", tmp_path / "still.latent", "--json")
    assert (result.exit_code, _error_line(result)) == (
        1, f"Error: {still}: is a still GIF image (one picture, no frame rate), not a video (use 'vae encode')")
    assert json.loads(result.stdout)["status"] == "error" and not (tmp_path / "still.latent").exists()
    assert vae("encode", still, "-o", tmp_path / "still.latent").exit_code == 0
    result = vae("video", timed, "-o", tmp_path / "timed.latent", "--json")
    assert result.exit_code == 0, result.stderr
    assert (json.loads(result.stdout)["frames"], json.loads(result.stdout)["fps"]) == (1, 10.0)


def test_written_clips_declare_their_colour_matrix(tmp_path):
    """The frames were converted to YUV with BT.601's matrix and written untagged: players take an untagged HD clip
    for BT.709, so a decoded 1280x720 clip played (204, 51, 76) as (216, 67, 74). Clips now say BT.601, limited
    range."""
    import subprocess

    frame = torch.tensor([0.8, 0.2, 0.3]).view(3, 1, 1).expand(3, 48, 64)
    for ext in ("mp4", "webm", "mkv"):
        out = tmp_path / f"c.{ext}"
        with video.VideoWriter(out, 24.0, (64, 48)) as writer:
            writer.write(frame)
        log = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out)], capture_output=True, text=True).stderr
        assert "yuv420p(tv, smpte170m" in log, [line for line in log.splitlines() if "Stream" in line]
        as_a_player = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(out), "-vf",
                                      "scale=in_color_matrix=auto", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                                     capture_output=True, check=True).stdout
        assert np.abs(np.frombuffer(as_a_player, np.uint8)[:3].astype(int) - [204, 51, 76]).max() <= 2


def test_a_clip_in_a_folder_that_may_not_be_searched(vae, real_weights, gif, tmp_path, monkeypatch):
    """Path.exists() raised PermissionError there: 'unexpected PermissionError: [Errno 13] ...' and a --debug hint, for
    a clip the user may not read; a link loop said 'no such file'."""
    closed = tmp_path / "closed"
    closed.mkdir()
    clip = closed / "clip.gif"
    clip.write_bytes(gif.read_bytes())
    (tmp_path / "loop.gif").symlink_to(tmp_path / "loop.gif")
    deny_search_of(closed, monkeypatch)
    result = vae("video", clip, "-o", tmp_path / "clip.latent")
    closed.chmod(0o755)
    assert (result.exit_code, result.stderr) == (1, f"Error: {clip}: cannot read: permission denied\n")
    result = vae("video", tmp_path / "loop.gif", "-o", tmp_path / "loop.latent")
    loop = tmp_path / "loop.gif"
    assert (result.exit_code, result.stderr) == (1, f"Error: {loop}: cannot read: Too many levels of symbolic links\n")


def test_a_clip_from_stdin_is_a_usage_error(vae, real_weights, tmp_path):
    """`vae video -` said '-: no such file', exit 1, as if a file named '-' were missing."""
    result = vae("video", "-", "-o", tmp_path / "x.latent", "--json")
    assert (result.exit_code, _error_line(result)) == (
        2, "Error: -: reading a clip from stdin is not supported; give its file")
    assert json.loads(result.stdout)["error"] == "-: reading a clip from stdin is not supported; give its file"
    assert list(tmp_path.iterdir()) == []
