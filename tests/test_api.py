"""The Python API (`vaecli.load`, `Latent`, `load_latent`): the same numbers and files as the commands."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageOps

import vaecli
from vaecli.errors import UsageError
from vaecli.latents import load_latent
from vaecli.media import read_image


def test_encode_decode_save_match_the_commands(vae, real_weights, small_image, tmp_path):
    model = vaecli.load("taef2", device="cpu")
    latent = model.encode(small_image)
    assert isinstance(latent, vaecli.Latent) and (latent.model, latent.space) == ("taef2", "raw")
    bare = vaecli.Latent(latent.tensor, {})
    assert (bare.model, bare.space) == (None, None)  # not the string "None"
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


def test_arguments_the_api_cannot_use_are_refused_in_one_line(real_weights, small_image, tmp_path):
    """A batch gave the first image's latent alone, 8-bit or [-1, 1] pixels encoded to wrong latents, NaN latents
    decoded to garbage, and the rest raised KeyError/TypeError/AttributeError from deep inside."""
    from vaecli.errors import InputError

    model = vaecli.load("taef2", device="cpu")
    pixels = read_image(small_image)[0]
    latent = model.encode(pixels)
    nan = vaecli.Latent(latent.tensor.clone(), latent.meta)
    nan.tensor[0, 0, 0] = float("nan")
    refused = [
        (lambda: model.encode(torch.cat([pixels, pixels])), UsageError,
         "expected one image (encode a batch image by image), got a batch of 2"),
        (lambda: model.encode((pixels * 255).to(torch.uint8)), UsageError,
         "expected float pixels in [0, 1], got uint8 (divide 8-bit values by 255)"),
        (lambda: model.encode(pixels * 2 - 1), UsageError,
         f"expected pixels in [0, 1], got values from -1 to {float(pixels.max()) * 2 - 1:g} (a resize can "
         f"overshoot: .clamp(0, 1) them)"),
        (lambda: model.encode(torch.where(pixels == pixels.max(), float("nan"), pixels)), UsageError,
         f"expected finite pixels in [0, 1], found {int((pixels == pixels.max()).sum())} NaN/Inf"),
        (lambda: model.encode(pixels[:, :2]), UsageError,
         "expected pixels of shape (3, H, W) or (B, 3, H, W), got shape [1, 2, 45, 61]"),
        (lambda: model.encode(None), UsageError,
         "expected an image path, a PIL image or a (3, H, W) float tensor in [0, 1], got NoneType"),
        (lambda: model.decode(nan), InputError, "expected finite latent values, found 1 NaN/Inf"),
        (lambda: model.decode(latent.tensor), UsageError,
         "expected an image Latent (vaecli.load_latent, Model.encode), got shape [32, 6, 8]"),
        (lambda: model.decode(vaecli.Latent(latent.tensor[None], latent.meta)), UsageError,
         "expected an image Latent of shape (C, h, w), got shape [1, 32, 6, 8]"),
        # an empty axis raised RuntimeError from a convolution (or named a negative image size); a complex latent
        # lost its imaginary part and an integer one decoded to garbage, where a latent file of either is refused
        (lambda: model.decode(vaecli.Latent(latent.tensor[:, :, :0], {})), UsageError,
         "expected every latent dimension to be at least 1, got shape [32, 6, 0]"),
        (lambda: list(model.decode_video(vaecli.Latent(latent.tensor[None][:0], latent.meta))), UsageError,
         "expected every latent dimension to be at least 1, got shape [0, 32, 6, 8]"),
        (lambda: model.decode(vaecli.Latent(latent.tensor.to(torch.complex64), latent.meta)), UsageError,
         "expected an image Latent of floating-point values, got complex64"),
        (lambda: model.decode(vaecli.Latent(latent.tensor.int(), latent.meta)), UsageError,
         "expected an image Latent of floating-point values, got int32"),
        # metadata made or read elsewhere: a negative padding decoded to a 0-pixel-wide image, text raised ValueError
        (lambda: model.decode(vaecli.Latent(latent.tensor, {"model": "taef2", "padding": [-5, 0, 0, 0]})), InputError,
         "Latent.meta: metadata 'padding' must be [left, top, right, bottom] of integers >= 0, got "
         "'[-5, 0, 0, 0]'"),
        (lambda: model.decode(vaecli.Latent(latent.tensor, {**latent.meta, "image_size": "61x45"})), InputError,
         "Latent.meta: metadata 'image_size' must be [W, H] of positive integers, got '61x45'"),
        (lambda: model.decode(vaecli.Latent(latent.tensor, [("model", "taef2")])), UsageError,
         "expected Latent.meta to be a dict of vaecli metadata, got list"),
        (lambda: list(model.decode_video(latent)), UsageError,
         "expected a clip's Latent of shape (T, C, h, w), got shape [32, 6, 8]"),
        (lambda: list(model.decode_video(latent, chunk=0)), UsageError,
         "chunk: expected a number of frames of at least 1, or None, got 0"),
        (lambda: list(model.encode_video([pixels[0]], chunk=0)), UsageError,
         "chunk: expected a number of frames of at least 1, or None, got 0"),
        (lambda: list(model.encode_video(pixels[0])), UsageError,  # it iterated the frame's channels
         "expected a clip: a video path, an iterable of (3, H, W) frames or a (T, 3, H, W) tensor, got shape "
         "[3, 45, 61]"),
        (lambda: list(model.encode_video([pixels[0], pixels[0, :, :40]])), InputError,
         "frame 1 is 61x40, frame 0 was 61x45: a clip's frames share one size"),
        (lambda: latent.save(tmp_path / "a.jpg", format="jpg"), UsageError,
         "Latent.save: unknown format 'jpg': expected one of safetensors, png"),
        (lambda: vaecli.Latent(latent.tensor[None], {}).save(tmp_path / "v.latent"), UsageError,
         "Latent.save writes image latents (C, h, w), got shape [1, 32, 6, 8] (a clip's latents are written by "
         "'vae video')"),
        (lambda: vaecli.to_image(torch.zeros(4, 8, 8)), UsageError,
         "to_image: expected (1, 3, H, W) or (3, H, W) pixels, got shape [4, 8, 8]"),
        (lambda: vaecli.to_image(torch.full((3, 2, 2), float("nan"))), UsageError,
         "to_image: expected finite pixels, found 12 NaN/Inf"),
        (lambda: vaecli.to_image(torch.full((3, 2, 2), 200, dtype=torch.uint8)), UsageError,
         "to_image: expected float pixels in [0, 1], got uint8 (divide 8-bit values by 255)"),
        (lambda: list(model.encode_video([pixels[0]], chunk=True)), UsageError,
         "chunk: expected a number of frames of at least 1, or None, got True"),
        (lambda: vaecli.load("taef2", halves="encoder"), UsageError,
         "halves: expected a tuple of encoder and/or decoder, got 'encoder'"),
        (lambda: vaecli.load("taef2", weights=5), UsageError, "weights: expected a path or a list of paths, got 5"),
        (lambda: vaecli.load("taef2", max_memory=[1]), UsageError,
         "max_memory: expected a size like '2GB' or a number of bytes, got [1]"),
    ]
    for call, error, message in refused:
        with pytest.raises(error) as err:
            call()
        assert str(err.value) == message
    assert not (tmp_path / "a.jpg").exists() and not (tmp_path / "v.latent").exists()
    import numpy as np

    assert len(list(model.encode_video([pixels[0]], chunk=np.int64(2)))) == 1  # numpy integers are integers
    # a budget in bytes is a budget
    assert vaecli.load("taef2", max_memory=2**30, halves=("encoder",)).codec.budget == 2**30


def test_load_takes_a_torch_device_and_refuses_halves_the_model_lacks(real_weights):
    """torch.device("cpu") was refused as "unknown device 'cpu'", and taesana with halves=("decoder",) loaded an
    empty model that failed only when used."""
    assert vaecli.load("taef2", device=torch.device("cpu"), halves=("encoder",)).codec.device == torch.device("cpu")
    with pytest.raises(UsageError) as err:
        vaecli.load("taef2", device=torch.device("cuda", 0))
    assert str(err.value) == "unknown device 'cuda:0': expected auto, cpu, cuda or mps"
    with pytest.raises(UsageError) as err:
        vaecli.load("taesana", device="cpu", halves=("decoder",))
    assert str(err.value) == "taesana has no decoder (encoder only: no decoder weights are published)"
    assert vaecli.load("taesana", device="cpu").codec.model.decoder is None  # the default: the encoder it has


def test_decoding_with_the_encoder_alone_says_the_decoder_is_not_loaded(real_weights, small_image):
    """A model loaded with halves=("encoder",) refused decode as "taef2 has no decoder", as if taef2 had none."""
    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    latent = model.encode(small_image)
    with pytest.raises(UsageError) as err:
        model.decode(latent)
    assert str(err.value) == "taef2 has no decoder loaded"
    clip = vaecli.Latent(latent.tensor[None], latent.meta)
    with pytest.raises(UsageError) as err:
        next(model.decode_video(clip))
    assert str(err.value) == "taef2 has no decoder loaded"


def test_latents_made_in_memory_are_checked_as_files_are(real_weights, small_image, tmp_path):
    """A Latent's .meta or .tensor of the wrong type, or metadata a file could not hold, raised AttributeError or
    ValueError from deep inside (or decoded, with an unknown space); save() with foreign metadata wrote a file that
    load_latent refuses; a path of the wrong type raised TypeError."""
    from vaecli.errors import LatentFormatError

    model = vaecli.load("taef2", device="cpu")
    latent = model.encode(small_image)
    refused = [
        (lambda: model.decode(vaecli.Latent(latent.tensor, None)), UsageError,
         "expected Latent.meta to be a dict of vaecli metadata, got NoneType"),
        (lambda: model.decode(vaecli.Latent(latent.tensor.numpy(), latent.meta)), UsageError,
         "expected Latent.tensor to be a torch.Tensor, got ndarray"),
        (lambda: model.decode(vaecli.Latent(latent.tensor, {**latent.meta, "image_size": "61x45"})),
         LatentFormatError, "Latent.meta: metadata 'image_size' must be [W, H] of positive integers, got '61x45'"),
        (lambda: model.decode(vaecli.Latent(latent.tensor, {**latent.meta, "scaling_factor": "x"})),
         LatentFormatError, "Latent.meta: metadata 'scaling_factor' must be a non-zero number, got 'x'"),
        (lambda: list(model.decode_video(vaecli.Latent(latent.tensor[None], {**latent.meta, "space": "bogus"}))),
         LatentFormatError,
         "Latent.meta: metadata 'space' must be one of raw, scaled, normalized, native, got 'bogus'"),
        (lambda: vaecli.Latent(latent.tensor, None).save(tmp_path / "n.latent"), UsageError,
         "expected Latent.meta to be a dict of vaecli metadata, got NoneType"),
        (lambda: vaecli.Latent(latent.tensor, {}).save(tmp_path / "e.latent"), UsageError,
         "Latent.save: expected vaecli metadata in .meta (format 'vaecli-latent', as Model.encode and load_latent "
         "give), got format None"),
        (lambda: latent.save(None), UsageError, "Latent.save: expected a file path, got NoneType"),
        (lambda: vaecli.load_latent(3), UsageError, "load_latent: expected a file path, got int"),
    ]
    for call, error, message in refused:
        with pytest.raises(error) as err:
            call()
        assert str(err.value) == message
    assert not (tmp_path / "n.latent").exists() and not (tmp_path / "e.latent").exists()


def test_save_chooses_the_format_from_the_name_as_vae_encode_does(vae, real_weights, small_image, tmp_path):
    """`latent.save("x.png")` wrote safetensors bytes under a .png name, where `vae encode -o x.png` writes a PNG."""
    latent = vaecli.load("taef2", device="cpu", halves=("encoder",)).encode(small_image)
    assert vae("encode", small_image, "-o", tmp_path / "cli.png").exit_code == 0
    latent.save(tmp_path / "api.png")
    assert (tmp_path / "api.png").read_bytes() == (tmp_path / "cli.png").read_bytes()
    latent.save(tmp_path / "st.bin", format="safetensors")  # a name of no latent format: the format given
    assert (tmp_path / "st.bin").read_bytes()[8:10] == b'{"'
    with pytest.raises(UsageError) as err:  # as `vae encode --format safetensors -o st.png` refuses it
        latent.save(tmp_path / "st.png", format="safetensors")
    assert str(err.value) == "Latent.save: format 'safetensors' disagrees with the name st.png (a png name)"
    assert not (tmp_path / "st.png").exists()


def test_pil_images_encode_as_their_files_do(real_weights, small_image, tmp_path):
    """A PIL image went through .convert("RGB"): alpha dropped rather than flattened over white as `vae encode` does,
    and 16-bit values clipped at 255 rather than scaled from 65535."""
    import numpy as np

    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    rgba = np.asarray(Image.open(small_image).convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    gray = np.asarray(Image.open(small_image).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray).save(tmp_path / "16.png")
    rotated = Image.open(small_image).convert("RGB")
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    rotated.save(tmp_path / "exif.jpg", exif=exif, quality=95)
    for name in ("alpha.png", "16.png", "exif.jpg"):
        with Image.open(tmp_path / name) as image:
            assert image.mode in ("RGBA", "I;16", "RGB")
            assert torch.equal(model.encode(image).tensor, model.encode(tmp_path / name).tensor)
    with Image.open(tmp_path / "exif.jpg") as image:  # upright already: not turned twice
        upright = ImageOps.exif_transpose(image)
        assert torch.equal(model.encode(upright).tensor, model.encode(tmp_path / "exif.jpg").tensor)
        assert model.encode(upright).tensor.shape[-2:] == (8, 6)  # 45x61 after the turn


def test_help_vaecli_lists_the_api():
    """help(vaecli) showed the example alone: the lazily imported API was in neither dir(vaecli) nor the help."""
    import pydoc

    assert set(vaecli.__all__) <= set(dir(vaecli))
    text = pydoc.render_doc(vaecli, renderer=pydoc.plaintext)
    for line in ("class Latent(builtins.object)", "class Model(builtins.object)", "    load_latent(path: ",
                 "An image Latent -> (1, 3, H, W) float pixels in [0, 1], at the source image's size."):
        assert line in text


def test_tensors_the_api_returns_take_in_place_edits_and_autograd(real_weights, small_image, gif):
    """encode's latents and decode_video's frames were inference tensors (made under torch.inference_mode): an
    in-place edit or autograd raised RuntimeError, where load_latent's and decode's tensors took them."""
    model = vaecli.load("taef2", device="cpu")
    latent = model.encode(small_image)
    clip = list(model.encode_video(gif, chunk=8))
    frames = list(model.decode_video(vaecli.Latent(torch.cat([c.tensor for c in clip]), clip[0].meta), chunk=8))
    for tensor in [latent.tensor, clip[0].tensor, frames[0]]:
        assert not tensor.is_inference()
        tensor.mul_(1.0)
    weight = torch.ones(1, requires_grad=True)
    (latent.tensor * weight).sum().backward()
    assert weight.grad is not None


def test_encode_video_with_chunk_1_streams_a_frame_at_a_time(real_weights, gif):
    """chunk=1 (or a budget fitting one frame a pass) gave the whole clip as one Latent at the end: the first frame
    was in the batch before the count was checked, so it never equalled 1 and every frame was held in memory."""
    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    frames = [torch.rand(3, 16, 16) for _ in range(3)]
    assert [p.tensor.shape[0] for p in model.encode_video(frames, chunk=1)] == [1, 1, 1]
    assert [p.tensor.shape[0] for p in model.encode_video(frames, chunk=2)] == [2, 1]


def test_meta_and_sparse_tensors_are_refused_in_one_line(real_weights, small_image, tmp_path):
    """A meta tensor (a shape, no data) raised NotImplementedError and a sparse one RuntimeError from deep inside
    torch, in encode, decode, Latent.save and to_image."""
    model = vaecli.load("taef2", device="cpu")
    latent = model.encode(small_image)
    pixels = torch.rand(3, 16, 16)
    refused = [
        (lambda: model.encode(pixels.to("meta")),
         "expected pixels with values, got a meta tensor (a shape without data)"),
        (lambda: model.encode(pixels.to_sparse()),
         "expected pixels as a dense tensor, got layout sparse_coo (.to_dense() it)"),
        (lambda: model.decode(vaecli.Latent(latent.tensor.to("meta"), latent.meta)),
         "expected Latent.tensor with values, got a meta tensor (a shape without data)"),
        (lambda: model.decode(vaecli.Latent(latent.tensor.to_sparse(), latent.meta)),
         "expected Latent.tensor as a dense tensor, got layout sparse_coo (.to_dense() it)"),
        (lambda: vaecli.Latent(latent.tensor.to("meta"), latent.meta).save(tmp_path / "m.latent"),
         "expected Latent.tensor with values, got a meta tensor (a shape without data)"),
        (lambda: vaecli.to_image(pixels.to("meta")),
         "to_image: expected pixels with values, got a meta tensor (a shape without data)"),
    ]
    for call, message in refused:
        with pytest.raises(UsageError) as err:
            call()
        assert str(err.value) == message
    assert not (tmp_path / "m.latent").exists()


def test_a_premultiplied_la_pil_image_encodes_as_its_la_image(real_weights):
    """A PIL image in mode "La" (premultiplied luminance and alpha) raised ValueError "conversion from La to L not
    supported" from Pillow, where every other mode encodes."""
    import numpy as np

    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    la = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 2), dtype=np.uint8), "LA")
    premultiplied = la.convert("La")
    assert torch.equal(model.encode(premultiplied).tensor, model.encode(premultiplied.convert("LA")).tensor)


