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
    assert bad == {"input": str(tmp_path / "missing.latent"), "status": "error",
                   "error": f"{tmp_path / 'missing.latent'}: no such file"}
    assert result.stderr.strip() == f"Error: {tmp_path / 'missing.latent'}: no such file"
