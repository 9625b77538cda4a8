"""`vae encode`: outputs, formats, metadata, and bad input."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.conftest import make_image
from vaecli.latents import load_latent
from vaecli.pipeline import input_seed


def test_encode_writes_safetensors_with_metadata(vae, real_weights, small_image, tmp_path):
    out = tmp_path / "small.latent"
    result = vae("encode", small_image, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == f"{small_image} -> {out}  taef2 latent [32, 6, 8]"
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["latent"]
        assert list(f.get_tensor("latent").shape) == [32, 6, 8]
    assert meta["format"] == "vaecli-latent"
    assert meta["version"] == "1"
    assert meta["model"] == "taef2"
    assert json.loads(meta["channels"]) == 32
    assert json.loads(meta["image_size"]) == [61, 45]
    assert json.loads(meta["padding"]) == [0, 0, 3, 3]
    assert meta["dtype"] == "fp32"
    assert meta["space"] == "raw"


def test_encode_png_format_by_extension(vae, real_weights, small_image, tmp_path):
    out = tmp_path / "lat.png"
    result = vae("encode", small_image, "-o", out)
    assert result.exit_code == 0, result.stderr
    latent, meta = load_latent(out)
    assert list(latent.shape) == [32, 6, 8]
    assert meta["model"] == "taef2"
    from PIL import Image

    with Image.open(out) as img:
        assert img.mode == "RGBA"
        assert img.size == (8 * 4, 6 * 2)  # 8 groups of 4 channels in a 2x4 grid


def test_encode_several_inputs_into_folder_with_json(vae, real_weights, tmp_path):
    a = make_image(tmp_path / "a.png", (40, 24))
    b = make_image(tmp_path / "b.jpg", (17, 33))
    outdir = tmp_path / "latents"
    result = vae("encode", a, b, "-o", outdir, "--format", "png", "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["output"] for r in records] == [str(outdir / "a.latent.png"), str(outdir / "b.latent.png")]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert records[1]["shape"] == [32, 5, 3]
    assert all(r["error"] is None for r in records)


def test_encode_default_output_is_beside_input(vae, real_weights, small_image):
    result = vae("encode", small_image)
    assert result.exit_code == 0, result.stderr
    assert (small_image.parent / "small.latent").is_file()


def test_encode_with_explicit_weights_files(vae, shared_weights, small_image, tmp_path):
    out = tmp_path / "x.latent"
    result = vae("encode", small_image, "-o", out, "--weights", shared_weights / "taef2_encoder.pth")
    assert result.exit_code == 0, result.stderr
    assert out.is_file()


def test_encode_bf16(vae, real_weights, small_image, tmp_path):
    out = tmp_path / "x.latent"
    result = vae("encode", small_image, "-o", out, "--dtype", "bf16")
    assert result.exit_code == 0, result.stderr
    latent, meta = load_latent(out)
    assert meta["dtype"] == "bf16"
    assert str(latent.dtype) == "torch.bfloat16"


def test_encode_taesana_is_32x(vae, real_weights, small_image, tmp_path):
    out = tmp_path / "x.latent"
    result = vae("encode", small_image, "-o", out, "--model", "taesana")
    assert result.exit_code == 0, result.stderr
    latent, meta = load_latent(out)
    assert list(latent.shape) == [32, 2, 2]
    assert meta["padding"] == [0, 0, 3, 19]


# --- bad input: one line on stderr, exit code, no output left behind -------------------------------------

def _only_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_missing_input(vae, real_weights, tmp_path):
    out = tmp_path / "x.latent"
    result = vae("encode", tmp_path / "nope.png", "-o", out)
    assert result.exit_code == 1
    assert _only_error_line(result) == f"Error: {tmp_path / 'nope.png'}: no such file"
    assert not out.exists()


def test_folder_without_images(vae, real_weights, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "d" / "sub").mkdir(parents=True)
    make_image(tmp_path / "d" / "sub" / "deep.png")
    result = vae("encode", tmp_path / "d", "-o", out)
    assert result.exit_code == 2
    assert _only_error_line(result) == (f"Error: no .png/.jpg/.jpeg/.webp/.bmp/.tif/.tiff files in folder "
                                        f"{tmp_path / 'd'} (use -r to look in subfolders)")
    assert not out.exists()


def test_non_image_input(vae, real_weights, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello, not an image\n")
    out = tmp_path / "x.latent"
    result = vae("encode", bad, "-o", out)
    assert result.exit_code == 1
    assert _only_error_line(result) == f"Error: {bad}: not an image file Pillow can read"
    assert not out.exists()
    bad.write_bytes(b"")
    result = vae("encode", bad, "-o", out)
    assert (result.exit_code, _only_error_line(result)) == (1, f"Error: {bad}: empty file, expected an image")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0\0\0\x18ftypmp42")
    result = vae("encode", clip, "-o", out)
    assert (result.exit_code, _only_error_line(result)) == (
        1, f"Error: {clip}: not an image file Pillow can read (a video? use 'vae video')")


def test_an_animation_is_refused_a_multipage_tiff_is_its_first_page(vae, real_weights, gif, tmp_path):
    """One frame of an animation would be encoded and the rest dropped unsaid; a TIFF's first page is the picture."""
    frames = [Image.new("RGB", (32, 24), (60 * i, 90, 30)) for i in range(3)]
    for name in ("png.png", "webp.webp", "tiff.tiff"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    result = vae("encode", gif, tmp_path / "png.png", tmp_path / "webp.webp", tmp_path / "tiff.tiff", "-o",
                 tmp_path / "out", "--json")
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("Error:")] == [
        f"Error: {gif}: expected a still image, got an animated GIF of 24 frames (use 'vae video' for its frames)",
        f"Error: {tmp_path / 'png.png'}: expected a still image, got an animated PNG of 3 frames",
        f"Error: {tmp_path / 'webp.webp'}: expected a still image, got an animated WEBP of 3 frames"]
    statuses = {Path(r["input"]).name: r["status"] for r in map(json.loads, result.stdout.splitlines())}
    assert statuses == {gif.name: "error", "png.png": "error", "webp.webp": "error", "tiff.tiff": "ok"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiff.latent"]
    first = vae("encode", tmp_path / "tiff.tiff", "-o", tmp_path / "first.latent")
    frames[0].save(tmp_path / "still.png")
    still = vae("encode", tmp_path / "still.png", "-o", tmp_path / "still.latent")
    assert first.exit_code == still.exit_code == 0
    assert (tmp_path / "first.latent").read_bytes() == (tmp_path / "still.latent").read_bytes()


@pytest.mark.parametrize("value, ok", [("abc", False), ("-5", False), ("1.5", False), ("nan", False),
                                       ("1" * 5000, False), ("1e9", True), ("400_000_000", True), (" 4000 ", True)])
def test_max_pixels_is_a_whole_number_or_an_error(vae, real_weights, small_image, tmp_path, monkeypatch, value, ok):
    """A value that is no whole number was ignored without a word (the default applied, 1e9 meant 2**28)."""
    monkeypatch.setenv("VAE_MAX_PIXELS", value)
    result = vae("encode", small_image, "-o", tmp_path / "x.latent")
    assert result.exit_code == (0 if ok else 1)
    if not ok:
        assert _only_error_line(result) == (f"Error: {small_image}: VAE_MAX_PIXELS={value.strip()[:40]}: expected a "
                                            f"whole number of pixels, e.g. 400000000 or 4e8")
    monkeypatch.setenv("VAE_MAX_PIXELS", "2744")  # 61x45 = 2745 pixels
    result = vae("encode", small_image, "-o", tmp_path / "y.latent")
    assert (result.exit_code, _only_error_line(result)) == (1, f"Error: {small_image}: image has 2745 pixels, over "
                                                               f"the limit of 2744 pixels (set VAE_MAX_PIXELS to "
                                                               f"allow larger images)")


def test_several_inputs_into_an_output_file_name_are_refused(vae, real_weights, small_image, tmp_path):
    """`-o out.latent` with two inputs made a folder named out.latent; an existing folder of that name is used."""
    out = tmp_path / "out.latent"
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "other.png").write_bytes(small_image.read_bytes())
    result = vae("encode", small_image, tmp_path / "more", "-o", out)
    assert (result.exit_code, _only_error_line(result)) == (
        2, f"Error: -o {out}: names a file, but there are 2 inputs (give a folder, e.g. -o {tmp_path / 'out'}/, or "
           f"make {out} one first)")
    assert not out.exists()
    out.mkdir()
    assert vae("encode", small_image, "-o", out, "-q").exit_code == 0  # one input: a file inside the folder
    assert [p.name for p in out.iterdir()] == ["small.latent"]


