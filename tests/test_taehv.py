"""TAEHV / TAESDV video autoencoders: parity with the reference taehv.py / taesdv.py in ../shared/reference on seeded
random weights, in the reference's parallel, sequential and streaming modes, plus the frame rule and the loaders.

Frame rule (TAEHV): T frames -> ceil(T / t_downscale) latents, the tail padded with copies of the last frame;
L latents -> L * t_upscale - (t_upscale - 1) frames (taecvx: L * t_upscale when L is even). TAESDV: T <-> T.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from vaecli.models.memblocks import CausalRunner
from vaecli.models.taehv import TAEHV, TAEHVConfig, load_taehv
from vaecli.models.taehv_keys import config_from_state_dict, variant_config
from vaecli.models.taesdv import TAESDV, load_taesdv

# Checkpoint-style names: the reference picks patch size, latent channels, time factors and decoder arch from them.
pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["taehv", "taew2_1", "taew2_2", "taecvx", "taehv1_5", "taeltx", "taew2_1_super", "taehv1_5_super"]
# Run in full: one per distinct network and frame rule (taehv is taew2_1's network; taehv1_5 is taew2_2 at 32 ch).
RUN = ["taew2_1", "taew2_2", "taecvx", "taeltx", "taew2_1_super"]


def assert_same(actual: torch.Tensor, expected: torch.Tensor):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def _import(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref(shared):
    return _import(shared / "reference" / "taehv.py", "reference_taehv")


@pytest.fixture(scope="module")
def ref_sdv(shared):
    return _import(shared / "reference" / "taesdv.py", "reference_taesdv")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights at unit gain (default init shrinks activations towards 0), decoder output centred in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
        model.decoder[-1].bias += 0.5  # so few outputs sit on the clamp, where any error would hide
    return model.eval()


@pytest.fixture(scope="module")
def pair(ref, tmp_path_factory):
    """Factory: (ours, reference, checkpoint path) for a variant name, sharing one random state dict (strict loads)."""
    made = {}

    def make(name):
        if name not in made:
            ours = randomize(TAEHV(variant_config(name)), seed=len(made))
            path = tmp_path_factory.mktemp(name) / f"{name}.pth"
            torch.save(ours.state_dict(), path)
            made[name] = ours, ref.TAEHV(checkpoint_path=str(path)).eval(), path
        return made[name]

    return make


def size(cfg: TAEHVConfig) -> tuple[int, int]:
    return 2 * cfg.spatial_factor, 3 * cfg.spatial_factor  # 2x3 latents: small, and H != W catches a swap


def push_all(stream, x: torch.Tensor, sizes=(1, 2, 3)) -> torch.Tensor:
    """Pushes `x` along time in irregular chunks (cycling `sizes`, an empty push first), then flushes."""
    out, t = [stream.push(x[:, :0])], 0
    for n in itertools.cycle(sizes):
        if t >= x.shape[1]:
            break
        out.append(stream.push(x[:, t:t + n]))
        t += n
    return torch.cat(out + [stream.flush()], 1)


@pytest.mark.parametrize("name", RUN[:-1])  # the super variants differ in the decoder only
@torch.no_grad()
def test_encode_matches_reference(pair, ref, name):
    ours, theirs, _ = pair(name)
    cfg = ours.config
    assert (cfg.t_downscale, cfg.patch_size, cfg.latent_channels) == (theirs.t_downscale, theirs.patch_size,
                                                                       theirs.latent_channels)
    t = cfg.t_downscale
    g = torch.Generator().manual_seed(1)
    for n_frames in (1, t, t + 1, 2 * t - 1):  # a whole number of latents or not: the tail repeats the last frame
        x = torch.rand(2, n_frames, 3, *size(cfg), generator=g)
        expected = theirs.encode_video(x, parallel=True, show_progress_bar=False)
        assert expected.shape[1] == cfg.latent_frames(n_frames)
        assert_same(ours.encode(x), expected)
        assert_same(theirs.encode_video(x, parallel=False, show_progress_bar=False), expected)
        assert_same(ours.encode(x, chunk=3), expected)
        assert_same(push_all(ours.stream_encoder(), x), expected)
        stream = ref.StreamingTAEHV(theirs)
        latents = [z for z in (stream.encode(f) for f in x.split(1, 1)) if z is not None] + stream.flush_encoder()
        assert_same(torch.cat(latents, 1), expected)


@pytest.mark.parametrize("name", RUN)
@torch.no_grad()
def test_decode_matches_reference(pair, ref, name):
    ours, theirs, _ = pair(name)
    cfg = ours.config
    assert cfg.t_upscale == theirs.t_upscale
    h, w = size(cfg)
    g = torch.Generator().manual_seed(2)
    for n_latents in (1, 2, 3):  # even and odd: taecvx trims only odd counts
        z = torch.randn(2, n_latents, cfg.latent_channels, h // cfg.spatial_factor, w // cfg.spatial_factor,
                        generator=g)
        expected = theirs.decode_video(z, parallel=True, show_progress_bar=False)
        assert expected.shape == (2, cfg.decoded_frames(n_latents), 3, h, w)
        assert 0.05 < expected.mean() < 0.95 and expected.std() > 0.05  # not stuck on the clamp
        assert_same(ours.decode(z), expected)
        assert_same(theirs.decode_video(z, parallel=False, show_progress_bar=False), expected)
        assert_same(ours.decode(z, chunk=2), expected)
        assert_same(push_all(ours.stream_decoder(n_latents), z, sizes=(1,)), expected)
        # The reference's StreamingTAEHV, which does not know the clip length (taecvx then never trims).
        stream, frames = ref.StreamingTAEHV(theirs), []
        frame = stream.decode(z)
        while frame is not None:
            frames.append(frame)
            frame = stream.decode()
        assert_same(push_all(ours.stream_decoder(), z, sizes=(2, 1)), torch.cat(frames + stream.flush_decoder(), 1))


@pytest.mark.parametrize("name", ["taew2_2", "taew2_1_super"])
@torch.no_grad()
def test_preview_decoder_without_time_upscale_matches_reference(pair, ref, name):
    """With TGrow off the loader keeps the last trained frame of each, as the reference does."""
    _, _, path = pair(name)
    off = (False, False, False)
    ours = load_taehv(path, replace(variant_config(name), decoder_time_upscale=off))
    theirs = ref.TAEHV(checkpoint_path=str(path), decoder_time_upscale=off).eval()
    cfg = ours.config
    z = torch.randn(1, 3, cfg.latent_channels, 2, 3, generator=torch.Generator().manual_seed(3))
    expected = theirs.decode_video(z, show_progress_bar=False)
    assert expected.shape[1] == cfg.decoded_frames(3) == 3
    assert_same(ours.decode(z), expected)


@pytest.mark.parametrize("name", NAMES)
def test_variant_table_matches_reference_name_rules(ref, monkeypatch, name):
    """Our config for each name builds the network the reference builds for that file name (shapes only, on meta)."""
    cfg = variant_config(name)
    with torch.device("meta"):
        sd = TAEHV(cfg).state_dict()
        monkeypatch.setattr(torch, "load", lambda *args, **kwargs: dict(sd))
        theirs = ref.TAEHV(checkpoint_path=f"{name}.pth")  # its strict load checks every key and shape
    assert (theirs.patch_size, theirs.latent_channels, theirs.t_downscale, theirs.t_upscale, theirs.is_cogvideox) == \
        (cfg.patch_size, cfg.latent_channels, cfg.t_downscale, cfg.t_upscale, cfg.cogvideox_trim)
    assert theirs.frames_to_trim == cfg.frames_to_trim(1)


@pytest.mark.parametrize("name", NAMES)
def test_config_inferred_from_checkpoint_shapes(name):
    with torch.device("meta"):  # shapes are all it reads
        sd = TAEHV(variant_config(name)).state_dict()
    assert config_from_state_dict(sd, f"{name}.safetensors") == variant_config(name)
    assert config_from_state_dict(sd, "renamed.pth") == replace(variant_config(name), cogvideox_trim=False)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@torch.no_grad()
def test_loader_round_trips(pair, tmp_path, suffix):
    ours, _, _ = pair("taew2_2")
    sd = ours.state_dict()
    path = tmp_path / f"my_taew2_2{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file({k: v.half() for k, v in sd.items()}, str(path))  # published files are often fp16
    loaded = load_taehv(path)
    assert loaded.config == ours.config and not loaded.training
    for key, value in loaded.state_dict().items():
        assert_same(value, sd[key].half().float() if suffix == ".safetensors" else sd[key])


def test_frame_rule():
    wan, cvx, ltx = variant_config("taew2_1"), variant_config("taecvx"), variant_config("taeltx")
    assert [wan.latent_frames(t) for t in (1, 4, 5, 8, 81)] == [1, 1, 2, 2, 21]
    assert [wan.decoded_frames(n) for n in (1, 2, 21)] == [1, 5, 81]
    assert [cvx.decoded_frames(n) for n in (12, 13)] == [48, 49]
    assert cvx.frames_to_trim(None) == 0 and wan.frames_to_trim(None) == 3
    assert (ltx.latent_frames(121), ltx.decoded_frames(16)) == (16, 121)
    assert replace(wan, decoder_time_upscale=(False, False, False)).decoded_frames(21) == 21
    assert [wan.frame_rule(t) for t in (1, 4, 8, 9, 81)] == [(1, 1), (1, 1), (2, 5), (3, 9), (21, 81)]


def test_unsupported_names_refused():
    with pytest.raises(ValueError, match="taeh3"):
        variant_config("taeh3.pth")
    with pytest.raises(ValueError, match="unknown"):
        variant_config("taesd")
    with pytest.raises(ValueError, match="arch"):
        TAEHVConfig(arch="huge")


@torch.no_grad()
def test_stream_state_does_not_grow_with_clip_length():
    model = randomize(TAEHV(TAEHVConfig(encoder_width=8, decoder_widths=(16, 8, 8, 8))), seed=5)
    for stream, x in [(model.stream_encoder(), torch.rand(1, 40, 3, 16, 16)),
                      (model.stream_decoder(), torch.randn(1, 40, 16, 2, 2))]:
        held = []
        for step in x.split(1, 1):
            stream.push(step)
            held.append(sum(s.numel() for s in stream.run.state if s is not None))
        assert max(held[8:]) == max(held[:8]) > 0


@torch.no_grad()
def test_taesdv_matches_reference(ref_sdv, tmp_path):
    ours = randomize(TAESDV(), seed=7)
    path = tmp_path / "taesdv.safetensors"
    save_file(ours.state_dict(), str(path))
    torch.save(ours.state_dict(), tmp_path / "taesdv.pth")
    theirs = ref_sdv.TAESDV(checkpoint_path=str(tmp_path / "taesdv.pth")).eval()
    loaded = load_taesdv(path)
    g = torch.Generator().manual_seed(8)
    x = torch.rand(2, 3, 3, 16, 24, generator=g)
    expected = theirs.encode_video(x)
    assert expected.shape == (2, ours.latent_frames(3), 4, 2, 3)
    assert_same(theirs.encode_video(x, parallel=False), expected)
    for model in (ours, loaded):
        assert_same(model.encode(x), expected)
        assert_same(push_all(model.stream_encoder(), x), expected)
    z = torch.randn(2, 4, 4, 2, 3, generator=g)
    raw = theirs.decode_video(z)
    assert raw.shape[1] == ours.decoded_frames(4) and 0.05 < raw.mean() < 0.95
    assert_same(theirs.decode_video(z, parallel=False), raw)
    assert_same(CausalRunner(ours.decoder)(z), raw)  # before our clamp to [0, 1], which the reference leaves out
    for model in (ours, loaded):
        assert_same(model.decode(z), raw.clamp(0, 1))
        assert_same(push_all(model.stream_decoder(), z), raw.clamp(0, 1))


@pytest.mark.parametrize("name", ["taew2_1", "taesdv"])
@torch.no_grad()
def test_upsampled_convs_run_as_phases_with_tgrow_first(pair, monkeypatch, name):
    """Each decoder stage's nearest-2x upsampling and 3x3 conv run as four 2x2 convs of the source frames
    (`vaecli.banded.upsample_conv`), TAEHV's TGrow between them first, at the source resolution; the numbers are
    the reference's (above, and here against the module-by-module order)."""
    from vaecli import banded

    model = pair(name)[0] if name != "taesdv" else randomize(TAESDV(), seed=7)
    calls = []
    phased = banded.upsample_conv
    monkeypatch.setattr(banded, "upsample_conv", lambda c, x, *a, **k: calls.append(tuple(x.shape)) or
                        phased(c, x, *a, **k))
    cfg = getattr(model, "config", None)
    z = torch.randn(1, 2, cfg.latent_channels if cfg else 4, 2, 3, generator=torch.Generator().manual_seed(4))
    out = CausalRunner(model.decoder)(z)
    widths = cfg.decoder_widths if cfg else (64,) * 4
    time_up = cfg.decoder_time_upscale if cfg else (False,) * 3
    frames, h, w, expected = 2, 2, 3, []
    for i, t in enumerate(time_up):
        frames *= 2 if t else 1
        expected.append((frames, widths[i], h, w))
        h, w = 2 * h, 2 * w
    assert calls == expected

    def plain(x):  # the reference's order: upsample, TGrow, 3x3 conv, module by module
        runner = CausalRunner(model.decoder)
        monkeypatch.setattr(banded, "phased", lambda up, conv: False)
        try:
            return runner(x)
        finally:
            monkeypatch.undo()
    assert_same(out, plain(z))


