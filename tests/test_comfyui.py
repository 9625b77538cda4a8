"""ComfyUI `.latent` files, both ways: built by hand from ComfyUI's documented keys, read by `vae decode`; written by
`vae encode/video --format comfyui` and read back the way ComfyUI's LoadLatent does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vaecli import latents
from vaecli.media import read_image
from vaecli.registry import REGISTRY

from .test_video import tiny_wan  # noqa: F401  (fixture)

KEY, MARKER = "latent_tensor", "latent_format_version_0"


def comfy_load(path) -> torch.Tensor:
    """ComfyUI's LoadLatent (nodes.py), line for line: the samples a workflow would get from the file."""
    latent = load_file(str(path), device="cpu")
    multiplier = 1.0
    if MARKER not in latent:
        multiplier = 1.0 / 0.18215
    return latent[KEY].float() * multiplier


def save_comfy(path, tensor, marked=True, metadata=None):
    """A file as ComfyUI's SaveLatent writes it: the tensor, the empty version marker, workflow JSON in the header."""
    tensors = {KEY: tensor.contiguous()}
    if marked:
        tensors[MARKER] = torch.tensor([])
    save_file(tensors, str(path), metadata=metadata or {"prompt": json.dumps({"3": {"class_type": "KSampler"}})})
    return path


def save_vaecli_raw(path, latent):
    """The same raw taef2 latent as vaecli writes it, nothing padded."""
    c, h, w = latent.shape
    meta = latents.make_metadata(REGISTRY["taef2"], (w * 8, h * 8), (0, 0, 0, 0), "fp32", space="raw")
    latents.save_safetensors(path, latent, meta)
    return path


def error_line(result) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("Error:"))


@pytest.fixture
def raw_latent(vae, real_weights, small_image, tmp_path):
    """A real taef2 latent of the small image, (32, 6, 8), in taef2's raw space."""
    result = vae("encode", small_image, "-o", tmp_path / "ref.latent")
    assert result.exit_code == 0, result.stderr
    latent, meta = latents.load_latent(tmp_path / "ref.latent")
    assert meta["space"] == "raw"
    return latent


def test_marked_file_decodes_as_raw_latents_of_the_model(vae, raw_latent, tmp_path):
    comfy = save_comfy(tmp_path / "c.latent", raw_latent[None])
    ref = save_vaecli_raw(tmp_path / "v.latent", raw_latent)
    result = vae("decode", comfy, "--model", "taef2", "-o", tmp_path / "c.png")
    assert result.exit_code == 0, result.stderr
    assert vae("decode", ref, "-o", tmp_path / "v.png").exit_code == 0
    a, b = read_image(tmp_path / "c.png")[0], read_image(tmp_path / "v.png")[0]
    assert a.shape == (1, 3, 48, 64)
    assert torch.equal(a, b)
    latent, meta = latents.load_latent(comfy, "taef2")
    assert torch.equal(latent, raw_latent)
    assert (meta["model"], meta["space"], meta["image_size"], meta["padding"]) == ("taef2", "raw", [64, 48],
                                                                                    [0, 0, 0, 0])


def test_legacy_unmarked_file_is_divided_by_0_18215_as_comfyui_does(vae, raw_latent, tmp_path):
    stored = raw_latent * 0.18215
    comfy = save_comfy(tmp_path / "old.latent", stored[None], marked=False)
    latent, _ = latents.load_latent(comfy, "taef2")
    assert torch.equal(latent, comfy_load(comfy)[0])
    assert torch.equal(latent, stored.float() * (1.0 / 0.18215))
    assert (latent - raw_latent).abs().max().item() < 1e-5
    result = vae("decode", comfy, "--model", "taef2", "-o", tmp_path / "old.png")
    assert result.exit_code == 0, result.stderr
    ref = save_vaecli_raw(tmp_path / "v.latent", raw_latent)
    assert vae("decode", ref, "-o", tmp_path / "v.png").exit_code == 0
    diff = (read_image(tmp_path / "old.png")[0] - read_image(tmp_path / "v.png")[0]).abs().max().item()
    assert diff <= 1 / 255


