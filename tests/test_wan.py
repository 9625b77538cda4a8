"""The Wan VAE (vaecli.models.wan) against diffusers' AutoencoderKLWan / AutoencoderKLQwenImage on tiny random weights:
encode, decode, streaming, the published configs, and the original checkpoint layout."""

from __future__ import annotations

import re

import pytest
import torch

from vaecli.models.wan import QWEN_IMAGE, WAN21, WAN22, WanConfig, WanVAE, frames_used
from vaecli.models.wan_keys import load_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
STREAM_TOL = 1e-5
TINY21 = dict(base_dim=8, z_dim=4, num_res_blocks=1)
TINY22 = dict(base_dim=8, decoder_base_dim=12, z_dim=8, num_res_blocks=1, is_residual=True, patch_size=2)
DIFFUSERS22 = dict(in_channels=12, out_channels=12, scale_factor_spatial=16)  # what Wan 2.2's config.json adds


def reference(cls, seed=0, **kw):
    """A diffusers model with seeded random weights; RMS gains perturbed so a swapped norm would show."""
    torch.manual_seed(seed)
    model = cls(**kw).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours_from(ref, cfg: WanConfig, sd=None) -> WanVAE:
    model = WanVAE(cfg).eval()
    model.load_state_dict(ref.state_dict() if sd is None else sd, strict=True)
    return model


@pytest.fixture(scope="module")
def wan21():
    from diffusers import AutoencoderKLWan

    ref = reference(AutoencoderKLWan, **TINY21)
    return ref, ours_from(ref, WanConfig(**TINY21))


@pytest.fixture(scope="module")
def wan22():
    from diffusers import AutoencoderKLWan

    ref = reference(AutoencoderKLWan, **TINY22, **DIFFUSERS22)
    return ref, ours_from(ref, WanConfig(**TINY22))


@pytest.fixture(scope="module")
def qwen():
    from diffusers import AutoencoderKLQwenImage

    ref = reference(AutoencoderKLQwenImage, seed=1, **TINY21)
    return ref, ours_from(ref, WanConfig(**TINY21))


def check_parity(ref, ours: WanVAE, clip: torch.Tensor):
    """Posterior mean and log-variance, and the decode of the mean, against diffusers (which works in [-1, 1])."""
    b, _, t, h, w = clip.shape
    f = ours.cfg.spatial_factor
    with torch.inference_mode():
        post = ref.encode(clip * 2 - 1).latent_dist
        mean, logvar = ours.moments(clip)
        assert mean.shape == (b, ours.cfg.z_dim, 1 + (t - 1) // 4, h // f, w // f)
        assert (mean - post.mean).abs().max().item() <= TOL
        assert (logvar - post.logvar).abs().max().item() <= TOL
        assert torch.equal(ours.encode(clip), mean)
        expected = (ref.decode(post.mean).sample + 1) / 2
        pixels = ours.decode(post.mean)
        assert pixels.shape == clip.shape
        assert (pixels - expected).abs().max().item() <= TOL
        assert 0.5 < ((expected > 0) & (expected < 1)).float().mean().item()  # mostly unclamped: a real comparison


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_wan21_matches_diffusers(wan21, frames):
    torch.manual_seed(frames)
    check_parity(*wan21, torch.rand(1, 3, frames, 40, 56))


@pytest.mark.parametrize("frames", [1, 5])
def test_qwen_image_matches_diffusers(qwen, frames):
    torch.manual_seed(frames)
    check_parity(*qwen, torch.rand(2, 3, frames, 40, 56))


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_wan22_matches_diffusers(wan22, frames):
    torch.manual_seed(frames)
    check_parity(*wan22, torch.rand(1, 3, frames, 48, 80))


def test_frame_rule(wan21):
    assert [frames_used(n) for n in (1, 2, 4, 5, 8, 9, 81, 83)] == [1, 1, 1, 5, 5, 9, 81, 81]
    with pytest.raises(ValueError):
        frames_used(0)
    ours = wan21[1]
    clip = torch.rand(1, 3, 8, 16, 24)
    assert torch.equal(ours.encode(clip), ours.encode(clip[:, :, :5]))  # frames past 1 + 4k are dropped
    with pytest.raises(ValueError, match="multiple of 8"):
        ours.encode(torch.rand(1, 3, 1, 20, 24))


def cache_bytes(stream) -> int:
    return sum(v.numel() * v.element_size() for v in stream.cache.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("which,size", [("wan21", (40, 56)), ("wan22", (48, 80))])
def test_streaming_equals_whole(request, which, size):
    """Pushed in uneven pieces, encode and decode equal the whole clip, holding the same state at any length."""
    ours = request.getfixturevalue(which)[1]
    torch.manual_seed(7)
    clip = torch.rand(1, 3, 19, *size)
    latents = ours.encode(clip)
    assert latents.shape[2] == 5  # 17 of the 19 frames

    enc = ours.stream_encoder()
    cuts = [0, 2, 3, 8, 9, 15, 19]
    parts, held = [], []
    for a, b in zip(cuts[:-1], cuts[1:], strict=False):
        parts.append(enc.push(clip[:, :, a:b]))
        held.append(cache_bytes(enc))
    assert [p.shape[2] for p in parts] == [1, 0, 1, 1, 1, 1]
    assert held[2] == held[-1]  # no growth with the clip's length
    assert enc.flush() == 2
    assert (torch.cat(parts, 2) - latents).abs().max().item() <= STREAM_TOL
    assert (enc.push(clip[:, :, :1]) - latents[:, :, :1]).abs().max().item() <= STREAM_TOL  # reset: a new clip

    pixels = ours.decode(latents)
    dec = ours.stream_decoder()
    pieces, held = [], []
    for a, b in [(0, 1), (1, 3), (3, 4), (4, 5)]:
        pieces.append(dec.push(latents[:, :, a:b]))
        held.append(cache_bytes(dec))
    assert [p.shape[2] for p in pieces] == [1, 8, 4, 4]
    assert held[1] == held[-1]
    assert dec.flush() == 0
    assert (torch.cat(pieces, 2) - pixels).abs().max().item() <= STREAM_TOL


def test_published_configs_match_diffusers():
    """The real Wan 2.1 / Qwen-Image / Wan 2.2 5B networks (on the meta device) have diffusers' keys and shapes."""
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    with torch.device("meta"):
        wan21, qwen = AutoencoderKLWan(), AutoencoderKLQwenImage()
        wan22 = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2,
                                 **DIFFUSERS22)
        assert shapes(WanVAE(WAN21)) == shapes(wan21)
        assert shapes(WanVAE(QWEN_IMAGE)) == shapes(qwen)
        assert shapes(WanVAE(WAN22)) == shapes(wan22)
    for cfg, ref in [(WAN21, wan21), (QWEN_IMAGE, qwen)]:
        assert list(cfg.latents_mean) == ref.config.latents_mean
        assert list(cfg.latents_std) == ref.config.latents_std
    assert len(WAN22.latents_mean) == len(WAN22.latents_std) == 48 and min(WAN22.latents_std) > 0
    assert (WAN21.spatial_factor, WAN22.spatial_factor) == (8, 16)


def test_normalize_round_trip():
    model = WanVAE(WanConfig(**TINY21, latents_mean=(0.5, -1.0, 0.0, 2.0), latents_std=(2.0, 0.5, 1.0, 4.0)),
                   encoder=False)
    z = torch.randn(2, 4, 3, 5, 7)
    n = model.normalize(z)
    assert torch.allclose(n[:, 1], (z[:, 1] + 1.0) / 0.5)
    assert torch.allclose(model.denormalize(n), z, atol=1e-6)
    assert model.normalize(z[:, :, 0]).shape == (2, 4, 5, 7)  # images: (B, z, h, w)


RESNET = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6.",
          "conv_shortcut.": "shortcut."}