@pytest.mark.parametrize("name", RUN + ["taesdv"])
@torch.no_grad()
def test_tiles_equal_whole_frames(name):
    """Tile by tile through the clip (`vaecli.clip_tiles`, every layer kept between the parts in scratch files):
    encode and decode equal the streamed whole frames to 1e-5, frame rule and startup trim included; with a third of
    the computed halo they do not (the test would see a halo too small)."""
    from vaecli import clip_tiles
    from vaecli.models import taehv, taesdv
    from vaecli.scratch import Scratch

    if name == "taesdv":
        model, family, t = randomize(TAESDV(width=8), seed=3), taesdv.Family, 1
    else:  # narrow: the tiles' numbers do not depend on the widths, the test's time does
        cfg = replace(variant_config(name), encoder_width=8, decoder_widths=(16, 8, 8, 8))
        model, family, t = randomize(TAEHV(cfg), seed=3), taehv.Family, cfg.t_downscale
    enc, dec = family.encoder_split(model), family.decoder_split(model, 2)
    # Tiles just past the halo, four to a side: the middle ones touch neither edge.
    tile_px, tile_cells = (math.ceil(enc.halo / enc.align) + 1) * enc.align, math.ceil(dec.halo) + 1
    h = 3 * tile_px + enc.align
    torch.manual_seed(9)
    frames = torch.rand(t + 2, 3, h, h + enc.align)  # frames past 1 + t * k: one dropped (taesdv: none)
    stream = family.encoder(model)
    first = stream.push(frames)
    rest, dropped = stream.flush()
    whole = torch.cat([first, rest])
    assert family.chunks(model, frames.shape[0])[-1][1] == frames.shape[0] - dropped
    cells = 3 * tile_cells + 1
    z = torch.randn(whole.shape[0], whole.shape[1], cells, cells + 2)
    pixels = family.decoder(model, z.shape[0]).push(z)
    assert pixels.shape[0] == sum(family.frame_counts(model, z.shape[0]))
    results = {}
    for third in (False, True):
        store = Scratch(0, torch.device("cpu"))
        spool = clip_tiles.Spool(store)
        spool.push(frames[:2])
        spool.push(frames[2:])
        e = replace(enc, halo=enc.halo / 3) if third else enc
        d = replace(dec, halo=dec.halo / 3) if third else dec
        got = clip_tiles.encode(e, spool, family.chunks(model, frames.shape[0]), tile_px, store)
        back = torch.cat(list(clip_tiles.decode(d, lambda i, j: z[i:j], z.shape[0],
                                                family.frame_counts(model, z.shape[0]), tile_cells, store)))
        assert store.peak_file_bytes > 0
        spool.close()
        store.close()
        results[third] = ((got - whole).abs().max().item(), (back - pixels).abs().max().item())
    assert max(results[False]) <= 1e-5
    assert min(results[True]) > 1e-3