def test_batch_gives_one_output_per_item(vae, raw_latent, tmp_path):
    batch = torch.stack([raw_latent, raw_latent.flip(-1), raw_latent * 0.5])
    comfy = save_comfy(tmp_path / "b.latent", batch)
    result = vae("decode", comfy, "--model", "taef2", "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["output"] for r in records] == [str(tmp_path / f"b_{i}.png") for i in range(3)]
    assert [(r["input"], r["item"]) for r in records] == [(str(comfy), i) for i in range(3)]  # which item each is
    single = save_comfy(tmp_path / "single.latent", batch[:1])
    result = vae("decode", single, "--model", "taef2", "--json")
    assert result.exit_code == 0, result.stderr
    assert "item" not in json.loads(result.stdout)  # a file of one item: its record is the file's
    save_vaecli_raw(tmp_path / "one.latent", batch[1])
    assert vae("decode", tmp_path / "one.latent").exit_code == 0
    assert torch.equal(read_image(tmp_path / "b_1.png")[0], read_image(tmp_path / "one.png")[0])
    result = vae("decode", comfy, "--model", "taef2", "-o", tmp_path / "out" / "x.png", "-q")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_0.png", "x_1.png", "x_2.png"]


def test_batch_items_may_not_collide_with_other_inputs_outputs(vae, raw_latent, tmp_path):
    """Item 1 of b.latent writes b_1.png, as does an input named b_1.latent: refused before anything is written, as
    two plain inputs writing one output are."""
    work = tmp_path / "w"
    work.mkdir()
    comfy = save_comfy(work / "b.latent", torch.stack([raw_latent, raw_latent.flip(-1)]))
    other = save_comfy(work / "b_1.latent", raw_latent[None])
    result = vae("decode", comfy, other, "--model", "taef2", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"] == (f"inputs {comfy} (item 1) and {other} (item 0) would both write "
                                                  f"{work / 'b_1.png'}")
    assert sorted(p.name for p in work.iterdir()) == ["b.latent", "b_1.latent"]
    png_latent = work / "b_0.latent.png"  # decodes to b_0.png, as item 0 of b.latent does
    latents.save_png(png_latent, raw_latent, latents.load_latent(save_vaecli_raw(tmp_path / "v.latent", raw_latent))[1])
    result = vae("decode", comfy, png_latent, "--model", "taef2", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"Error: inputs {comfy} (item 0) and {png_latent} would both write "
                                          f"{tmp_path / 'out' / 'b_0.png'}"]
    assert not (tmp_path / "out").exists()


def test_missing_model_is_one_clear_error(vae, raw_latent, tmp_path):
    comfy = save_comfy(tmp_path / "c.latent", raw_latent[None])
    result = vae("decode", comfy)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {comfy}: a ComfyUI latent records no model: pass --model"
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("shape, message", [
    ((1, 16, 6, 8), "expected 32 latent channels for taef2, got 16"),
    ((32, 6, 8), "expected a ComfyUI latent_tensor of shape (B, C, h, w) or (B, C, T, h, w), got [32, 6, 8]"),
    ((1, 32, 0, 8), "expected a ComfyUI latent_tensor of shape (B, C, h, w) or (B, C, T, h, w), got [1, 32, 0, 8]"),
    ((1, 1, 1, 1, 1, 1), "expected a ComfyUI latent_tensor of shape (B, C, h, w) or (B, C, T, h, w), "
                         "got [1, 1, 1, 1, 1, 1]"),
])
def test_bad_shapes_are_refused(vae, real_weights, tmp_path, shape, message):
    comfy = save_comfy(tmp_path / "c.latent", torch.zeros(shape))
    result = vae("decode", comfy, "--model", "taef2", "-o", tmp_path / "c.png")
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {comfy}: {message}"


@pytest.mark.parametrize("shape, offsets, message", [
    ([1, 32, 60, 80], None, "latent_tensor data does not match its shape [1, 32, 60, 80]"),
    ([4096, 32, 600, 800], [0, 4096 * 32 * 600 * 800 * 4], "truncated ComfyUI latent (file shorter than its "
                                                            "latent_tensor)"),
    # each item is a job and an output: a claimed billion (in a sparse file, or checked items) is refused up front
    ([10 ** 9, 32, 6, 8], [0, 10 ** 9 * 32 * 6 * 8 * 4], "expected a ComfyUI batch of at most 4096 latents, got "
                                                         "1000000000"),
])
def test_header_that_lies_about_its_data_is_refused(vae, real_weights, tmp_path, shape, offsets, message):
    """A header claiming more data than the file holds is one error, not a billion outputs planned."""
    path = save_comfy(tmp_path / "c.latent", torch.zeros(1, 32, 6, 8))
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header[KEY]["shape"] = shape
    if offsets:
        header[KEY]["data_offsets"] = offsets
        header[MARKER]["data_offsets"] = [offsets[1], offsets[1]]
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + n:])
    with pytest.raises(latents.LatentFormatError) as err:
        latents.load_latent(path, "taef2")
    assert str(err.value) == f"{path}: {message}"
    result = vae("decode", path, "--model", "taef2", "-o", tmp_path / "out.png", "--json")
    assert result.exit_code == 1
    assert len(result.stdout.splitlines()) == 1
    assert error_line(result) == f"Error: {path}: {message}"