@pytest.mark.parametrize("name", ["astronaut.png", "rocket.jpg"])
def test_truncated_image(vae, real_weights, shared_images, tmp_path, name):
    data = (shared_images / name).read_bytes()
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "x.latent"
    result = vae("encode", bad, "-o", out)
    assert result.exit_code == 1
    expected = "truncated PNG: its pixel data holds" if name.endswith(".png") else "truncated or corrupt image ("
    assert _only_error_line(result).startswith(f"Error: {bad}: {expected}")
    assert not out.exists()
    assert list(tmp_path.glob(".*part")) == []


def _png_with_short_pixel_data(src: Path, dst: Path) -> Path:
    """`src` as a well-formed PNG (valid chunks and CRCs, a complete zlib stream) holding only its top quarter rows."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    raw = img.tobytes()
    rows = b"".join(b"\0" + raw[i * w * 3:(i + 1) * w * 3] for i in range(h // 4))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    dst.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return dst


def test_images_too_short_for_their_size_are_refused_before_decoding(vae, real_weights, small_image, tmp_path):
    """Pillow zero-fills a PNG whose pixel data ends early and grey-fills a JPEG that ends early: a cut file, or a
    few bytes declaring a huge picture (a memory bomb under the pixel limit), read as an image. Both are refused."""
    short_png = _png_with_short_pixel_data(small_image, tmp_path / "short.png")
    jpeg = tmp_path / "photo.jpg"
    Image.open(small_image).save(jpeg, quality=90)
    data = bytearray(jpeg.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 9] = struct.pack(">HH", 15000, 15000)
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(bytes(data))
    result = vae("encode", small_image, short_png, huge, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    errors = {Path(r["input"]).name: r.get("error") for r in map(json.loads, result.stdout.splitlines())}
    assert errors == {
        "small.png": None,
        "short.png": f"{short_png}: truncated PNG: its pixel data holds 2024 bytes, its size needs 8280",
        "huge.jpg": f"{huge}: truncated JPEG: a 15000x15000 picture needs at least 439453 bytes, the file has "
                    f"{len(data)}"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["small.latent"]


def _float_tiff(path, bad=()):
    """A 20x12 32-bit float grayscale TIFF (Pillow mode F) in [0, 1], holding the values `bad` in its first pixels."""
    arr = np.linspace(0, 1, 240, dtype=np.float32).reshape(12, 20)
    arr.flat[:len(bad)] = bad
    Image.fromarray(arr, "F").save(path)
    return path


def test_float_image_with_non_finite_pixels_is_refused(vae, real_weights, tmp_path):
    good, bad = _float_tiff(tmp_path / "good.tif"), _float_tiff(tmp_path / "bad.tif", (np.nan, np.inf, -np.inf))
    result = vae("encode", good, bad, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    records = {r["input"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert records[str(good)]["status"] == "ok"
    assert records[str(bad)]["error"] == f"{bad}: expected finite pixel values, found 3 NaN/Inf"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.latent"]
    assert torch.isfinite(load_latent(tmp_path / "out" / "good.latent")[0]).all()
    result = vae("encode", bad, "-o", tmp_path / "bad.latent")
    assert result.exit_code == 1
    assert _only_error_line(result) == f"Error: {bad}: expected finite pixel values, found 3 NaN/Inf"
    assert not (tmp_path / "bad.latent").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "png"])
def test_latents_of_tiny_and_odd_sized_images_decode(vae, real_weights, tmp_path, fmt):
    """Images smaller than the spatial factor are padded by more than their size; their metadata still checks."""
    sizes = [(1, 1), (3, 2), (9, 17), (16, 8)]
    inputs = [make_image(tmp_path / f"{w}x{h}.png", (w, h)) for w, h in sizes]
    assert vae("encode", *inputs, "-o", tmp_path / "lat", "--format", fmt, "-q").exit_code == 0
    result = vae("decode", tmp_path / "lat", "-o", tmp_path / "dec", "--json")
    assert result.exit_code == 0, result.stderr
    records = {Path(r["input"]).name.split(".")[0]: r["size"] for r in map(json.loads, result.stdout.splitlines())}
    assert records == {f"{w}x{h}": [w, h] for w, h in sizes}


def test_some_inputs_fail_others_are_written(vae, real_weights, tmp_path):
    good = make_image(tmp_path / "good.png")
    outdir = tmp_path / "out"
    result = vae("encode", good, tmp_path / "missing.png", "-o", outdir, "--json")
    assert result.exit_code == 1
    records = sorted(map(json.loads, result.stdout.splitlines()), key=lambda r: r["input"])
    assert [r["input"] for r in records] == [str(good), str(tmp_path / "missing.png")]
    assert [r["status"] for r in records] == ["ok", "error"]
    assert records[1]["error"] == f"{tmp_path / 'missing.png'}: no such file"
    assert records[1]["output"] is None
    assert (outdir / "good.latent").is_file()
    assert not (outdir / "missing.latent").exists()
    assert result.stderr.strip().splitlines()[-3:] == ["done: 1 ok, 0 skipped, 1 failed", "1 of 2 inputs failed:",
                                                       f"  {tmp_path / 'missing.png'}: no such file"]


def test_unknown_model_is_a_usage_error(vae, small_image):
    result = vae("encode", small_image, "--model", "sd99")
    assert result.exit_code == 2
    assert "'sd99' is not one of" in result.stderr


def test_bad_output_extension_is_a_usage_error(vae, real_weights, small_image, tmp_path):
    result = vae("encode", small_image, "-o", tmp_path / "x.jpg")
    assert result.exit_code == 2
    assert _only_error_line(result) == (f"Error: -o {tmp_path / 'x.jpg'}: expected a latent file ending in "
                                        f".latent, .safetensors or .png")


@pytest.mark.parametrize("option, value, message", [
    ("--tile", "9" * 5000, f"--tile {'9' * 40}: expected auto, off or a tile size in pixels"),
    ("--max-memory", "9" * 400, f"--max-memory {'9' * 40}: expected a size like 2GB, 512MB or 1.5GiB"),
])
def test_tile_and_budget_of_more_digits_than_a_number_holds(vae, real_weights, small_image, tmp_path, option, value,
                                                           message):
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", option, value)
    assert result.exit_code == 2
    assert _only_error_line(result) == f"Error: {message}"
    assert not (tmp_path / "x.latent").exists()


def test_format_disagreeing_with_extension(vae, real_weights, small_image, tmp_path):
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--format", "png")
    assert result.exit_code == 2
    assert _only_error_line(result) == f"Error: --format png disagrees with the output name {tmp_path / 'x.latent'}"


def test_several_inputs_into_a_file_is_a_usage_error(vae, real_weights, tmp_path):
    a, b = make_image(tmp_path / "a.png"), make_image(tmp_path / "b.png")
    target = tmp_path / "exists.latent"
    target.write_bytes(b"keep me")
    result = vae("encode", a, b, "-o", target)
    assert result.exit_code == 2
    assert _only_error_line(result) == f"Error: -o {target}: expected a folder for 2 inputs, got a file"
    assert target.read_bytes() == b"keep me"


def test_never_overwrites_an_input(vae, real_weights, small_image):
    before = small_image.read_bytes()
    result = vae("encode", small_image, "-o", small_image)
    assert result.exit_code == 1
    assert _only_error_line(result) == f"Error: refusing to overwrite input {small_image} (choose another -o)"
    assert small_image.read_bytes() == before


def test_two_inputs_mapping_to_one_output(vae, real_weights, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a, b = make_image(tmp_path / "x" / "same.png"), make_image(tmp_path / "y" / "same.png")
    result = vae("encode", a, b, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert _only_error_line(result) == f"Error: inputs {a} and {b} would both write {tmp_path / 'out' / 'same.latent'}"


# --- KL models (random weights in the official layouts) -------------------------------------------------

def test_encode_kl_scaled_by_default(vae, kl_files, small_image, tmp_path):
    files = kl_files("sd15")
    out = tmp_path / "x.latent"
    result = vae("encode", small_image, "-o", out, "--model", "sd15", "--weights", files["ldm"])
    assert result.exit_code == 0, result.stderr
    latent, meta = load_latent(out)
    assert list(latent.shape) == [4, 6, 8]
    assert (meta["space"], meta["scaling_factor"], meta["shift_factor"]) == ("scaled", 0.18215, 0.0)


def test_encode_kl_raw_and_sample(vae, kl_files, small_image, tmp_path):
    files = kl_files("flux1")
    args = ["encode", small_image, "--model", "flux1", "--weights", files["diffusers"]]
    assert vae(*args, "-o", tmp_path / "scaled.latent").exit_code == 0
    assert vae(*args, "-o", tmp_path / "raw.latent", "--latent-space", "raw").exit_code == 0
    assert vae(*args, "-o", tmp_path / "s1.latent", "--sample", "--seed", "3").exit_code == 0
    assert vae(*args, "-o", tmp_path / "s2.latent", "--sample", "--seed", "3").exit_code == 0
    scaled, meta = load_latent(tmp_path / "scaled.latent")
    raw, raw_meta = load_latent(tmp_path / "raw.latent")
    assert raw_meta["space"] == "raw" and (raw_meta["scaling_factor"], raw_meta["shift_factor"]) == (1.0, 0.0)
    assert torch.allclose(scaled, (raw - 0.1159) * 0.3611, atol=1e-6)
    s1, m1 = load_latent(tmp_path / "s1.latent")
    s2, _ = load_latent(tmp_path / "s2.latent")
    assert torch.equal(s1, s2) and not torch.equal(s1, scaled)
    assert m1["sample_seed"] == input_seed(3, "small.png")


def test_sample_draws_different_noise_per_input(vae, kl_files, small_image, tmp_path):
    """Two copies of one image in a folder draw different, reproducible noise (seeded by relative path)."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for rel in ("a.png", "sub/b.png"):
        (tmp_path / "in" / rel).write_bytes(small_image.read_bytes())
    args = ["encode", tmp_path / "in", "-r", "--model", "flux1", "--weights", kl_files("flux1")["diffusers"],
            "--sample", "--seed", "3"]
    assert vae(*args, "-o", tmp_path / "o1").exit_code == 0
    assert vae(*args, "-o", tmp_path / "o2", "--batch-size", "1").exit_code == 0
    a, a_meta = load_latent(tmp_path / "o1" / "a.latent")
    b, b_meta = load_latent(tmp_path / "o1" / "sub" / "b.latent")
    assert not torch.equal(a, b)
    assert (a_meta["sample_seed"], b_meta["sample_seed"]) == (input_seed(3, "a.png"), input_seed(3, "sub/b.png"))
    assert torch.equal(a, load_latent(tmp_path / "o2" / "a.latent")[0])
    assert torch.equal(b, load_latent(tmp_path / "o2" / "sub" / "b.latent")[0])


