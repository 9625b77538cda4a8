"""`vae compare`: the contact sheet's layout, metrics identical to `vae roundtrip`'s, the worst region, errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vaecli import media, metrics, sheet
from vaecli.codec import Codec
from vaecli.registry import REGISTRY


@pytest.fixture
def photos(tmp_path, shared_images):
    """Two real crops: 256x192 (shown at full size) and 576x144 (downscaled to a 512x128 tile)."""
    with Image.open(shared_images / "chelsea.png") as img:
        img = img.convert("RGB")
        a, b = tmp_path / "a.png", tmp_path / "b.png"
        img.crop((100, 40, 356, 232)).save(a)
        img.crop((0, 100, 451, 213)).resize((576, 144), Image.Resampling.LANCZOS).save(b)
    return a, b


def cell_height(tile_height: int, crop_height: int) -> int:
    return max(tile_height, crop_height) + sheet.LABEL


def test_sheet_layout_and_metrics_equal_roundtrip(vae, real_weights, random_taesd, photos, tmp_path, one_thread):
    a, b = photos
    taesd = random_taesd / "diffusers"
    out = tmp_path / "sheet.png"
    result = vae("compare", a, b, "-m", "taef2", "-m", "taesd", "-w", f"taesd={taesd}", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in records] == [str(a), str(b)]
    assert all(list(r["models"]) == ["taef2", "taesd"] and r["output"] == str(out) for r in records)
    assert [r["size"] for r in records] == [[256, 192], [576, 144]]

    # One row per image; columns: the original, then per model its reconstruction, crop and heat map. Every cell is
    # as wide as the widest tile: a crop, two 64x64 windows zoomed 4x with a gap.
    crop_w = 2 * sheet.WINDOW * sheet.ZOOM + sheet.GAP
    columns, cell = 1 + 3 * 2, max(sheet.MIN_CELL, 256, 512, crop_w)
    heights = [cell_height(192, 64 * sheet.ZOOM), cell_height(128, 64 * sheet.ZOOM)]
    with Image.open(out) as img:
        assert img.size == (sheet.MARGIN + columns * (cell + sheet.MARGIN),
                            sheet.MARGIN + sum(h + sheet.MARGIN for h in heights))
        assert img.mode == "RGB"
    assert sheet.fit(576, 144) == (512, 128)

    # Each model's numbers are vae roundtrip's, and vaecli.metrics' on the reconstruction it writes.
    for record, src in zip(records, (a, b), strict=True):
        for model, extra in (("taef2", []), ("taesd", ["-w", taesd])):
            recon_path = tmp_path / f"{src.stem}.{model}.png"
            rt = vae("roundtrip", src, "-m", model, *extra, "-o", recon_path, "--json")
            assert rt.exit_code == 0, rt.stderr
            expected = json.loads(rt.stdout)
            got = record["models"][model]
            assert (got["psnr"], got["ssim"]) == (expected["psnr"], expected["ssim"])
            recon, _ = media.read_image(recon_path)
            original, _ = media.read_image(src)
            p, s = metrics.psnr_ssim(recon, original)
            assert (got["psnr"], got["ssim"]) == (round(p, 4), round(s, 5))
            region = sheet.worst_region(sheet.error_map(original, recon))
            assert got["worst"] == region.box()
            assert got["worst_error"] == round(region.error, 5)
    assert records[0]["models"]["taef2"]["psnr"] > 25  # real weights: a faithful reconstruction


def test_worst_region_is_where_the_defect_is(vae, real_weights, photos, tmp_path, monkeypatch, one_thread):
    a, _ = photos
    original, _ = media.read_image(a)
    decode = Codec.decode_latent

    def damaged(self, latent, meta):  # the 64x64 block at x=128, y=64 as wrong as it can be
        pixels = decode(self, latent, meta).clone()
        pixels[..., 64:128, 128:192] = 1 - original[..., 64:128, 128:192].round()
        return pixels

    monkeypatch.setattr(Codec, "decode_latent", damaged)
    out = tmp_path / "sheet.png"
    result = vae("compare", a, "-m", "taef2", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)["models"]["taef2"]
    assert got["worst"] == [128, 64, 64, 64]
    assert got["worst_error"] >= 0.5
    assert got["psnr"] < 20

    # The crop tile shows that block: its right half (the reconstruction) is the damage, zoomed 4x.
    with Image.open(out) as img:
        left = sheet.MARGIN + 2 * (max(sheet.MIN_CELL, 2 * sheet.WINDOW * sheet.ZOOM + sheet.GAP) + sheet.MARGIN)
        half = sheet.WINDOW * sheet.ZOOM
        shown = img.crop((left + half + sheet.GAP, sheet.MARGIN, left + 2 * half + sheet.GAP, sheet.MARGIN + half))
    expected = Image.fromarray(media.to_uint8(1 - original[..., 64:128, 128:192].round()))
    expected = expected.resize((half, half), Image.Resampling.NEAREST)
    assert shown.tobytes() == expected.tobytes()


def test_human_output_and_table(vae, real_weights, photos, tmp_path, one_thread):
    a, b = photos
    out = tmp_path / "sheet.jpg"
    result = vae("compare", a, b, "-m", "taef2", "-o", out)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["| model | mean PSNR (dB) | worst PSNR (dB) | mean SSIM | worst SSIM | lowest-PSNR image |",
                         "|---|---:|---:|---:|---:|---|"]
    assert len(lines) == 3 and lines[2].startswith("| taef2 | ")
    err = result.stderr.splitlines()
    assert err[0].startswith(f"{a}  taef2 ") and err[1].startswith(f"{b}  taef2 ")
    assert err[2].startswith(f"wrote {out}: ") and err[2].endswith(", 2 rows x 1 model")
    with Image.open(out) as img:
        assert img.format == "JPEG"

    quiet = vae("compare", a, "-m", "taef2", "-o", tmp_path / "q.png", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert quiet.stdout.splitlines()[0].startswith("| model | mean PSNR (dB) |")  # the data stays on stdout
    assert (tmp_path / "q.png").is_file()


def test_errors_are_one_line_and_leave_no_sheet(vae, real_weights, photos, tmp_path, random_taesd):
    a, b = photos
    out = tmp_path / "sheet.png"

    result = vae("compare", a, "-m", "taef2", "-m", "nope", "-o", out)
    assert result.exit_code == 2
    assert result.stderr == f"Error: unknown model 'nope': expected one of {', '.join(REGISTRY)}\n"

    result = vae("compare", a, "-m", "taef2")
    assert result.exit_code == 2
    assert result.stderr == "Error: missing -o/--output: the contact sheet to write, e.g. -o sheet.png\n"

    result = vae("compare", a, "-o", out)
    assert result.exit_code == 2
    assert result.stderr == "Error: missing -m/--model: name the models to compare, e.g. -m taef2 -m sd15\n"

    result = vae("compare", a, "-m", "taef2", "-m", "taesd", "-w", random_taesd / "diffusers", "-o", out)
    assert result.exit_code == 2
    assert result.stderr == (f"Error: -w {random_taesd / 'diffusers'}: with several models, say whose weights "
                             "these are: -w MODEL=PATH\n")

    result = vae("compare", a, "-m", "taef2", "-w", f"sd15={random_taesd}", "-o", out)
    assert result.exit_code == 2
    assert result.stderr == f"Error: -w sd15={random_taesd}: sd15 is not one of the compared models (taef2)\n"

    result = vae("compare", a, "-m", "taef2", "-o", tmp_path, "--json")  # found before any image, not after all
    message = f"-o {tmp_path}: is a folder, expected the contact sheet's file name (e.g. {tmp_path / 'sheet.png'})"
    assert (result.exit_code, result.stderr) == (2, f"Error: {message}\n")
    assert json.loads(result.stdout) == {"input": None, "output": None, "status": "error", "error": message}

    result = vae("compare", a, "-m", "taef2", "-o", tmp_path / "sheet.gif")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: cannot write images as '.gif': expected one of .png, ")

    result = vae("compare", a, "-m", "taef2", "-o", tmp_path / "sheet")  # it said "cannot write images as 'sheet'"
    assert result.exit_code == 2
    assert result.stderr == f"Error: {tmp_path / 'sheet'}: expected an image file name ending in one of " \
                            f"{', '.join(media.OUTPUT_FORMATS)}, got no extension\n"

    result = vae("compare", a, "-m", "taef2", "-m", "taesd", "-o", out)  # taesd's weights are nowhere
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: taesd_encoder.pth (taesd encoder) not found; looked in: ")
    assert len(result.stderr.splitlines()) == 1

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = vae("compare", a, broken, b, "-m", "taef2", "-o", out, "--json")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"Error: {broken}: not an image file Pillow can read"
    # no record describes a row of a sheet that was not written: every image has one, the image it stopped at its
    # error, the others (done or not reached) cancelled
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"input": str(a), "output": None, "status": "cancelled", "error": None},
        {"input": str(b), "output": None, "status": "cancelled", "error": None},
        {"input": str(broken), "output": None, "status": "error",
         "error": f"{broken}: not an image file Pillow can read"}]

    result = vae("compare", a, "-m", "taef2", "-o", a)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {a}: would overwrite an input\n"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == ["a.png", "b.png", "broken.png"]


def test_a_failed_sheet_or_an_interrupt_gives_every_image_a_record(real_weights, photos, tmp_path, monkeypatch,
                                                                   capsys, one_thread):
    """Only the image a failure stopped at had a --json record (and none at all for an interrupted run, or a sheet
    that could not be written): each image now has one, `cancelled` where it is on no sheet."""
    import sys

    from vaecli import cli

    a, b = photos
    blocker = tmp_path / "file"
    blocker.write_text("")
    cancelled = [{"input": str(p), "output": None, "status": "cancelled", "error": None} for p in (a, b)]

    monkeypatch.setattr(sys, "argv", ["vae", "compare", str(a), str(b), "-m", "taef2", "-o",
                                      str(blocker / "sheet.png"), "--json"])
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    out, err = capsys.readouterr()
    message = f"{blocker / 'sheet.png'}: cannot write: {blocker} is a file, not a folder"
    assert (exit_.value.code, err) == (1, f"Error: {message}\n")
    assert [json.loads(line) for line in out.splitlines()] == [
        *cancelled, {"input": None, "output": None, "status": "error", "error": message}]

    read = media.read_image

    def interrupted(path, *args):  # Ctrl-C (or SIGTERM) while the second image is read
        if path == b:
            raise KeyboardInterrupt
        return read(path, *args)

    monkeypatch.setattr(media, "read_image", interrupted)
    monkeypatch.setattr(sys, "argv", ["vae", "compare", str(a), str(b), "-m", "taef2", "-o",
                                      str(tmp_path / "sheet.png"), "--json"])
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    out, err = capsys.readouterr()
    assert (exit_.value.code, err) == (130, "Interrupted: no sheet was written\n")
    assert [json.loads(line) for line in out.splitlines()] == cancelled
    assert not (tmp_path / "sheet.png").exists()


def test_worst_region_grid_and_ties():
    err = torch.zeros(100, 150)
    assert sheet.worst_region(err) == sheet.Region(0, 0, 64, 64, 0.0)  # ties: the top-left window
    err[90:100, 140:150] = 1.0  # in the corner: found by the windows flush with the edges
    region = sheet.worst_region(err)
    assert (region.x, region.y, region.width, region.height) == (150 - 64, 100 - 64, 64, 64)
    assert region.error == pytest.approx(100 / 64**2)
    small = sheet.worst_region(torch.ones(20, 30))  # smaller than a window: the whole image
    assert small.box() == [0, 0, 30, 20] and small.error == 1.0


def test_heat_map_scale_and_fit():
    err = torch.tensor([[0.0, sheet.HEAT_MAX / 2, sheet.HEAT_MAX, 1.0]])
    heat = sheet.heat_image(err, (4, 1))
    colours = [heat.getpixel((i, 0)) for i in range(4)]
    assert colours[0] == (0, 0, 0) and colours[2] == colours[3] == tuple(sheet.HEAT_LUT[255])
    assert colours[1] == tuple(sheet.HEAT_LUT[128])
    assert sheet.fit(300, 200) == (300, 200)
    assert sheet.fit(2048, 1024) == (512, 256)
    assert sheet.fit(100, 4000) == (13, 512)


def test_sheet_keeps_the_worst_rows():
    board = sheet.ContactSheet(max_rows=2)
    base = torch.full((1, 3, 32, 48), 0.5)
    for i, psnr in enumerate([30.0, 20.0, 40.0, 25.0]):
        board.start(base, f"img{i}")
        board.add("m", base, psnr, 0.9)
    img = board.render()
    assert [row.index for row in board.rows] == [1, 3]  # the two lowest PSNRs, in input order
    cell = max(sheet.MIN_CELL, 48, 2 * 48 * sheet.ZOOM + sheet.GAP)  # a 48x32 window, as the image is smaller
    assert img.size == (sheet.MARGIN + 4 * (cell + sheet.MARGIN),
                        sheet.MARGIN + 2 * (cell_height(32, 32 * sheet.ZOOM) + sheet.MARGIN))


def test_kl_model_past_the_budget_compares_with_the_untiled_numbers(vae, kl_files, small_image, tmp_path,
                                                                     monkeypatch):
    """A KL model under a 1-byte --max-memory runs layer by layer from scratch files in --scratch (gone after): the
    sheet's figures are the untiled roundtrip's."""
    import tempfile

    made, real = [], tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: made.append(kw["dir"]) or real(**kw))
    weights = kl_files("sd15")["diffusers"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = vae("compare", small_image, "-m", "sd15", "-w", f"sd15={weights}", "-o", tmp_path / "sheet.png",
                 "--max-memory", "1", "--scratch", scratch, "--json")
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)["models"]["sd15"]
    rt = vae("roundtrip", small_image, "-m", "sd15", "-w", weights, "--tile", "off", "--json")
    assert rt.exit_code == 0, rt.stderr
    expected = json.loads(rt.stdout)
    assert abs(got["psnr"] - expected["psnr"]) <= 0.05 and list(scratch.iterdir()) == []
    assert made and {str(d) for d in made} == {str(scratch)}


def test_a_rerun_over_a_folder_holding_the_sheet(vae, real_weights, photos, tmp_path, one_thread):
    """The sheet written into the compared folder is left out on the next run (which failed 'would overwrite an
    input'); named outright, it is still refused."""
    a, _ = photos
    out = tmp_path / "sheet.png"
    assert vae("compare", tmp_path, "-m", "taef2", "-o", out, "-q").exit_code == 0
    result = vae("compare", tmp_path, "-m", "taef2", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == f"note: {out} left out of the inputs: it is the output"
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [str(a), str(tmp_path / "b.png")]
    result = vae("compare", out, "-m", "taef2", "-o", out)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {out}: would overwrite an input\n"


def test_nan_reconstruction_names_the_image_and_model(vae, real_weights, photos, tmp_path, nan_decoder, one_thread):
    """An overflow is reported with the image and model it came from, and no sheet is written."""
    a, _ = photos
    out = tmp_path / "sheet.png"
    result = vae("compare", a, "-m", "taef2", "-o", out)
    assert result.exit_code == 1
    assert result.stderr == (f"Error: {a} (taef2): expected finite pixels, the model gave 3 NaN/Inf (an overflow: "
                             f"try another --dtype)\n")
    assert not out.exists()