def to_original(sd: dict, n: int, nested: bool) -> dict:
    """The original Wan layout (wan/modules/vae.py, vae2_2.py) of a diffusers state dict: the inverse renaming."""
    def resnet(rest):
        for new, old in RESNET.items():
            if rest.startswith(new):
                return old + rest[len(new):]
        return rest

    out = {}
    for key, value in sd.items():
        k = re.sub(r"^quant_conv\.", "conv1.", key)
        k = re.sub(r"^post_quant_conv\.", "conv2.", k)
        k = k.replace(".conv_in.", ".conv1.").replace(".norm_out.", ".head.0.").replace(".conv_out.", ".head.2.")
        if m := re.match(r"(\w+)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)", k):
            idx = 1 if m[2] == "attentions" else 2 * int(m[3])
            k = f"{m[1]}.middle.{idx}.{resnet(m[4])}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):  # 2.2
            k = f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{resnet(m[3])}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsampler\.(.*)", k):
            k = f"encoder.downsamples.{m[1]}.downsamples.{n}.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", k):  # 2.1
            k = f"encoder.downsamples.{m[1]}.{resnet(m[2])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsampler\.(.*)", k):  # 2.2
            k = f"decoder.upsamples.{m[1]}.upsamples.{n + 1}.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k):  # 2.1
            k = f"decoder.upsamples.{int(m[1]) * (n + 2) + n + 1}.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            k = (f"decoder.upsamples.{m[1]}.upsamples.{m[2]}.{resnet(m[3])}" if nested
                 else f"decoder.upsamples.{int(m[1]) * (n + 2) + int(m[2])}.{resnet(m[3])}")
        out[k] = value
    return out