@pytest.mark.parametrize("args, message", [
    (["--model", "sd15", "--latent-space", "normalized"],
     "Error: sd15 cannot write 'normalized' latents: expected one of scaled, raw"),
    (["--sample"], "Error: taef2 is deterministic: --sample needs a model with a posterior (KL, Wan)"),
    (["--seed", "1"], "Error: --seed only applies with --sample"),
])
def test_encode_option_errors(vae, kl_files, real_weights, small_image, tmp_path, args, message):
    weights = ["--weights", kl_files("sd15")["diffusers"]] if "sd15" in args else []
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", *args, *weights)
    assert result.exit_code == 2
    assert _only_error_line(result) == message
    assert not (tmp_path / "x.latent").exists()


def test_a_bad_batch_size_is_a_usage_error_before_any_input(vae, real_weights, small_image, tmp_path):
    """Refused like the other options: one line and exit 2, not 'done: ..., 2 not run (the run failed)'."""
    other = tmp_path / "other.png"
    other.write_bytes(small_image.read_bytes())
    result = vae("encode", small_image, other, "-o", tmp_path / "out", "--batch-size", "0", "--json")
    assert result.exit_code == 2
    assert result.stderr == "Error: --batch-size must be at least 1, got 0\n"
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"input": None, "output": None, "status": "error", "error": "--batch-size must be at least 1, got 0"}]