def test_an_empty_pil_image_is_refused_in_one_line(real_weights):
    """A 0x0 PIL image raised RuntimeError "Kernel size can't be greater than actual input size" from a convolution,
    where an empty tensor is refused."""
    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    for size in [(0, 0), (8, 0)]:
        with pytest.raises(UsageError) as err:
            model.encode(Image.new("RGB", size))
        assert str(err.value) == f"expected a PIL image of at least 1x1 pixels, got {size[0]}x{size[1]}"


def test_to_image_refuses_pixels_with_an_empty_axis(tmp_path):
    """to_image of (3, 0, 8) pixels gave an 8x0 PIL image, which .save() refused with ValueError "cannot write empty
    image"."""
    for shape in [(3, 0, 8), (1, 3, 8, 0)]:
        with pytest.raises(UsageError) as err:
            vaecli.to_image(torch.rand(shape))
        assert str(err.value) == f"to_image: expected (1, 3, H, W) or (3, H, W) pixels, got shape {list(shape)}"


def test_a_max_memory_load_cannot_use_is_named_as_given(real_weights):
    """max_memory=-1 was refused as "--max-memory -1B: expected a size like 2GB, ...": the command's option, and a
    value the script never wrote."""
    for size in [-1, 0, "0", "2 parsecs", ""]:
        with pytest.raises(UsageError) as err:
            vaecli.load("taef2", device="cpu", max_memory=size, halves=("encoder",))
        assert str(err.value) == (f"max_memory: expected a size of at least 1 byte like '2GB', or a number of bytes, "
                                  f"got {size!r}")
    for size in ["2GB", "2 GiB", 2**31]:
        assert vaecli.load("taef2", device="cpu", max_memory=size, halves=("encoder",)).codec.budget == 2**31