def test_a_clip_whose_vaecli_metadata_says_image_is_refused(vae, raw_latent, tmp_path):
    """vaecli's metadata in the header says an image, the tensor holds 3 latent frames: reading it as an image gave
    frame 0 and dropped the others unsaid (info showed a (C, h, w) latent)."""
    meta = latents.make_metadata(REGISTRY["taef2"], (64, 48), (0, 0, 0, 0), "fp32", space="raw")
    clip = torch.stack([raw_latent] * 3, 1)[None]  # (1, 32, 3, 6, 8)
    path = save_comfy(tmp_path / "c.latent", clip, metadata={k: v if isinstance(v, str) else json.dumps(v)
                                                              for k, v in meta.items()})
    message = f"{path}: metadata says an image latent, latent_tensor has 3 latent frames (shape [1, 32, 3, 6, 8])"
    for args in (("decode", path, "-o", tmp_path / "c.png"), ("info", path)):
        result = vae(*args)
        assert (result.exit_code, result.stdout, error_line(result)) == (1, "", f"Error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.latent", "ref.latent", "small.png"]


def test_encode_format_comfyui_is_what_loadlatent_reads(vae, random_taesd, small_image, tmp_path):
    """taesd writes scaled latents by default: the ComfyUI file holds the raw ones, as --latent-space raw does."""
    weights = ["--model", "taesd", "--weights", random_taesd / "original"]
    result = vae("encode", small_image, *weights, "--format", "comfyui", "-o", tmp_path / "c.latent")
    assert result.exit_code == 0, result.stderr
    assert vae("encode", small_image, *weights, "--latent-space", "raw", "-o", tmp_path / "r.latent").exit_code == 0
    with safe_open(str(tmp_path / "c.latent"), framework="pt") as f:
        assert sorted(f.keys()) == [MARKER, KEY]
        assert f.get_tensor(MARKER).shape == (0,)
        meta = f.metadata()
    raw, raw_meta = latents.load_latent(tmp_path / "r.latent")
    samples = comfy_load(tmp_path / "c.latent")
    assert samples.shape == (1, 4, 6, 8)
    assert torch.equal(samples[0], raw)
    assert (meta["format"], meta["model"], meta["space"]) == ("vaecli-latent", "taesd", "raw")
    assert json.loads(meta["image_size"]) == [61, 45]
    result = vae("decode", tmp_path / "c.latent", "--weights", random_taesd / "original", "-o", tmp_path / "c.png")
    assert result.exit_code == 0, result.stderr
    assert vae("decode", tmp_path / "r.latent", "--weights", random_taesd / "original",
               "-o", tmp_path / "r.png").exit_code == 0
    a, b = read_image(tmp_path / "c.png")[0], read_image(tmp_path / "r.png")[0]
    assert a.shape == (1, 3, 45, 61)
    assert torch.equal(a, b)


def test_encode_format_comfyui_is_deterministic_and_taef2_raw(vae, real_weights, small_image, tmp_path):
    for name in ("a", "b"):
        assert vae("encode", small_image, "--format", "comfyui", "-o", tmp_path / f"{name}.latent").exit_code == 0
    assert (tmp_path / "a.latent").read_bytes() == (tmp_path / "b.latent").read_bytes()
    assert vae("encode", small_image, "-o", tmp_path / "v.latent").exit_code == 0
    assert torch.equal(comfy_load(tmp_path / "a.latent")[0], latents.load_latent(tmp_path / "v.latent")[0])


@pytest.mark.parametrize("args, message", [
    (["--latent-space", "scaled"], "--format comfyui writes raw latents (ComfyUI's VAE applies scale and shift "
                                   "itself): drop --latent-space scaled"),
    (["-o", "x.latent.png"], "--format comfyui disagrees with the output name x.latent.png"),
])
def test_encode_format_comfyui_usage_errors(vae, real_weights, small_image, tmp_path, args, message):
    result = vae("encode", small_image, "--model", "taesd", "--format", "comfyui", *args)
    assert result.exit_code == 2
    assert error_line(result) == f"Error: {message}"


