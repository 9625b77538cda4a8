"""`vae roundtrip`: quality on the real TAEF2 weights, sizes and modes of the shared photos, PNG latents."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import make_image


def test_astronaut_psnr(vae, real_weights, shared_images, tmp_path):
    out = tmp_path / "recon.png"
    result = vae("roundtrip", shared_images / "astronaut.png", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["output"] == str(out)
    assert record["psnr"] >= 30.5  # reference implementation: 31.19 dB
    assert record["ssim"] > 0.9
    assert result.stderr.strip() == (f"{shared_images / 'astronaut.png'} -> {out}  PSNR {record['psnr']:.2f} dB  "
                                     f"SSIM {record['ssim']:.4f}")
    with Image.open(out) as img:
        assert img.size == (512, 512)

    via_png = vae("roundtrip", shared_images / "astronaut.png", "--via", "png", "--json")
    assert via_png.exit_code == 0, via_png.stderr
    png_psnr = json.loads(via_png.stdout)["psnr"]
    assert record["psnr"] - png_psnr <= 0.2
    assert png_psnr >= 30.3


@pytest.mark.parametrize("name, size", [("chelsea.png", (451, 300)), ("logo.png", (500, 500)),
                                        ("brick.png", (512, 512))])
def test_shared_photos_keep_their_size(vae, real_weights, shared_images, tmp_path, name, size):
    out = tmp_path / "recon.png"
    result = vae("roundtrip", shared_images / name, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["psnr"] > 20
    with Image.open(out) as img:
        assert img.size == size


def test_roundtrip_without_output_only_reports(vae, real_weights, small_image):
    result = vae("roundtrip", small_image, "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["output"] is None
    assert set(record) == {"input", "output", "status", "error", "model", "psnr", "ssim"}
    assert sorted(p.name for p in small_image.parent.iterdir()) == ["small.png"]


def test_roundtrip_encoder_only_model(vae, real_weights, small_image):
    result = vae("roundtrip", small_image, "--model", "taesana")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: taesana has no decoder (encoder only: no decoder weights are "
                                     "published)")


def test_roundtrip_several_into_folder(vae, real_weights, small_image, tmp_path):
    other = tmp_path / "other.jpg"
    Image.open(small_image).save(other, quality=90)
    outdir = tmp_path / "recon"
    result = vae("roundtrip", small_image, other, "-o", outdir)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in outdir.iterdir()) == ["other.png", "small.png"]


def test_diff_writes_the_error_heat_map(vae, real_weights, small_image, tmp_path):
    from PIL import Image

    from vaecli import sheet
    from vaecli.media import read_image

    recon, heat = tmp_path / "r.png", tmp_path / "d.png"
    result = vae("roundtrip", small_image, "-o", recon, "--diff", heat)
    assert result.exit_code == 0, result.stderr
    expected = sheet.heat_image(sheet.error_map(read_image(small_image)[0], read_image(recon)[0]), (61, 45))
    with Image.open(heat) as img:
        assert img.size == (61, 45)
        assert img.tobytes() == expected.tobytes()
    other = tmp_path / "other.png"  # the same file named twice is one input
    other.write_bytes(small_image.read_bytes())
    result = vae("roundtrip", small_image, other, "--diff", tmp_path / "e.png")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: --diff {tmp_path / 'e.png'}: needs exactly one input image, got 2"
    result = vae("roundtrip", small_image, "--diff", small_image)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: --diff {small_image}: would overwrite the input"


def test_kl_roundtrip_past_the_budget_reports_scratch(vae, kl_files, small_image, tmp_path):
    """sd15 under a 1-byte budget: encode and decode both spill whole layers; the metrics are the untiled run's."""
    args = ["roundtrip", small_image, "--model", "sd15", "--weights", kl_files("sd15")["diffusers"], "--json"]
    whole = vae(*args, "--tile", "off")
    spilled = vae(*args, "--max-memory", "1", "--scratch", tmp_path)
    assert whole.exit_code == 0 and spilled.exit_code == 0, spilled.stderr
    a, b = json.loads(whole.stdout), json.loads(spilled.stdout)
    assert b["scratch_bytes"] > 0 and "scratch_bytes" not in a
    assert abs(a["psnr"] - b["psnr"]) <= 0.05 and abs(a["ssim"] - b["ssim"]) <= 1e-3


def test_diff_and_output_must_differ_and_fail_together(vae, real_weights, small_image, tmp_path, monkeypatch):
    recon = tmp_path / "r.png"
    result = vae("roundtrip", small_image, "-o", recon, "--diff", recon)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: --diff {recon}: is also the reconstruction's -o; give them different paths"
    assert not recon.exists()

    from vaecli import media

    def broken(path, pixels):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(media, "write_image", broken)
    heat = tmp_path / "d.png"
    result = vae("roundtrip", small_image, "-o", recon, "--diff", heat)
    assert result.exit_code == 1
    assert not heat.exists() and not recon.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [small_image.name]