def test_encoding_a_tensor_that_requires_grad_warns_nothing(real_weights, recwarn):
    """Pixels with requires_grad=True encoded with torch's UserWarning "Converting a tensor with requires_grad=True to
    a scalar may lead to unexpected behavior" from the range check."""
    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    pixels = torch.rand(3, 16, 16)
    latent = model.encode(pixels.clone().requires_grad_())
    assert torch.equal(latent.tensor, model.encode(pixels).tensor)
    assert [str(w.message) for w in recwarn] == []


def test_load_takes_a_torch_dtype(real_weights):
    """dtype=torch.float16 was refused as "unknown dtype 'torch.float16'", where device=torch.device("cpu") is taken."""
    assert vaecli.load("taef2", device="cpu", dtype=torch.float16, halves=("encoder",)).codec.dtype == torch.float16
    assert vaecli.load("taef2", device="cpu", dtype=torch.bfloat16, halves=("encoder",)).codec.dtype == torch.bfloat16
    with pytest.raises(UsageError) as err:
        vaecli.load("taef2", device="cpu", dtype=torch.float64)
    assert str(err.value) == "unknown dtype 'float64': expected one of fp32, fp16, bf16"


def test_bool_and_complex_pixels_get_no_8_bit_hint(real_weights):
    """Bool or complex pixels were refused with "(divide 8-bit values by 255)", a fix for integers that does not
    apply to them."""
    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    pixels = torch.rand(3, 8, 8)
    for call, message in [
        (lambda: model.encode(pixels > 0.5), "expected float pixels in [0, 1], got bool"),
        (lambda: model.encode(pixels.to(torch.complex64)), "expected float pixels in [0, 1], got complex64"),
        (lambda: vaecli.to_image(pixels > 0.5), "to_image: expected float pixels in [0, 1], got bool"),
        (lambda: model.encode((pixels * 65535).int()),
         "expected float pixels in [0, 1], got int32 (divide 8-bit values by 255)"),
    ]:
        with pytest.raises(UsageError) as err:
            call()
        assert str(err.value) == message