def test_original_wan21_checkpoint(tmp_path):
    """A `Wan2.1_VAE.pth`-layout file loads (weights_only) into our model and gives diffusers' outputs."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    kw = dict(base_dim=8, z_dim=4)  # num_res_blocks 2, as diffusers' converter assumes
    ref = reference(AutoencoderKLWan, seed=2, **kw)
    original = to_original(ref.state_dict(), 2, nested=False)
    for key in ("encoder.downsamples.5.time_conv.weight", "decoder.upsamples.3.time_conv.weight",
                "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.weight",
                "encoder.middle.1.to_qkv.weight", "decoder.head.2.bias", "conv2.weight"):
        assert key in original
    # diffusers' own converter takes our inverse back to its names: the test's layout is the real one.
    assert convert_wan_vae_to_diffusers(original).keys() == ref.state_dict().keys()
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    ours = ours_from(ref, WanConfig(**kw), load_state_dict(tmp_path / "Wan2.1_VAE.pth", WanConfig(**kw)))
    torch.manual_seed(3)
    check_parity(ref, ours, torch.rand(1, 3, 5, 16, 24))


def test_original_wan22_checkpoint(tmp_path, wan22):
    """A Wan 2.2 original-layout file (nested `downsamples.i.downsamples.j`, as vae2_2.py names them) loads likewise."""
    from safetensors.torch import save_file

    ref = wan22[0]
    original = to_original(ref.state_dict(), 1, nested=True)
    for key in ("encoder.downsamples.0.downsamples.0.residual.0.gamma",
                "encoder.downsamples.1.downsamples.0.shortcut.bias",
                "encoder.downsamples.1.downsamples.1.time_conv.weight",
                "decoder.upsamples.0.upsamples.2.time_conv.weight",
                "decoder.upsamples.2.upsamples.2.resample.1.weight",
                "decoder.upsamples.2.upsamples.0.shortcut.weight"):
        assert key in original
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "wan22.safetensors"))
    ours = ours_from(ref, WanConfig(**TINY22), load_state_dict(tmp_path / "wan22.safetensors", WanConfig(**TINY22)))
    torch.manual_seed(4)
    check_parity(ref, ours, torch.rand(1, 3, 5, 32, 48))


@pytest.mark.parametrize("which,size", [("wan21", (96, 104)), ("wan22", (96, 128))])
def test_tiles_equal_whole_frames(request, which, size):
    """Tile by tile through the clip (vaecli.clip_tiles), the whole layers in scratch files or in RAM: encode and
    decode equal the frame-by-frame stream to 1e-5. A third of the computed halo does not (the test would see a
    halo too small)."""
    from dataclasses import replace

    from vaecli import clip_tiles
    from vaecli.models.wan import Family
    from vaecli.scratch import Scratch

    ours = request.getfixturevalue(which)[1]
    f = ours.cfg.spatial_factor
    torch.manual_seed(8)
    clip = torch.rand(1, 3, 6, *size)  # 5 frames encoded, 1 dropped
    frames = clip[0].movedim(1, 0)
    with torch.inference_mode():
        latents = ours.encode(clip)
        pixels = ours.decode(latents)[0].movedim(1, 0)
        z = latents[0].movedim(1, 0)
        enc, dec = Family.encoder_split(ours), Family.decoder_split(ours)
        assert Family.chunks(ours, 6) == [(0, 1), (1, 5)]
        counts = Family.frame_counts(ours, z.shape[0])
        assert counts == [1, 4]
        results = {}
        for budget, halved in [(0, False), (1 << 30, False), (0, True)]:
            store = Scratch(budget, torch.device("cpu"))
            spool = clip_tiles.Spool(store)
            spool.push(frames[:2])
            spool.push(frames[2:])
            e = replace(enc, halo=enc.halo / 3) if halved else enc
            d = replace(dec, halo=dec.halo / 3) if halved else dec
            got = clip_tiles.encode(e, spool, Family.chunks(ours, 6), 3 * f, store)
            back = torch.cat(list(clip_tiles.decode(d, lambda i, j: z[i:j], z.shape[0], counts, 3, store)))
            assert (store.peak_file_bytes > 0) == (budget == 0)
            spool.close()
            store.close()
            got = got[:, :z.shape[1]]  # the posterior's moments: the means first
            results[budget, halved] = ((got - z).abs().max().item(), (back - pixels).abs().max().item())
    assert max(results[0, False]) <= STREAM_TOL and max(results[1 << 30, False]) <= STREAM_TOL
    assert min(results[0, True]) > 1e-3


def test_tiles_are_decided_on_the_frame_in_pixels():
    """Wan 2.1 at production widths, 640x368 frames: streamed whole, the decoder's tiled part holds ~5.5 GB (its
    92 x 160 cells at twice the latent resolution) and the encoder's ~3.5 GB; tiles start past those budgets and
    then take at least their halo."""
    from vaecli import clip_tiles
    from vaecli.models.wan import Family

    with torch.device("meta"):
        model = WanVAE(WAN21)
    dec, enc = Family.decoder_split(model), Family.encoder_split(model)
    assert (dec.unit_px, enc.unit_px, dec.halo, enc.halo) == (4, 1, 11.5, 75)
    assert 5.4e9 < 92 * 160 * dec.unit_bytes < 5.6e9 and 3.4e9 < 368 * 640 * enc.unit_bytes < 3.5e9
    assert clip_tiles.tile_for(dec, 368, 640, 6 << 30) is None and clip_tiles.tile_for(enc, 368, 640, 4 << 30) is None
    assert clip_tiles.tile_for(dec, 368, 640, 2 << 30) == 51  # sqrt(2 GiB / 373 KB) - 2 x 12
    assert clip_tiles.tile_for(dec, 368, 640, 1) == 12 and clip_tiles.tile_for(enc, 368, 640, 1) == 80
