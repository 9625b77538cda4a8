"""`vae info`: latent metadata, human and JSON."""

from __future__ import annotations

import json


def test_info_image_and_video_latents(vae, real_weights, small_image, shared, tmp_path):
    assert vae("encode", small_image, "-o", tmp_path / "a.latent").exit_code == 0
    assert vae("encode", small_image, "-o", tmp_path / "a.latent.png").exit_code == 0
    gif = shared / "video" / "no_time_for_that_tiny.gif"
    assert vae("video", gif, "-o", tmp_path / "v.latent", "--frames", 3).exit_code == 0
    result = vae("info", tmp_path / "a.latent", tmp_path / "a.latent.png", tmp_path / "v.latent")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"{tmp_path / 'a.latent'}: taef2 latent [32, 6, 8] fp32, image, from 61x45 "
                        f"(padding [0, 0, 3, 3]), space raw, format vaecli-latent v1")
    assert lines[1].startswith(f"{tmp_path / 'a.latent.png'}: taef2 latent [32, 6, 8] fp32, image, from 61x45")
    assert lines[2].startswith(f"{tmp_path / 'v.latent'}: taef2 latent [3, 32, 4, 2] fp32, video, 3 frames "
                               f"@ 14.29 fps, from 14x25")


def test_info_json_and_errors(vae, real_weights, small_image, tmp_path):
    assert vae("encode", small_image, "-o", tmp_path / "a.latent").exit_code == 0
    result = vae("info", tmp_path / "a.latent", tmp_path / "missing.latent", "--json")
    assert result.exit_code == 1
    good, bad = map(json.loads, result.stdout.splitlines())
    assert good["model"] == "taef2" and good["shape"] == [32, 6, 8] and good["image_size"] == [61, 45]
    assert good["version"] == 1 and good["status"] == "ok"
    assert bad == {"input": str(tmp_path / "missing.latent"), "output": None, "status": "error",
                   "error": f"{tmp_path / 'missing.latent'}: no such file"}
    missing = f"{tmp_path / 'missing.latent'}: no such file"
    assert result.stderr.splitlines() == [f"Error: {missing}", "1 of 2 inputs failed:", f"  {missing}"]


def test_info_refuses_a_fifo_rather_than_waiting_on_it(tmp_path):
    """A whole process with a time limit: opening a FIFO nobody writes to would block for ever."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "pipe.latent"
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, "-m", "vaecli", "info", str(fifo)], capture_output=True, text=True,
                         timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (
        1, "", f"Error: {fifo}: not a regular file (a FIFO, socket or device), expected a latent file\n")


def _encoded(vae, small_image, tmp_path, name: str = "a.latent", **extra):
    """`small_image` encoded to `name`, its metadata amended with `extra`; the path and its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path, encoded = tmp_path / name, tmp_path / "encoded.latent"
    if not encoded.exists():
        assert vae("encode", small_image, "-o", encoded).exit_code == 0
    with safe_open(encoded, "pt") as f:
        meta = f.metadata()
    save_file(load_file(encoded), path, metadata={**meta, **extra})
    return path, meta


def test_info_goes_on_past_any_failure_and_writes_strict_json(vae, real_weights, small_image, tmp_path):
    from safetensors.torch import load_file, save_file

    good, meta = _encoded(vae, small_image, tmp_path)
    odd, _ = _encoded(vae, small_image, tmp_path, "odd.latent", note="Infinity", source_fps="NaN")
    result = vae("info", odd, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)  # strict: json.loads accepts NaN, so check the text too
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout.replace('"Infinity"', "")
    assert record["status"] == "ok"

    video_without_fps = tmp_path / "v.latent"
    tensors = load_file(good)
    save_file({"latent": tensors["latent"][None]}, video_without_fps,
              metadata={**meta, "kind": "video", "shape": "[1, 32, 6, 8]"})
    result = vae("info", video_without_fps, good)
    lines = result.stdout.splitlines()
    assert lines[-1].startswith(f"{good}: taef2 latent [32, 6, 8] fp32, image")
    assert len(lines) + len(result.stderr.splitlines()) == 2