def test_save_checks_values_as_decode_does(real_weights, tmp_path, recwarn):
    """Latent.save of NaN values said "the model gave 1 NaN/Inf (an overflow: try another --dtype)" of a latent a
    script made, and a complex or integer latent saved as a PNG (the imaginary part dropped with a UserWarning),
    where decode refuses both."""
    from vaecli.errors import InputError

    latent = vaecli.load("taef2", device="cpu", halves=("encoder",)).encode(torch.rand(3, 16, 16))
    nan = latent.tensor.clone()
    nan[0, 0, 0] = float("nan")
    for tensor, error, message in [
        (nan, InputError, "expected finite latent values, found 1 NaN/Inf"),
        (latent.tensor.to(torch.complex64), UsageError,
         "expected an image Latent of floating-point values, got complex64"),
        (latent.tensor.int(), UsageError, "expected an image Latent of floating-point values, got int32"),
    ]:
        with pytest.raises(error) as err:
            vaecli.Latent(tensor, latent.meta).save(tmp_path / "x.png")
        assert str(err.value) == message
    assert not (tmp_path / "x.png").exists() and [str(w.message) for w in recwarn] == []


def test_save_refuses_metadata_a_file_cannot_hold(real_weights, tmp_path):
    """Latent.save with a numpy number or another non-JSON value in .meta raised TypeError "Object of type float32 is
    not JSON serializable", and a non-string key TypeError "'<' not supported between instances of 'int' and
    'str'"."""
    import numpy as np

    latent = vaecli.load("taef2", device="cpu", halves=("encoder",)).encode(torch.rand(3, 16, 16))
    for extra, message in [
        ({"note": np.float32(1.5)}, "Latent.meta: expected JSON values (str, int, float, bool, None, lists, dicts), "
                                    "got float32 under 'note' (.item() a numpy number)"),
        ({1: "x"}, "Latent.meta: expected string keys, got 1"),
    ]:
        for name in ["x.latent", "x.png"]:
            with pytest.raises(UsageError) as err:
                vaecli.Latent(latent.tensor, {**latent.meta, **extra}).save(tmp_path / name)
            assert str(err.value) == message
    assert list(tmp_path.iterdir()) == []
    vaecli.Latent(latent.tensor, {**latent.meta, "note": [1, {"a": None}]}).save(tmp_path / "ok.latent")
    assert vaecli.load_latent(tmp_path / "ok.latent").meta["note"] == [1, {"a": None}]