def test_video_format_comfyui_both_ways(vae, real_weights, gif, tmp_path):
    """`vae video --format comfyui`: (1, C, T, h, w) raw, decoded with no flags to the same frames; a hand-made
    5-D ComfyUI file with --model decodes as a clip too."""
    assert vae("video", gif, "--frames", 3, "-o", tmp_path / "v.latent").exit_code == 0
    result = vae("video", gif, "--frames", 3, "--format", "comfyui", "-o", tmp_path / "c.latent", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "comfyui"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.latent", "v.latent"]  # no temp file left
    ref, meta = latents.load_latent(tmp_path / "v.latent")
    samples = comfy_load(tmp_path / "c.latent")
    assert samples.shape == (1, 32, 3, 4, 2)
    assert torch.equal(samples[0].movedim(1, 0), ref)
    for name in ("v", "c"):
        result = vae("decode", tmp_path / f"{name}.latent", "--as-frames", "-o", tmp_path / f"{name}_frames")
        assert result.exit_code == 0, result.stderr
    decoded = {name: [read_image(p)[0] for p in sorted((tmp_path / f"{name}_frames" / name).iterdir())]
               for name in "vc"}
    assert len(decoded["c"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(decoded["v"], decoded["c"], strict=True))

    hand = save_comfy(tmp_path / "h.latent", ref.movedim(0, 1)[None])
    result = vae("decode", hand, "--model", "taef2", "--as-frames", "-o", tmp_path / "h_frames", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["frames"], report["size"], report["fps"]) == (3, [16, 32], 24.0)
    frames = sorted((tmp_path / "h_frames" / "h").iterdir())
    assert torch.equal(read_image(frames[1])[0][..., :25, :14], decoded["v"][1])


def test_video_format_comfyui_on_a_full_disk_names_the_output(vae, real_weights, gif, tmp_path, monkeypatch):
    """A write failing while the frames go to the intermediate file names the output asked for, not that file,
    and leaves nothing behind."""
    import errno

    from vaecli.files import writing

    def full(self, chunk):
        with writing(self.path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(latents.LatentVideoWriter, "write", full)
    out = tmp_path / "out" / "c.latent"
    result = vae("video", gif, "--frames", 3, "--format", "comfyui", "-o", out)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {gif}: {out}: cannot write: no space left on the device"
    assert list(out.parent.iterdir()) == []


def test_video_format_png_is_not_offered(gif, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vaecli", "video", str(gif), "--format", "png", "-o",
                           str(tmp_path / "v.latent")], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (2, "Error: Invalid value for '--format': 'png' is not one of "
                                                 "'safetensors', 'comfyui'. (see 'python -m vaecli video --help')\n")


def test_wan_latents_go_to_comfyui_raw_and_back(vae, tiny_wan, gif, tmp_path):  # noqa: F811
    """Wan writes normalized latents by default; ComfyUI's file holds the raw ones (ComfyUI's Wan21 latent format
    normalizes itself), and a hand-made (1, 16, T, h, w) file decodes to 1 + 4(T - 1) frames with --model."""
    _, weights = tiny_wan
    spec = REGISTRY["wan2.1"]
    common = ["--frames", 5, "--model", "wan2.1", "--weights", weights]
    assert vae("video", gif, *common, "-o", tmp_path / "v.latent").exit_code == 0
    result = vae("video", gif, *common, "--format", "comfyui", "-o", tmp_path / "c.latent")
    assert result.exit_code == 0, result.stderr
    z, meta = latents.load_latent(tmp_path / "v.latent")
    assert meta["space"] == "normalized"
    raw = z * torch.tensor(spec.latents_std).view(-1, 1, 1) + torch.tensor(spec.latents_mean).view(-1, 1, 1)
    samples = comfy_load(tmp_path / "c.latent")
    assert samples.shape == (1, 16, 2, 4, 2)
    assert (samples[0].movedim(1, 0) - raw).abs().max().item() <= 1e-5

    hand = save_comfy(tmp_path / "h.latent", samples)
    for name, extra in (("h", ["--model", "wan2.1"]), ("v", [])):
        result = vae("decode", tmp_path / f"{name}.latent", *extra, "--weights", weights, "--as-frames",
                     "-o", tmp_path / "frames", "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["frames"] == 5
    hand_frames = [read_image(p)[0] for p in sorted((tmp_path / "frames" / "h").iterdir())]
    ref_frames = [read_image(p)[0] for p in sorted((tmp_path / "frames" / "v").iterdir())]
    for a, b in zip(hand_frames, ref_frames, strict=True):
        assert (a[..., :25, :14] - b).abs().max().item() <= 1 / 255
    assert hand.exists()