def test_diff_is_written_when_only_the_reconstruction_exists(vae, real_weights, small_image, tmp_path):
    """An input whose reconstruction existed was skipped, and the --diff asked for was never written (exit 0)."""
    recon, heat = tmp_path / "r.png", tmp_path / "d.png"
    assert vae("roundtrip", small_image, "-o", recon, "-q").exit_code == 0
    result = vae("roundtrip", small_image, "-o", recon, "--diff", heat, "--skip-existing", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ok" and heat.is_file()
    result = vae("roundtrip", small_image, "-o", recon, "--diff", heat, "--skip-existing", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"input": str(small_image), "output": str(recon), "status": "skipped",
                                         "error": None}


@pytest.mark.parametrize("option", [["--suffix", "_x"], ["--name", "{stem}.jpg"], ["--overwrite"],
                                    ["--skip-existing"]])
def test_output_options_without_output_are_refused(vae, small_image, option):
    """Without -o nothing is written: an option about the written files would be silently ignored."""
    result = vae("roundtrip", small_image, *option)
    assert result.exit_code == 2
    assert result.stderr == (f"Error: {option[0]} only applies with -o: without it roundtrip writes no "
                             f"reconstructions, it only reports the metrics\n")


def test_a_bad_batch_size_is_a_usage_error_before_any_input(vae, small_image):
    """It was found only once the batch ran: a 'cancelled' record, then the error."""
    result = vae("roundtrip", small_image, "--batch-size", "-3", "--json")
    assert (result.exit_code, result.stderr) == (2, "Error: --batch-size must be at least 1, got -3\n")
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"input": None, "output": None, "status": "error", "error": "--batch-size must be at least 1, got -3"}]


def test_nan_reconstruction_fails_without_output(vae, real_weights, small_image, nan_decoder):
    """Only the image writer checked for NaN: without -o an overflow was reported "ok" with PSNR null."""
    result = vae("roundtrip", small_image, "--json")
    assert result.exit_code == 1
    message = "expected finite pixels, the model gave 3 NaN/Inf (an overflow: try another --dtype)"
    assert result.stderr == f"Error: {small_image}: {message}\n"
    assert json.loads(result.stdout) == {"input": str(small_image), "output": None, "status": "error",
                                         "error": message}


def test_an_overflow_fails_its_own_input_not_its_batch_mates(vae, real_weights, small_image, tmp_path, monkeypatch):
    """Same-sized images are computed as one group: one image's NaN reconstruction failed every image of its group,
    each named with that image's error, and none of them was written."""
    from vaecli.codec import Codec

    decode = Codec.decode_latent

    def overflowing_when_dark(self, latent, meta):
        pixels = decode(self, latent, meta)
        if pixels.mean() < 0.1:
            pixels[..., 0, 0] = float("nan")
        return pixels

    monkeypatch.setattr(Codec, "decode_latent", overflowing_when_dark)
    work = tmp_path / "w"
    work.mkdir()
    for name in ("a.png", "c.png"):
        (work / name).write_bytes(small_image.read_bytes())
    Image.new("RGB", Image.open(small_image).size).save(work / "b.png")  # black: its reconstruction overflows
    message = "expected finite pixels, the model gave 3 NaN/Inf (an overflow: try another --dtype)"
    for extra in ([], ["--fail-fast"]):
        out = tmp_path / f"out{len(extra)}"
        result = vae("roundtrip", work, "-o", out, "--json", "-q", *extra)
        assert result.exit_code == 1
        records = {r["input"]: r for r in map(json.loads, result.stdout.splitlines())}
        assert records[str(work / "b.png")]["error"] == message
        statuses = [records[str(work / name)]["status"] for name in ("a.png", "b.png", "c.png")]
        assert statuses == (["ok", "error", "ok"] if not extra else ["ok", "error", "cancelled"])
        assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"][:2 - len(extra)]
        assert result.stderr.splitlines()[0] == f"Error: {work / 'b.png'}: {message}"


def test_a_rerun_with_the_output_file_inside_the_walked_folder(vae, real_weights, small_image):
    """A walked folder's earlier reconstruction is left out of the inputs, and the note calls it the output
    (it said 'in the output folder small_rt.png', a file)."""
    out = small_image.parent / "small_rt.png"
    assert vae("roundtrip", small_image.parent, "-o", out).exit_code == 0
    result = vae("roundtrip", small_image.parent, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == f"note: {out} left out of the inputs: it is the output"
    assert json.loads(result.stdout)["input"] == str(small_image)


def test_an_output_past_the_formats_size_limit_is_one_error_line(vae, real_weights, tmp_path):
    """WebP holds at most 16383 pixels a side: libwebp's bare ValueError was an 'unexpected' error."""
    src = make_image(tmp_path / "wide.png", size=(16400, 8))
    out, diff = tmp_path / "wide.webp", tmp_path / "diff.png"
    result = vae("roundtrip", src, "-o", out, "--diff", diff, "--json")
    assert result.exit_code == 1
    message = f"{out}: cannot write: expected at most 16383 pixels a side for WebP, got 16400x8 (write .png or .tif)"
    assert json.loads(result.stdout) == {"input": str(src), "output": None, "status": "error", "error": message}
    assert result.stderr.splitlines()[0] == f"Error: {src}: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.png"]
