"""`vae decode`: model from metadata, original size restored, output formats, and bad latents."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vaecli.latents import load_latent, save_safetensors


@pytest.fixture
def latent_file(vae, real_weights, small_image, tmp_path):
    out = tmp_path / "small.latent"
    assert vae("encode", small_image, "-o", out).exit_code == 0
    return out


def _only_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".bmp", ".tiff"])
def test_decode_restores_original_size(vae, latent_file, tmp_path, ext):
    out = tmp_path / f"decoded{ext}"
    result = vae("decode", latent_file, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == f"{latent_file} -> {out}  taef2 61x45"
    with Image.open(out) as img:
        assert img.size == (61, 45)
        assert img.mode == "RGB"


def test_decode_default_output_name_strips_latent_marker(vae, real_weights, small_image, tmp_path):
    lat = tmp_path / "small.latent.png"
    assert vae("encode", small_image, "-o", lat).exit_code == 0
    outdir = tmp_path / "dec"
    result = vae("decode", lat, "-o", outdir, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record == {"input": str(lat), "output": str(outdir / "small.png"), "status": "ok", "error": None,
                      "model": "taef2", "size": [61, 45]}


def test_decode_png_latent_close_to_float(vae, real_weights, small_image, tmp_path):
    assert vae("encode", small_image, "-o", tmp_path / "a.latent").exit_code == 0
    assert vae("encode", small_image, "-o", tmp_path / "a.latent.png").exit_code == 0
    assert vae("decode", tmp_path / "a.latent", "-o", tmp_path / "f.png").exit_code == 0
    assert vae("decode", tmp_path / "a.latent.png", "-o", tmp_path / "q.png").exit_code == 0
    import numpy as np

    f = np.asarray(Image.open(tmp_path / "f.png"), dtype=np.float32)
    q = np.asarray(Image.open(tmp_path / "q.png"), dtype=np.float32)
    assert np.abs(f - q).mean() < 2.0


def test_decode_with_a_model_of_another_latent_space_is_refused(vae, latent_file, tmp_path):
    out = tmp_path / "x.png"
    result = vae("decode", latent_file, "-o", out, "--model", "taesd")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {latent_file}: a taef2 latent (FLUX.2 latent space) cannot be "
                                        f"decoded with taesd (SD 1.x/2.x latent space): decode with taef2, flux2")
    assert not out.exists()


def test_decode_of_an_unknown_model_latent_checks_channels(vae, latent_file, tmp_path):
    latent, meta = load_latent(latent_file)
    foreign = tmp_path / "foreign.latent"
    save_safetensors(foreign, latent, {**meta, "model": "someone-elses-vae"})
    out = tmp_path / "x.png"
    result = vae("decode", foreign, "-o", out)
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {foreign}: made by model 'someone-elses-vae', which this vaecli "
                                        f"does not know; pass --model")
    result = vae("decode", foreign, "-o", out, "--model", "taesd")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {foreign}: expected 4 latent channels for taesd, got 32 "
                                        f"(made by someone-elses-vae)")
    assert not out.exists()


def test_decode_encoder_only_model(vae, real_weights, small_image, tmp_path):
    lat = tmp_path / "s.latent"
    assert vae("encode", small_image, "-o", lat, "--model", "taesana").exit_code == 0
    result = vae("decode", lat, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {lat}: taesana has no decoder "
                                        f"(encoder only: no decoder weights are published)")


def test_truncated_safetensors(vae, latent_file, tmp_path):
    bad = tmp_path / "bad.latent"
    data = latent_file.read_bytes()
    bad.write_bytes(data[: len(data) - 100])
    out = tmp_path / "x.png"
    result = vae("decode", bad, "-o", out)
    assert result.exit_code == 1
    assert _only_error_line(result).startswith(f"Error: {bad}: truncated or corrupt safetensors file (")
    assert not out.exists()


def test_foreign_safetensors(vae, real_weights, tmp_path):
    foreign = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(foreign))
    result = vae("decode", foreign, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {foreign}: not a vaecli latent file (a safetensors file with "
                                        f"tensors conv.weight and no 'vaecli-latent' metadata)")


def test_image_png_is_not_a_latent(vae, real_weights, small_image, tmp_path):
    result = vae("decode", small_image, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {small_image}: a PNG without vaecli latent metadata "
                                        f"(is it an image? use 'vae encode' on images)")


def test_random_bytes_are_not_a_latent(vae, tmp_path):
    junk = tmp_path / "junk.latent"
    junk.write_bytes(b"\xff" * 64)
    result = vae("decode", junk, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {junk}: not a latent file (expected .safetensors or a "
                                        f"vaecli latent PNG)")


def test_a_fifo_named_as_input_is_refused_not_waited_on(tmp_path):
    """A whole process with a time limit: reading a FIFO nobody writes to blocks, in a thread no signal reaches (and
    a latent file is opened more than once, so even a writer's one pass would leave the next open waiting)."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "pipe.latent"
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, "-m", "vaecli", "decode", str(fifo), "-o", str(tmp_path / "x.png"),
                          "--json"], capture_output=True, text=True, timeout=60)
    message = f"{fifo}: not a regular file (a FIFO, socket or device), expected a latent file"
    assert (run.returncode, run.stderr.strip().splitlines()) == (1, [f"Error: {message}"])
    assert json.loads(run.stdout)["error"] == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.latent"]