def test_info_refuses_a_model_name_no_line_could_show(vae, real_weights, small_image, tmp_path):
    """A megabyte-long model name is no model's: refused like any bad field, in a short line (info printed it whole,
    decode quoted it whole in its error)."""
    odd, _ = _encoded(vae, small_image, tmp_path, "odd.latent", model="x" * 10 ** 6)
    result = vae("info", odd, "--json")
    message = f"{odd}: metadata 'model' must be a model name of at most 100 characters, got {'x' * 40!r}"
    assert (result.exit_code, result.stderr) == (1, f"Error: {message}\n")
    assert json.loads(result.stdout)["error"] == message


def test_info_on_a_comfyui_latent_that_records_no_model(vae, tmp_path):
    """ComfyUI's SaveLatent records no model: info shows what the file holds and says how to decode it (as `vae
    decode` asks: --model), where it used to fail with an error naming an option info does not have."""
    import torch
    from safetensors.torch import save_file

    comfy = tmp_path / "c.latent"
    save_file({"latent_tensor": torch.zeros(2, 16, 6, 8, dtype=torch.float16),
               "latent_format_version_0": torch.tensor([])}, str(comfy))
    result = vae("info", comfy)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == (f"{comfy}: ComfyUI latent [16, 6, 8] float16, image, batch of 2, no model "
                                     f"recorded (decode with --model NAME)")
    result = vae("info", comfy, "--json")
    assert json.loads(result.stdout) == {"input": str(comfy), "output": None, "status": "ok", "error": None,
                                         "format": "comfyui", "model": None,
                                         "kind": "image", "batch": 2, "dtype": "float16", "shape": [16, 6, 8]}
    result = vae("decode", comfy)
    assert result.exit_code == 1 and "pass --model" in result.stderr


def test_info_takes_folders_globs_and_stdin(vae, real_weights, small_image, tmp_path):
    """Like decode, info takes a folder (its latent files; -r walks it), a glob, or `-` (a list on stdin)."""
    folder = tmp_path / "latents"
    assert vae("encode", small_image, "-o", folder / "a.latent").exit_code == 0
    assert vae("encode", small_image, "-o", folder / "sub" / "b.latent.png").exit_code == 0
    (folder / "notes.txt").write_text("not a latent\n")

    result = vae("info", folder)
    assert result.exit_code == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [str(folder / "a.latent")]
    result = vae("info", folder, "-r", "--json")
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == [
        str(folder / "a.latent"), str(folder / "sub" / "b.latent.png")]
    result = vae("info", str(folder / "sub" / "*.png"))
    assert result.stdout.startswith(f"{folder / 'sub' / 'b.latent.png'}: taef2 latent [32, 6, 8]")
    result = vae("info", "-", input=f"{folder / 'a.latent'}\n")
    assert result.stdout.startswith(f"{folder / 'a.latent'}: taef2 latent [32, 6, 8]")

    empty = tmp_path / "empty"
    empty.mkdir()
    result = vae("info", empty, "--json")
    assert result.exit_code == 2
    message = f"no .latent/.safetensors/.latent.png files in folder {empty} (use -r to look in subfolders)"
    assert result.stderr == f"Error: {message}\n"
    assert json.loads(result.stdout) == {"input": None, "output": None, "status": "error", "error": message}
    result = vae("info", "-", input="")
    assert (result.exit_code, result.stderr) == (2, "Error: no inputs (stdin was empty)\n")


def test_info_shows_the_sample_seed(vae, real_weights, small_image, tmp_path):
    """A --sample latent's seed was in its --json record only, not in the line."""
    sampled, _ = _encoded(vae, small_image, tmp_path, "s.latent", sample_seed="12345")
    result = vae("info", sampled)
    assert (result.exit_code, result.stdout) == (
        0, f"{sampled}: taef2 latent [32, 6, 8] fp32, image, from 61x45 (padding [0, 0, 3, 3]), space raw, sampled "
           f"with seed 12345, format vaecli-latent v1\n")
    assert json.loads(vae("info", sampled, "--json").stdout)["sample_seed"] == 12345