def test_kl_checkpoint_for_another_model(vae, kl_files, small_image, tmp_path):
    result = vae("encode", small_image, "--model", "flux1", "--weights", kl_files("sd15")["ldm"])
    assert result.exit_code == 1
    assert _only_error_line(result) == (
        f"Error: expected 16 latent channels for flux1, got 4 in {kl_files('sd15')['ldm']} (encoder.conv_out.weight "
        f"(8, 512, 3, 3), as in sd15, sd21, sdxl, sdxl-fp16-fix, svd)")


def test_kl_encode_past_the_budget_spills_layers_to_scratch_exactly(vae, kl_files, small_image, tmp_path):
    """sd15 with --max-memory 1 byte: the encoder runs layer by layer from scratch files in --scratch (gone on
    exit); the latent equals the untiled one to 1e-4 and the record says how much scratch space it took."""
    weights = kl_files("sd15")["diffusers"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = ["encode", small_image, "--model", "sd15", "--weights", weights, "--json"]
    whole = vae(*args, "-o", tmp_path / "whole.latent", "--tile", "off")
    assert whole.exit_code == 0, whole.stderr
    assert "scratch_bytes" not in json.loads(whole.stdout)
    result = vae(*args, "-o", tmp_path / "spilled.latent", "--max-memory", "1", "--scratch", scratch)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["scratch_bytes"] > 0 and list(scratch.iterdir()) == []
    a, b = load_latent(tmp_path / "whole.latent")[0], load_latent(tmp_path / "spilled.latent")[0]
    assert (a - b).abs().max().item() <= 1e-4


def test_encode_bf16_without_onednn_bf16_kernels(vae, real_weights, small_image, tmp_path, monkeypatch):
    """CPUs without oneDNN's bf16 kernels (AVX2 only) run bf16 through torch's own convolutions, not the fused calls
    (which raised there): the fp32 latent to bf16 precision."""
    from vaecli import fused

    monkeypatch.setattr(fused, "_bf16_kernels", lambda: False)
    assert vae("encode", small_image, "-o", tmp_path / "f.latent").exit_code == 0
    result = vae("encode", small_image, "-o", tmp_path / "b.latent", "--dtype", "bf16")
    assert result.exit_code == 0, result.stderr
    fp32, bf16 = load_latent(tmp_path / "f.latent")[0], load_latent(tmp_path / "b.latent")[0].float()
    assert (bf16 - fp32).abs().max().item() <= 0.05 * fp32.abs().max().item()


def test_an_encoder_that_overflows_writes_nothing(vae, shared_weights, small_image, tmp_path):
    """Finite weights can still overflow (fp16's range is small): NaN latents were written at exit 0, and then
    refused by `decode` (or, in a latent PNG, whose 8 bits clamp them, decoded to garbage)."""
    sd = torch.load(shared_weights / "taef2_encoder.pth", weights_only=True)
    torch.save({k: v.float() * 1e9 for k, v in sd.items()}, tmp_path / "loud.pth")
    for name, extra in (("a.latent", ()), ("a.latent.png", ()), ("c.latent", ("--format", "comfyui"))):
        result = vae("encode", small_image, "-o", tmp_path / name, "-w", tmp_path / "loud.pth", "--json", *extra)
        assert result.exit_code == 1
        (record,) = map(json.loads, result.stdout.splitlines())
        assert record["error"] == (f"{tmp_path / name}: expected finite latents to write, the model gave 1536 NaN/Inf "
                                   f"(an overflow: try another --dtype); nothing was written")
        assert not (tmp_path / name).exists()


def test_pillows_warnings_about_metadata_stay_off_stderr(real_weights, tmp_path):
    """A JPEG whose EXIF tag points past its end: Pillow skips the tag with a UserWarning, which Python printed as two
    lines on stderr (with -q too); the pixels read as they are."""
    import subprocess
    import sys

    src = make_image(tmp_path / "plain.png", size=(24, 16))
    ifd = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010F, 2, 100, 1000) + struct.pack("<I", 0)
    Image.open(src).save(tmp_path / "exif.jpg", exif=b"Exif\x00\x00" + ifd, quality=100)
    proc = subprocess.run([sys.executable, "-m", "vaecli", "encode", str(tmp_path / "exif.jpg"), "-o",
                           str(tmp_path / "exif.latent"), "-q"], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", "")
    assert (tmp_path / "exif.latent").is_file()


def test_an_animated_avif_is_refused(vae, real_weights, tmp_path):
    """Pillow reads AVIF (named on the command line, it is encoded): an animated one was encoded as its first frame."""
    frames = [Image.new("RGB", (32, 24), (60 * i, 90, 30)) for i in range(3)]
    frames[0].save(tmp_path / "anim.avif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "still.avif")
    result = vae("encode", tmp_path / "anim.avif", tmp_path / "still.avif", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    message = f"{tmp_path / 'anim.avif'}: expected a still image, got an animated AVIF of 3 frames"
    assert [line for line in result.stderr.splitlines() if line.startswith("Error:")] == [f"Error: {message}"]
    records = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert (records["anim.avif"]["error"], records["still.avif"]["status"]) == (message, "ok")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["still.latent"]


def test_a_fifo_named_as_an_image_or_clip_is_refused_not_waited_on(real_weights, tmp_path):
    """Whole processes with a time limit: encode, roundtrip and video read a FIFO nobody writes to in a thread that
    no signal reaches, so they waited for ever (Ctrl-C and SIGTERM too)."""
    import os
    import subprocess
    import sys

    for command, name, expected in (("encode", "pipe.png", "an image file"), ("roundtrip", "pipe.png", "an image file"),
                                     ("video", "pipe.mp4", "a video file")):
        fifo = tmp_path / name
        if not fifo.exists():
            os.mkfifo(fifo)
        run = subprocess.run([sys.executable, "-m", "vaecli", command, str(fifo), "-o", str(tmp_path / "out"),
                              "--json"], capture_output=True, text=True, timeout=60)
        message = f"{fifo}: not a regular file (a FIFO, socket or device), expected {expected}"
        assert (run.returncode, run.stderr.strip().splitlines()) == (1, [f"Error: {message}"]), command
        assert json.loads(run.stdout)["error"] == message
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"pipe.png", name})