def test_a_closed_or_truncated_pil_image_is_refused_in_one_line(small_image, real_weights, tmp_path):
    """A PIL image closed before its pixels were read (used after its 'with Image.open' block) raised a bare
    AssertionError from Pillow, and a truncated one OSError "image file is truncated"."""
    from vaecli.errors import InputError

    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    with Image.open(small_image) as closed:
        pass
    made = Image.new("RGB", (8, 8))
    made.close()
    data = small_image.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with Image.open(tmp_path / "cut.png") as cut:
        for image, error, message in [
            (closed, UsageError, "expected an open PIL image, got one closed before its pixels were read (encode it "
                                 "inside its 'with Image.open(...)' block, or .load() it first)"),
            (made, UsageError, "expected an open PIL image, got one closed before its pixels were read (encode it "
                               "inside its 'with Image.open(...)' block, or .load() it first)"),
            (cut, InputError, "PIL image: cannot read its pixels: image file is truncated"),
        ]:
            with pytest.raises(error) as err:
                model.encode(image)
            assert str(err.value) == message
    with Image.open(small_image) as image:
        image.load()
    assert torch.equal(model.encode(image).tensor, model.encode(small_image).tensor)  # read, then closed: fine


def test_pixels_just_outside_0_1_are_shown_outside_it(real_weights):
    """Pixels a hair above 1 were refused as "got values from 0 to 1": the short form rounded the value onto the
    bound it is outside."""
    model = vaecli.load("taef2", device="cpu", halves=("encoder",))
    pixels = torch.full((3, 8, 8), 0.5, dtype=torch.float64)
    pixels[0, 0, 0] = 1 + 1e-9
    with pytest.raises(UsageError) as err:
        model.encode(pixels)
    assert str(err.value) == ("expected pixels in [0, 1], got values from 0.5 to 1.000000001 (a resize can overshoot: "
                              ".clamp(0, 1) them)")
