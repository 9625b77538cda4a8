"""The Python API (`vaecli.load`, `Latent`, `load_latent`): the same numbers and files as the commands."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vaecli
from vaecli.errors import UsageError
from vaecli.latents import load_latent
from vaecli.media import read_image


def test_encode_decode_save_match_the_commands(vae, real_weights, small_image, tmp_path):
    model = vaecli.load("taef2", device="cpu")
    latent = model.encode(small_image)
    assert isinstance(latent, vaecli.Latent) and (latent.model, latent.space) == ("taef2", "raw")
    assert vae("encode", small_image, "-o", tmp_path / "cli.latent").exit_code == 0
    cli, cli_meta = load_latent(tmp_path / "cli.latent")
    assert torch.equal(latent.tensor, cli)
    assert latent.meta == cli_meta

    latent.save(tmp_path / "api.latent")
    assert (tmp_path / "api.latent").read_bytes() == (tmp_path / "cli.latent").read_bytes()
    again = vaecli.load_latent(tmp_path / "api.latent")
    pixels = model.decode(again)
    assert pixels.shape == (1, 3, 45, 61)
    assert vae("decode", tmp_path / "cli.latent", "-o", tmp_path / "cli.png").exit_code == 0
    assert torch.equal(read_image(tmp_path / "cli.png")[0], torch.round(pixels * 255) / 255)
    vaecli.to_image(pixels).save(tmp_path / "api.png")
    assert torch.equal(read_image(tmp_path / "api.png")[0], read_image(tmp_path / "cli.png")[0])


def test_encode_takes_tensors_and_pil_images(real_weights, small_image):
    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    pixels = read_image(small_image)[0]
    from_path = model.encode(small_image).tensor
    assert torch.equal(model.encode(pixels[0]).tensor, from_path)
    assert torch.equal(model.encode(Image.open(small_image)).tensor, from_path)


def test_video_streams_match_vae_video(vae, real_weights, gif, tmp_path):
    model = vaecli.load("taef2", device="cpu")
    chunks = list(model.encode_video(gif, chunk=3))
    assert [c.tensor.shape[0] for c in chunks][:2] == [3, 3]
    api = torch.cat([c.tensor for c in chunks])
    assert vae("video", gif, "-o", tmp_path / "g.latent").exit_code == 0
    cli, meta = load_latent(tmp_path / "g.latent")
    assert torch.equal(api, cli)
    frames = torch.cat(list(model.decode_video(vaecli.Latent(cli, meta), chunk=4)))
    assert frames.shape == (cli.shape[0], 3, 25, 14)


def test_errors_are_vaecli_errors(real_weights):
    with pytest.raises(UsageError, match="unknown model 'nope'"):
        vaecli.load("nope")
    with pytest.raises(UsageError, match="unknown dtype 'fp8'"):
        vaecli.load("taef2", dtype="fp8")


def test_readme_python_snippet_runs(real_weights, small_image, gif, tmp_path, monkeypatch, capsys):
    """The README's Python API example, run as written (photo.png and clip.mp4 are test files here)."""
    import re
    import shutil
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"## Python API\n.*?```python\n(.*?)```", readme, re.S).group(1)
    shutil.copy(small_image, tmp_path / "photo.png")
    shutil.copy(gif, tmp_path / "clip.mp4")  # read by content: a GIF under the README's name
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "photo.latent").exists() and (tmp_path / "photo.decoded.png").exists()
    assert "torch.Size([" in capsys.readouterr().out


def test_readme_diffusers_snippet_runs(vae, kl_files, small_image, tmp_path, monkeypatch):
    """The README's diffusers example, with a local random-weight sd15 folder for the hub id: diffusers decodes
    vaecli's latent to what `vae decode` gives."""
    import re
    from pathlib import Path

    files = kl_files("sd15")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"### With diffusers\n.*?```python\n(.*?)```", readme, re.S).group(1)
    snippet = snippet.replace('"stabilityai/sd-vae-ft-mse"', repr(str(files["diffusers"])))
    monkeypatch.chdir(tmp_path)
    result = vae("encode", small_image, "-o", "photo.latent", "-m", "sd15", "--weights", files["diffusers"])
    assert result.exit_code == 0, result.stderr
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    model = vaecli.load("sd15", weights=files["diffusers"], device="cpu")
    ours = model.decode(vaecli.load_latent("photo.latent"))
    assert (scope["pixels"][..., :45, :61] - ours).abs().max().item() <= 1e-4