@pytest.mark.parametrize("change, message", [
    ({"model": "sd99"}, "made by model 'sd99', which this vaecli does not know; pass --model"),
    # A hostile name: a terminal acts on ESC and BEL, and U+2028 breaks the line for some readers; all shown escaped.
    ({"model": "\x1b]0;owned\x07\x1b[2Jsd99\u2028"},
     "made by model '\\x1b]0;owned\\x07\\x1b[2Jsd99\\u2028', which this vaecli does not know; pass --model"),
    # A model's own latents said to be 'normalized' where it has no normalization statistics (a hand-edited or
    # foreign file): the error names the models that have them, not the model itself.
    ({"space": "normalized"}, "'normalized' latents need their model's normalization statistics, which taef2 has "
                              "none of (models with them: flux2, wan2.1, wan2.2, qwen-image, taew2_1, taew2_2)"),
    # Messages quote the model's name: a megabyte of one made a megabyte-long error line (three with --model).
    ({"model": "x" * 10 ** 6}, f"metadata 'model' must be a model name of at most 100 characters, got {'x' * 40!r}"),
])
def test_latent_metadata_this_model_cannot_decode(vae, latent_file, tmp_path, change, message):
    latent, meta = load_latent(latent_file)
    odd = tmp_path / "odd.latent"
    save_safetensors(odd, latent, {**meta, **change})
    result = vae("decode", odd, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert _only_error_line(result) == f"Error: {odd}: {message}"
    assert not (tmp_path / "x.png").exists()


def test_latent_naming_no_model_and_empty_files_say_so(vae, latent_file, tmp_path):
    latent, meta = load_latent(latent_file)
    anonymous = tmp_path / "anonymous.latent"
    save_safetensors(anonymous, latent, {k: v for k, v in meta.items() if k != "model"})
    empty = tmp_path / "empty.latent"
    empty.write_bytes(b"")
    result = vae("decode", anonymous, empty, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    assert {r["input"]: r["error"] for r in map(json.loads, result.stdout.splitlines())} == {
        str(anonymous): f"{anonymous}: the latent names no model; pass --model",
        str(empty): f"{empty}: an empty file (expected .safetensors or a vaecli latent PNG)"}
    assert vae("decode", anonymous, "-m", "taef2", "-o", tmp_path / "out", "-q").exit_code == 0


def test_decode_refuses_to_overwrite_input(vae, real_weights, small_image, tmp_path):
    lat = tmp_path / "x.png"
    assert vae("encode", small_image, "-o", lat).exit_code == 0
    before = lat.read_bytes()
    result = vae("decode", lat, "-o", lat)
    assert result.exit_code == 1
    assert _only_error_line(result) == f"Error: refusing to overwrite input {lat} (choose another -o)"
    assert lat.read_bytes() == before


def test_decode_beside_the_latent_never_replaces_the_original_unasked(vae, real_weights, small_image, tmp_path):
    """`vae encode photo.png; vae decode photo.latent` must not put the reconstruction over photo.png."""
    photo = tmp_path / "photo.png"
    photo.write_bytes(small_image.read_bytes())
    fresh = tmp_path / "fresh.png"
    fresh.write_bytes(small_image.read_bytes())
    assert vae("encode", photo, fresh, "-q").exit_code == 0
    (tmp_path / "fresh.png").unlink()
    before = photo.read_bytes()
    result = vae("decode", tmp_path / "photo.latent", tmp_path / "fresh.latent", "--json")
    assert result.exit_code == 1
    records = {r["input"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert records[str(tmp_path / "fresh.latent")]["status"] == "ok"
    assert records[str(tmp_path / "photo.latent")]["error"] == (
        f"{photo}: exists, refusing to replace it (it may be the original image or clip; --overwrite replaces it, "
        f"-o writes elsewhere)")
    assert photo.read_bytes() == before
    assert vae("decode", tmp_path / "photo.latent", "--skip-existing", "-q").exit_code == 0
    assert photo.read_bytes() == before
    assert vae("decode", tmp_path / "photo.latent", "--overwrite", "-q").exit_code == 0
    assert photo.read_bytes() != before
    assert vae("decode", tmp_path / "photo.latent", "-o", photo, "-q").exit_code == 0  # named outright: replaced


def test_decode_unsupported_output_extension(vae, latent_file, tmp_path):
    result = vae("decode", latent_file, "-o", tmp_path / "x.gifx")
    assert result.exit_code == 2
    assert _only_error_line(result) == ("Error: cannot write '.gifx': expected an image extension (.png, .jpg, "
                                        ".jpeg, .webp, .bmp, .tif, .tiff) or a video extension (.avi, .gif, .m4v, "
                                        ".mkv, .mov, .mp4, .webm)")


def test_an_absent_device_is_a_usage_error_before_any_input(vae, latent_file, tmp_path, monkeypatch):
    """decode loads each input's model as it comes: the device is checked up front, as the other commands do."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = vae("decode", latent_file, "-o", tmp_path / "x.png", "--device", "cuda", "--json")
    assert result.exit_code == 2
    assert _only_error_line(result) == "Error: --device cuda: CUDA is not available on this machine"
    assert json.loads(result.stdout) == {"input": None, "output": None, "status": "error",
                                         "error": "--device cuda: CUDA is not available on this machine"}
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("ext, shown", [("", "''"), ("exr", "exr"), ("p/ng", "p/ng")])
def test_an_unknown_ext_names_the_option(vae, latent_file, tmp_path, ext, shown):
    result = vae("decode", latent_file, "-o", f"{tmp_path / 'out'}/", "--ext", ext)
    assert result.exit_code == 2
    assert _only_error_line(result) == f"Error: --ext {shown}: expected one of png, jpg, jpeg, webp, bmp, tif, tiff"
    assert not (tmp_path / "out").exists()


def test_an_image_latent_to_a_video_output_is_refused(vae, latent_file, tmp_path):
    result = vae("decode", latent_file, "-o", tmp_path / "x.mp4")
    assert (result.exit_code, _only_error_line(result)) == (1, (
        f"Error: {latent_file}: an image latent; write it as .png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff"))
    result = vae("decode", latent_file, "--as-frames", "-o", tmp_path / "frames")  # named the option it did not take
    assert (result.exit_code, _only_error_line(result)) == (1, (
        f"Error: {latent_file}: an image latent: --as-frames writes the frames of a latent video"))
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "frames").exists()


def test_newer_format_version_is_refused(vae, latent_file, tmp_path):
    latent, meta = load_latent(latent_file)
    from vaecli.latents import save_safetensors

    future = tmp_path / "future.latent"
    save_safetensors(future, latent, {**meta, "version": 99})
    result = vae("decode", future, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {future}: latent format version 99 is newer than this vaecli "
                                        f"understands (1); upgrade vaecli")


# --- KL models and latent spaces --------------------------------------------------------------------------

def test_decode_kl_latent_uses_metadata(vae, kl_files, small_image, tmp_path):
    files = kl_files("sd15")
    lat = tmp_path / "x.latent"
    assert vae("encode", small_image, "-o", lat, "--model", "sd15", "--weights", files["diffusers"]).exit_code == 0
    result = vae("decode", lat, "-o", tmp_path / "x.png", "--weights", files["diffusers"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == f"{lat} -> {tmp_path / 'x.png'}  sd15 61x45"


@pytest.mark.parametrize("space", ["scaled", "raw"])
def test_decode_inverts_the_recorded_space(vae, kl_files, small_image, tmp_path, space):
    files = kl_files("flux1")
    ref = files["reference"]
    lat = tmp_path / "x.latent"
    result = vae("encode", small_image, "-o", lat, "--model", "flux1", "--weights", files["ldm"],
                 "--latent-space", space)
    assert result.exit_code == 0, result.stderr
    from vaecli.codec import load_codec

    codec = load_codec("flux1", [files["ldm"]], device="cpu")
    latent, meta = load_latent(lat)
    pixels = codec.decode_latent(latent, meta)
    raw = latent if space == "raw" else latent / 0.3611 + 0.1159
    with torch.inference_mode():
        expected = ((ref.decode(raw[None]).sample + 1) / 2).clamp(0, 1)[..., :45, :61]
    assert (pixels - expected).abs().max().item() <= 1e-4


def test_normalized_latent_needs_flux2(vae, kl_files, small_image, tmp_path):
    files = kl_files("flux2")
    lat = tmp_path / "n.latent"
    result = vae("encode", small_image, "-o", lat, "--model", "flux2", "--weights", files["diffusers"],
                 "--latent-space", "normalized")
    assert result.exit_code == 0, result.stderr
    latent, meta = load_latent(lat)
    assert list(latent.shape) == [128, 3, 4] and meta["padding"] == [0, 0, 3, 3]
    result = vae("decode", lat, "-o", tmp_path / "x.png", "--model", "taef2")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {lat}: 'normalized' latents (made by flux2) need flux2's "
                                        f"normalization statistics: decode with --model flux2, not taef2")
    result = vae("decode", lat, "-o", tmp_path / "x.png", "--weights", files["diffusers"])
    assert result.exit_code == 0, result.stderr


def test_tiny_decoder_previews_a_kl_latent(vae, kl_files, random_taesd, small_image, tmp_path):
    """A scaled sd15 latent decodes with taesd as is; a raw one is scaled first, giving the same picture."""
    files = kl_files("sd15")
    for space in ("scaled", "raw"):
        assert vae("encode", small_image, "-o", tmp_path / f"{space}.latent", "--model", "sd15",
                   "--weights", files["diffusers"], "--latent-space", space).exit_code == 0
        result = vae("decode", tmp_path / f"{space}.latent", "-o", tmp_path / f"{space}.png", "--model", "taesd",
                     "--weights", random_taesd / "original")
        assert result.exit_code == 0, result.stderr
    import numpy as np

    a = np.asarray(Image.open(tmp_path / "scaled.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "raw.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


@pytest.fixture
def svd_latent(vae, kl_files, gif, tmp_path):
    """A 6-frame SVD latent video of the test GIF, with the random-weight SVD files."""
    files = kl_files("svd")
    lat = tmp_path / "s.latent"
    result = vae("video", gif, "-o", lat, "--frames", 6, "--model", "svd", "--weights", files["diffusers"])
    assert result.exit_code == 0, result.stderr
    return lat, files["diffusers"]


def test_svd_verify_compares_every_frame_with_the_whole_clip(vae, svd_latent, tmp_path):
    lat, weights = svd_latent
    out = tmp_path / "o"
    result = vae("decode", lat, "-o", out, "--as-frames", "--weights", weights, "--chunk", 2, "--max-memory", "1",
                 "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)["verify"]
    assert check["compared"] == "all 6 frames with the whole clip decoded at once"
    assert check["max_abs_diff"] <= 1e-4
    result = vae("decode", lat, "-o", tmp_path / "p", "--as-frames", "--weights", weights, "--verify")
    assert result.exit_code == 0, result.stderr
    assert "  verify (all 6 frames with the whole clip decoded at once): max diff 0.0" in result.stderr


def test_a_video_output_dropped_on_failure_leaves_one_error_line(svd_latent, tmp_path):
    """A whole process (ffmpeg writes to the inherited stderr, which CliRunner does not see): the mp4 writer opened
    before the failure is dropped without ffmpeg's or imageio-ffmpeg's complaints about an empty video."""
    import subprocess
    import sys

    lat, weights = svd_latent
    run = subprocess.run([sys.executable, "-m", "vaecli", "decode", str(lat), "-o", str(tmp_path / "o.mp4"),
                          "--weights", str(weights), "--max-memory", "1", "--scratch", str(tmp_path / "nowhere")],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"Error: {lat}: scratch folder {tmp_path / 'nowhere'}: No such file or directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.latent"]


def test_svd_scratch_folder_must_exist_and_have_room(vae, svd_latent, tmp_path, monkeypatch):
    lat, weights = svd_latent
    missing = tmp_path / "nowhere"
    result = vae("decode", lat, "-o", tmp_path / "o", "--as-frames", "--weights", weights, "--max-memory", "1",
                 "--scratch", missing)
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {lat}: scratch folder {missing}: No such file or directory")
    assert list((tmp_path / "o").iterdir()) == []  # no partial frame folder (nor its hidden temporary one)

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1 << 20))
    result = vae("decode", lat, "-o", tmp_path / "o", "--as-frames", "--weights", weights, "--max-memory", "1",
                 "--scratch", tmp_path)
    assert result.exit_code == 1
    assert _only_error_line(result) == (
        f"Error: {lat}: scratch folder {tmp_path}: this needs about 0.0 GB of scratch space, 0.0 GB are free "
        "(use --scratch DIR or a larger --max-memory)")
    monkeypatch.undo()
    result = vae("decode", lat, "-o", tmp_path / "o", "--as-frames", "--weights", weights, "--max-memory", "1",
                 "--scratch", tmp_path, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["scratch_bytes"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("vaecli-scratch")]  # unlinked, gone on exit


def test_kl_decode_past_the_budget_spills_layers_to_scratch_exactly(vae, kl_files, small_image, tmp_path):
    """sd15 with --max-memory 1 byte: every whole layer goes to a scratch file in --scratch (gone on exit), the
    image is the untiled decode's, and --json / the summary line report the scratch space used."""
    import numpy as np

    weights = kl_files("sd15")["diffusers"]
    lat, scratch = tmp_path / "x.latent", tmp_path / "scratch"
    scratch.mkdir()
    assert vae("encode", small_image, "-o", lat, "--model", "sd15", "--weights", weights).exit_code == 0
    whole = vae("decode", lat, "-o", tmp_path / "whole.png", "--weights", weights, "--tile", "off", "--json")
    assert whole.exit_code == 0, whole.stderr
    assert "scratch_bytes" not in json.loads(whole.stdout)
    result = vae("decode", lat, "-o", tmp_path / "spilled.png", "--weights", weights, "--max-memory", "1",
                 "--scratch", scratch, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["scratch_bytes"] > 0 and list(scratch.iterdir()) == []
    a = np.asarray(Image.open(tmp_path / "whole.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "spilled.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # equal to 1e-4 before quantisation: at most a rounding step apart
    line = vae("decode", lat, "-o", tmp_path / "again.png", "--weights", weights, "--max-memory", "1")
    assert line.stderr.strip() == (f"{lat} -> {tmp_path / 'again.png'}  sd15 61x45  "
                                   f"scratch {record['scratch_bytes'] / 1e9:.2f} GB")


# --- --as-frames never deletes what vaecli did not write; -o - ---------------------------------------------

def _tree(folder) -> dict:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


FRAMES = ["frame_000000.png", "frame_000001.png"]


def test_as_frames_replaces_only_a_folder_of_frames(vae, clip_latent):
    """Beside the latent (one input: overwrite): an earlier frames folder is replaced, leaving nothing hidden."""
    work, frames = clip_latent.parent, clip_latent.parent / "clip"
    frames.mkdir()
    (frames / "frame_000007.png").write_bytes(b"stale frame")
    result = vae("decode", clip_latent, "--as-frames", "-q")
    assert (result.exit_code, result.stderr) == (0, "")
    assert sorted(p.name for p in work.iterdir()) == ["clip", "clip.latent"]
    assert sorted(p.name for p in frames.iterdir()) == FRAMES


@pytest.mark.parametrize("others", [["notes.txt"], ["notes.txt", "source_frame.png", "sub/", "z.png", "zz.png"]])
def test_as_frames_refuses_a_folder_holding_other_files(vae, clip_latent, others):
    work, frames = clip_latent.parent, clip_latent.parent / "clip"
    frames.mkdir()
    (frames / "frame_000000.png").write_bytes(b"an old frame")
    for name in others:
        (frames / name).mkdir() if name.endswith("/") else (frames / name).write_bytes(b"precious")
    before = _tree(work)
    result = vae("decode", clip_latent, "--as-frames", "--json")
    assert result.exit_code == 1
    names = sorted(n.rstrip("/") for n in others)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    message = (f"{frames}: refusing to replace this folder: expected only frame_NNNNNN.png files (an earlier "
               f"--as-frames output), found {shown} (move them or choose another -o)")
    assert _only_error_line(result) == f"Error: {clip_latent}: {message}"
    assert json.loads(result.stdout)["error"] == message
    assert _tree(work) == before and sorted(p.name for p in work.iterdir()) == ["clip", "clip.latent"]


def test_as_frames_refuses_a_file_in_the_way(vae, clip_latent):
    (clip_latent.parent / "clip").write_bytes(b"precious")
    result = vae("decode", clip_latent, "--as-frames")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: {clip_latent}: {clip_latent.parent / 'clip'}: is a file, expected "
                                        f"a folder of frames or a new name")
    assert (clip_latent.parent / "clip").read_bytes() == b"precious"
    assert sorted(p.name for p in clip_latent.parent.iterdir()) == ["clip", "clip.latent"]


def test_as_frames_refuses_a_folder_holding_an_input(vae, clip_latent):
    """clip/x.latent and clip.latent in one run: clip.latent's frames folder would replace the other input."""
    work = clip_latent.parent
    inner = work / "clip" / "x.latent"
    inner.parent.mkdir()
    inner.write_bytes(clip_latent.read_bytes())
    (work / "clip" / "notes.txt").write_text("precious\n")
    before = _tree(work)
    result = vae("decode", inner, clip_latent, "--as-frames", "--json")
    assert result.exit_code == 1
    assert _only_error_line(result) == (f"Error: refusing to replace {work / 'clip'}: it is a folder holding input "
                                        f"{inner} (choose another -o)")
    assert _tree(work) == before


@pytest.mark.parametrize("cmd", ["encode", "decode", "roundtrip"])
def test_output_dash_is_refused(vae, real_weights, small_image, latent_file, tmp_path, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = vae(cmd, latent_file if cmd == "decode" else small_image, "-o", "-")
    assert result.exit_code == 2
    assert _only_error_line(result) == "Error: -o -: writing to stdout is not supported; give a file or folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_decoder_that_overflows_writes_nothing(vae, latent_file, shared_weights, tmp_path):
    sd = torch.load(shared_weights / "taef2_decoder.pth", weights_only=True)
    torch.save({k: v * 1e4 for k, v in sd.items()}, tmp_path / "loud.pth")
    result = vae("decode", latent_file, "-o", tmp_path / "x.png", "-w", tmp_path / "loud.pth")
    assert result.exit_code == 1
    assert _only_error_line(result).startswith(f"Error: {latent_file}: expected finite pixels, the model gave ")
    assert _only_error_line(result).endswith(" NaN/Inf (an overflow: try another --dtype)")
    assert not (tmp_path / "x.png").exists()


def test_scale_factors_that_overflow_the_latents_are_refused(vae, latent_file, tmp_path):
    """Finite stored values and a 'scaled' latent's own factors turned Inf once converted: garbage at exit 0."""
    z, meta = load_latent(latent_file)
    for key, value in (("scaling_factor", 1e-300), ("shift_factor", 1e308)):
        bad = tmp_path / f"{key}.latent"
        save_safetensors(bad, z, {**meta, "space": "scaled", "scaling_factor": 1.0, "shift_factor": 0.0, key: value})
        result = vae("decode", bad, "-o", tmp_path / "x.png")
        scale, shift = (1e-300, 0) if key == "scaling_factor" else (1, 1e308)
        assert (result.exit_code, _only_error_line(result)) == (1, (
            f"Error: {bad}: expected finite latents once converted from 'scaled' (scaling_factor {scale:g}, "
            f"shift_factor {shift:g}), got {z.numel()} NaN/Inf"))
    assert not (tmp_path / "x.png").exists()


def test_a_latent_that_cannot_fit_the_decoding_model_is_refused_before_it_is_read(vae, real_weights, tmp_path,
                                                                                     monkeypatch):
    """A latent of a model this vaecli does not know, decoded with --model: its channels and size were checked only
    after its values were read (a header can claim GBs)."""
    from vaecli import latents

    meta = {"format": "vaecli-latent", "version": "1", "model": "elsewhere", "space": "raw", "channels": "16"}
    save_file({"latent": torch.zeros(16, 6, 8)}, str(tmp_path / "a.latent"), meta)
    monkeypatch.setattr(latents, "load_latent", lambda *a, **k: pytest.fail("the values were read"))
    result = vae("decode", tmp_path / "a.latent", "--model", "taef2", "-o", tmp_path / "a.png")
    assert (result.exit_code, _only_error_line(result)) == (
        1, f"Error: {tmp_path / 'a.latent'}: expected 32 latent channels for taef2, got 16 (made by elsewhere)")
    save_file({"latent": torch.zeros(32, 6, 8)}, str(tmp_path / "b.latent"), {**meta, "channels": "32"})
    monkeypatch.setenv("VAE_MAX_PIXELS", "3071")
    result = vae("decode", tmp_path / "b.latent", "--model", "taef2", "-o", tmp_path / "b.png")
    assert (result.exit_code, _only_error_line(result)) == (
        1, f"Error: {tmp_path / 'b.latent'}: it decodes to 64x48 pixels, over the limit of 3071 pixels (set "
           f"VAE_MAX_PIXELS to allow larger images)")