def test_info_records_cannot_be_rewritten_by_a_files_metadata(vae, real_weights, small_image, tmp_path):
    """A metadata key named input, output, status or error does not replace the command's own fields."""
    spoof, _ = _encoded(vae, small_image, tmp_path, "spoof.latent", input="/etc/passwd", output="x", status="error",
                        error="spoofed")
    result = vae("info", spoof, "--json")
    assert result.exit_code == 0
    record = json.loads(result.stdout)
    assert (record["input"], record["output"], record["status"], record["error"]) == (str(spoof), None, "ok", None)
    assert list(record)[:4] == ["input", "output", "status", "error"]


def test_info_refuses_latent_pngs_that_decode_would(vae, real_weights, small_image, tmp_path):
    """`info` read only a latent PNG's text chunk: ok at exit 0 for files `decode` refuses from their header."""
    from PIL import Image, PngImagePlugin

    src = tmp_path / "a.latent.png"
    assert vae("encode", small_image, "-o", src, "-q").exit_code == 0
    with Image.open(src) as img:
        text, rgba = img.info["vaecli"], img.copy()
    info = PngImagePlugin.PngInfo()
    info.add_text("vaecli", text)
    rgba.convert("RGB").save(tmp_path / "rgb.latent.png", pnginfo=info)
    rgba.crop((0, 0, rgba.width - 1, rgba.height)).save(tmp_path / "narrow.latent.png", pnginfo=info)
    result = vae("info", tmp_path / "rgb.latent.png", tmp_path / "narrow.latent.png")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: {tmp_path / 'rgb.latent.png'}: expected an RGBA latent PNG, got mode RGB",
        f"Error: {tmp_path / 'narrow.latent.png'}: mosaic is {rgba.width - 1}x{rgba.height}, expected "
        f"{rgba.width}x{rgba.height} for a 32x6x8 latent",
        "2 of 2 inputs failed:",
        f"  {tmp_path / 'rgb.latent.png'}: expected an RGBA latent PNG, got mode RGB",
        f"  {tmp_path / 'narrow.latent.png'}: mosaic is {rgba.width - 1}x{rgba.height}, expected "
        f"{rgba.width}x{rgba.height} for a 32x6x8 latent"]


def test_info_shows_missing_optional_metadata_as_unknown(vae, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"latent": torch.zeros(32, 6, 8)}, str(tmp_path / "a.latent"), {"format": "vaecli-latent"})
    result = vae("info", tmp_path / "a.latent")
    assert (result.exit_code, result.stdout) == (
        0, f"{tmp_path / 'a.latent'}: ? latent [32, 6, 8] ?, image, from ?x?, space ?, format vaecli-latent v?\n")


def test_info_shows_control_characters_in_metadata_escaped(vae, tmp_path):
    """A file's model or dtype may hold ESC sequences (which a terminal acts on: clear the screen, set its title) or
    line breaks other than \\n; `info` shows them escaped, JSON keeps them."""
    import torch
    from safetensors.torch import save_file

    meta = {"format": "vaecli-latent", "model": "\x1b]0;owned\x07\x1b[2Jsd99", "dtype": "fp32\u2028\x85rm"}
    save_file({"latent": torch.zeros(32, 6, 8)}, str(tmp_path / "a.latent"), meta)
    result = vae("info", tmp_path / "a.latent")
    assert (result.exit_code, result.stdout) == (
        0, f"{tmp_path / 'a.latent'}: \\x1b]0;owned\\x07\\x1b[2Jsd99 latent [32, 6, 8] fp32\\u2028\\x85rm, image, "
           f"from ?x?, space ?, format vaecli-latent v?\n")
    record = json.loads(vae("info", tmp_path / "a.latent", "--json").stdout)
    assert (record["model"], record["dtype"]) == (meta["model"], meta["dtype"])
