"""Exact tiling: tiled and untiled results agree; budgets pick tiles; seams are verified."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vaecli import layerwise, rows, tiling
from vaecli.codec import load_codec
from vaecli.errors import UsageError
from vaecli.latents import load_latent
from vaecli.registry import REGISTRY


def test_retina_tiled_equals_untiled(vae, real_weights, shared_images, tmp_path):
    """Real weights on a real photo (a 707x707 crop of retina.jpg: 3 encoder and 4 decoder tiles per axis, and the
    padding of a size that is no multiple of 8): tiles give the untiled numbers."""
    retina = tmp_path / "retina.png"
    Image.open(shared_images / "retina.jpg").convert("RGB").crop((352, 352, 1059, 1059)).save(retina)
    assert vae("encode", retina, "-o", tmp_path / "whole.latent", "--tile", "off").exit_code == 0
    assert vae("encode", retina, "-o", tmp_path / "tiled.latent", "--tile", "256").exit_code == 0
    whole, _ = load_latent(tmp_path / "whole.latent")
    tiled, _ = load_latent(tmp_path / "tiled.latent")
    assert whole.shape == tiled.shape == (32, 89, 89)
    assert (whole - tiled).abs().max().item() <= 1e-5

    assert vae("decode", tmp_path / "whole.latent", "-o", tmp_path / "whole.png", "--tile", "off").exit_code == 0
    result = vae("decode", tmp_path / "whole.latent", "-o", tmp_path / "tiled.png", "--tile", "192", "--verify",
                 "--json")
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)["verify"]
    assert check["tiled"] is True and check["max_abs_diff"] <= 1e-5
    a = np.asarray(Image.open(tmp_path / "whole.png"))
    b = np.asarray(Image.open(tmp_path / "tiled.png"))
    assert a.shape == b.shape == (707, 707, 3)
    assert np.array_equal(a, b)


def test_memory_budget_chooses_tiles(real_weights, shared_images):
    from vaecli import media

    x, info = media.read_image(shared_images / "chelsea.png")
    whole = load_codec("taef2", device="cpu", tile=None)
    small = load_codec("taef2", device="cpu", budget=48 << 20)
    assert whole.tile_size(300 * 451) is None
    tile = small.tile_size(304 * 456)
    assert tile is not None and tile % 8 == 0 and tile < 300
    latent, meta = whole.encode_image(x, info.size)
    tiled_latent, _ = small.encode_image(x, info.size)
    assert (latent - tiled_latent).abs().max().item() <= 1e-5
    y, y_tiled = whole.decode_latent(latent, meta), small.decode_latent(latent, meta)
    # 1e-5, not 1/255: a decoder halo two latent cells short is 7.6e-4 off here, well within 1/255.
    assert (y - y_tiled).abs().max().item() <= 1e-5
    check = small.verify_tiling(latent, meta, y_tiled)
    assert check["tiled"] and check["max_abs_diff"] <= 1e-5 and check["psnr"] > 60


def test_verify_line_and_max_memory_option(vae, real_weights, small_image, tmp_path):
    lat = tmp_path / "s.latent"
    assert vae("encode", small_image, "-o", lat).exit_code == 0
    result = vae("decode", lat, "-o", tmp_path / "s.png", "--tile", "16", "--verify")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip().startswith(f"{lat} -> {tmp_path / 's.png'}  taef2 61x45  verify: max diff ")
    result = vae("decode", lat, "-o", tmp_path / "t.png", "--verify")
    assert result.stderr.strip().endswith("verify: not tiled")
    result = vae("decode", lat, "-o", tmp_path / "u.png", "--max-memory", "lots")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --max-memory lots: expected a size like 2GB, 512MB or 1.5GiB"
    result = vae("decode", lat, "-o", tmp_path / "u.png", "--max-memory", "")  # was taken as the default
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --max-memory '': expected a size like 2GB, 512MB or 1.5GiB"


def test_tile_option_errors(vae, kl_files, small_image, tmp_path):
    for value in ("big", "\u00b2"):  # '²' passes str.isdigit() but is no number
        result = vae("encode", small_image, "--tile", value)
        assert result.exit_code == 2
        assert result.stderr.strip() == f"Error: --tile {value}: expected auto, off or a tile size in pixels"
    result = vae("encode", small_image, "--max-memory", "0")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: --max-memory 0: expected a size of at least 1 byte, like 2GB, 512MB "
                                     "or 1.5GiB")
    result = vae("video", small_image, "--chunk", "\u00b2")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --chunk \u00b2: expected auto or a number of frames from 1 to 100000"
    svd = kl_files("svd")["diffusers"]
    assert vae("encode", small_image, "-o", tmp_path / "x.latent", "--model", "svd", "--weights", svd,
               "--tile", "32").exit_code == 0  # its encoder is a 2-D one: tiled like the others
    result = vae("decode", tmp_path / "x.latent", "--weights", svd, "--tile", "256")
    assert result.exit_code == 1  # decode loads each latent's model lazily: the error is that input's
    assert result.stderr.strip() == (f"Error: {tmp_path / 'x.latent'}: --tile 256: svd's temporal decoder tiles "
                                     "over frames (--chunk), not space")


def test_receptive_radius_of_tiny_segments():
    from vaecli.models.tiny import TinyAutoencoder

    model = TinyAutoencoder(REGISTRY["taef2"].config)
    local_enc, _ = model.encoder_segments()
    _, local_dec = model.decoder_segments()
    # decoder tail in latent cells: 0.5 + 4.5 + 0.25 + 2.25 + 0.125 + 0.5
    assert tiling.receptive_radius(local_dec) == pytest.approx(8.125)
    assert tiling.receptive_radius(local_enc) >= 65  # pixels; stride-2 convs counted conservatively
    sana = TinyAutoencoder(REGISTRY["taesana"].config, decoder=False)
    assert tiling.receptive_radius(sana.encoder_segments()[0]) > tiling.receptive_radius(local_enc)


@pytest.mark.parametrize("text, value", [("2GB", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("100", 100),
                                         ("2tib", 2 << 40)])
def test_parse_size(text, value):
    assert tiling.parse_size(text) == value


def test_tiled_helper_matches_whole_for_a_conv_stack():
    torch.manual_seed(0)
    stack = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Upsample(scale_factor=2),
                                torch.nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(1, 3, 37, 29)
    with torch.no_grad():
        whole = stack(x)
        parts = tiling.tiled(stack, x, 8, tiling.receptive_radius(stack), 2)
    assert parts.shape == whole.shape
    assert (parts - whole).abs().max().item() <= 1e-5
    with pytest.raises(UsageError):
        tiling.resolve_tile("0")


@pytest.mark.parametrize("name", ["taesd", "taef2", "taesana"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_row_stream_equals_the_whole_image(name, dtype, batch, monkeypatch):
    """The local layers streamed band by band of rows (any band, stride-2 stems, odd sizes, the decoders' upsampled
    convs as 2x2 phases) give the whole image's numbers: exactly in fp32 (oneDNN for every band, however small),
    to rounding in bf16. One image: each layer writes its rows into the next one's window (and the last into the
    output); a batch: each layer's rows are copied in. A single small whole image goes through oneDNN too (torch
    would take it through its own convolution, 2e-6 off a band's)."""
    from vaecli import fused
    from vaecli.models.tiny import TinyAutoencoder, row_stream

    written = []  # convolutions written into the next layer's window or the output
    real = fused.conv_into
    monkeypatch.setattr(fused, "conv_into", lambda *a, **k: written.append(1) or real(*a, **k))

    spec = REGISTRY[name]
    torch.manual_seed(0)
    model = TinyAutoencoder(spec.config, decoder=name != "taesana").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(dtype).to(memory_format=torch.channels_last)
    f = spec.spatial_factor
    tol = 0.0 if dtype == torch.float32 else 1e-2
    with torch.inference_mode():
        x = torch.rand(batch, 3, 9 * f, 5 * f).to(dtype).contiguous(memory_format=torch.channels_last)
        local, _ = model.encoder_segments()
        whole = local(x)
        for band in (1, 3, f + 1, 10_000):
            out = rows.run(row_stream(local), x, band, 1 / f)
            assert out.shape == whole.shape and (out.float() - whole.float()).abs().max().item() <= tol
        if model.decoder is not None:
            head, local = model.decoder_segments()
            h = head(torch.randn(batch, spec.latent_channels, 7, 5).to(dtype))
            whole = local(h)
            for band in (1, 2, 5, 10_000):
                out = rows.run(row_stream(local), h, band, f)
                assert out.shape == whole.shape and (out.float() - whole.float()).abs().max().item() <= tol
            if spec.config.midblock_gn:  # taef2's GroupNorm blocks need the whole image: they run before the rows
                with pytest.raises(ValueError, match="no row stream for Block"):
                    row_stream(head[3:])
        assert bool(written) == (batch == 1 and fused.onednn(x))


def test_past_the_budget_tiny_models_stream_rows_and_tile_only_when_asked(real_weights, shared_images, monkeypatch):
    """--tile auto past the budget streams rows (no tiles run, same numbers); --tile N runs tiles."""
    from vaecli import media

    x, info = media.read_image(shared_images / "chelsea.png")
    whole = load_codec("taef2", device="cpu", tile=None)
    small = load_codec("taef2", device="cpu", budget=48 << 20)
    forced = load_codec("taef2", device="cpu", tile=128)
    latent, meta = whole.encode_image(x, info.size)
    y = whole.decode_latent(latent, meta)
    calls, bands = [], []
    real, run = tiling.tiled, rows.run
    monkeypatch.setattr(tiling, "tiled", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(rows, "run", lambda chain, x, band, *a: bands.append((x.shape[-1], band)) or
                        run(chain, x, band, *a))
    streamed, _ = small.encode_image(x, info.size)
    assert (streamed - latent).abs().max().item() <= 1e-5
    assert (small.decode_latent(latent, meta) - y).abs().max().item() <= 1e-5
    assert calls == []
    # Bands of 1 MB (the floor: a 64th of 48 MB is less), 64 fp32 channels wide: the encoder's at the image's width,
    # the decoder's at the latent's, 8x8 pixels each.
    (w_enc, b_enc), (w_dec, b_dec) = bands
    assert b_enc == (1 << 20) // (256 * w_enc) and b_dec == max(1, (1 << 20) // (256 * w_dec * 64))
    assert (forced.decode_latent(latent, meta) - y).abs().max().item() <= 1e-5 and calls == [1]


def test_row_bands_take_16_mb_or_a_64th_of_the_budget():
    """A band holds at most 16 MB of the widest layer's rows, less under a small budget (a 64th), 1 MB at least,
    and one row however wide the image."""
    assert rows.band_rows(1024, 256) == rows.band_rows(1024, 256, budget=1 << 30) == 64
    assert rows.band_rows(1024, 256, budget=256 << 20) == 16
    assert rows.band_rows(1024, 256, budget=16 << 20) == rows.band_rows(1024, 256, budget=1) == 4
    assert rows.band_rows(128, 256, 8, budget=256 << 20) == 2  # decoders: 8x the rows and width at the widest layer
    assert rows.band_rows(1 << 20, 256) == 1


def test_cpu_images_stream_rows_past_a_64_mb_activation_whatever_the_budget(real_weights, monkeypatch):
    """On the CPU, --tile auto runs a pass whole only while its widest activation (64 channels over its pixels) is
    at most 64 MB, however large the budget; video passes pack frames up to that; a smaller budget still rules;
    --tile off stays whole. The streamed image has the whole image's numbers."""
    from vaecli.models import tiny

    assert tiny.WHOLE_ACTIVATION_BYTES == 64 << 20
    fp32 = load_codec("taef2", device="cpu", budget=8 << 30)
    bf16 = load_codec("taef2", device="cpu", dtype="bf16", budget=8 << 30)
    assert fp32.tile_size(512 * 512) is None and fp32.tile_size(512 * 513) is not None  # 256 bytes a pixel
    assert bf16.tile_size(724 * 724) is None and bf16.tile_size(725 * 725) is not None  # 128 bytes a pixel
    assert fp32.tile_size(256 * 256, batch=4) is None and fp32.tile_size(256 * 256, batch=5) is not None
    assert fp32.frames_per_pass((512, 288)) == 1 and bf16.frames_per_pass((512, 288)) == 3
    assert load_codec("taef2", device="cpu", budget=48 << 20).tile_size(256 * 256) is not None
    assert load_codec("taef2", device="cpu", tile=None, budget=8 << 30).tile_size(2048 * 2048) is None

    whole = load_codec("taef2", device="cpu", tile=None)
    bands = []
    run = rows.run
    monkeypatch.setattr(rows, "run", lambda chain, x, band, *a: bands.append(band) or run(chain, x, band, *a))
    x = torch.rand(1, 3, 520, 520, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        z = fp32.encode_raw(x, False, None)
        assert bands and torch.equal(z, whole.encode_raw(x, False, None))
        assert torch.equal(fp32.decode_raw(z), whole.decode_raw(z)) and len(bands) == 2


# --- KL family: GroupNorm statistics gathered across tiles, one pass per norm; attention whole, in chunks ---


@pytest.fixture(scope="module")
def sd15():
    """Our sd15 model with seeded random weights (diffusers' layout converted), channels_last as load_codec has it."""
    from tests.conftest import diffusers_kl
    from vaecli.checkpoints import kl_state_dict
    from vaecli.codec import build_model

    model = build_model(REGISTRY["sd15"]).eval()
    model.load_state_dict(kl_state_dict(diffusers_kl("sd15").state_dict(), 4, "test"))
    return model.to(memory_format=torch.channels_last)


def codec_for(model, **kw):
    from vaecli.families import family

    return family(REGISTRY["sd15"])(REGISTRY["sd15"], model, torch.device("cpu"), torch.float32, **kw)


class SpanSpy:
    """Counts the tiles `tiling.tiled` cuts (per axis) and the segment lengths `streamed` runs."""

    def __init__(self, monkeypatch):
        self.tiles, self.segments = [], []
        spans, run = tiling._spans, tiling._run_segment
        monkeypatch.setattr(tiling, "_spans", lambda *a: self.tiles.append(len(spans(*a))) or spans(*a))
        monkeypatch.setattr(tiling, "_run_segment", lambda seg, *a: self.segments.append(len(seg)) or run(seg, *a))


def test_kl_decode_in_tiles_equals_untiled(sd15, monkeypatch):
    """sd15 configuration, 256x256 decoded in 2x2 tiles of 128 pixels at every level: <= 1e-4 from untiled (the
    tiles' direct convolutions against the whole image's Winograd ones)."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, 32, 32).contiguous(memory_format=torch.channels_last)
    spy = SpanSpy(monkeypatch)
    with torch.inference_mode():
        whole = codec_for(sd15, tile=None).decode_raw(z)
        tiled = codec_for(sd15, tile=128).decode_raw(z)
    assert tiled.shape == whole.shape == (1, 3, 256, 256)
    assert (tiled - whole).abs().max().item() <= 1e-4
    assert spy.tiles and min(spy.tiles) >= 2  # every tiled pass cut each axis at least in two: 4+ tiles


def test_kl_small_budget_fuses_segments_and_stays_exact(sd15, monkeypatch):
    """A budget too small to keep full-resolution tensors whole: the codec's KL path runs layer by layer with
    scratch files (no tiles, no segments); the tile path (`streamed_tiles`, for --tile N) runs several blocks per
    segment (more passes) instead. Both exact."""
    torch.manual_seed(1)
    z = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    spy = SpanSpy(monkeypatch)
    small = codec_for(sd15, tile="auto", budget=3 << 20)  # full-resolution tensors are 2 MB each
    with torch.inference_mode():
        whole = codec_for(sd15, tile=None).decode_raw(z)
        assert (small.decode_raw(z) - whole).abs().max().item() <= 1e-4
        stats = tiling.last_stats()
        assert stats["path"] == "layerwise" and stats["scratch_bytes"] > 0 and not spy.segments and not spy.tiles
        ref = codec_for(sd15, tile=None).encode_raw(x, False, None)
        assert (small.encode_raw(x, False, None) - ref).abs().max().item() <= 1e-4
        assert tiling.last_stats()["path"] == "layerwise" and not spy.segments

        head, blocks = sd15.decoder_plan()
        tiles = tiling.streamed_tiles(blocks, head(z), 3 << 20)
        assert max(spy.segments) >= 2 and max(spy.tiles) >= 2
        assert (((tiles + 1) / 2).clamp(0, 1) - whole).abs().max().item() <= 1e-4


def test_stream_norm_pools_statistics_exactly():
    """Uneven tiles, overlapping halos and a large offset between tile means: the same as one GroupNorm."""
    torch.manual_seed(2)
    seq = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.GroupNorm(4, 16),
                              torch.nn.SiLU(), torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.GroupNorm(2, 8))
    x = torch.randn(2, 8, 23, 31) + torch.linspace(0, 50, 31)  # a ramp: tiles have very different means
    with torch.no_grad():
        whole = seq(x)
        parts = tiling.tiled(seq, x, 7, tiling.receptive_radius(seq), 1)
    assert (parts - whole).abs().max().item() <= 1e-4
    assert all(isinstance(m, torch.nn.GroupNorm) for m in (seq[1], seq[4]))  # the stand-ins are put back


def test_attention_in_query_chunks_is_exact(monkeypatch):
    """The block equals a float64 softmax attention whole, in query chunks, and in either memory layout."""
    import math

    import torch.nn.functional as F

    from vaecli.models import kl

    torch.manual_seed(3)
    block = kl.AttnBlock(32).eval()
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        y = block.norm(x).double()
        q, k, v = (F.conv2d(y, m.weight.double(), m.bias.double()).flatten(2).transpose(1, 2)
                   for m in (block.q, block.k, block.v))
        a = (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(32), dim=-1) @ v).transpose(1, 2).reshape(1, 32, 16, 16)
        expected = x.double() + F.conv2d(a, block.proj_out.weight.double(), block.proj_out.bias.double())
        assert (block(x) - expected).abs().max().item() <= 1e-5
        monkeypatch.setattr(kl, "SCORE_BYTES", 4 * 256 * 10)  # 10 queries at a time
        for layout in (torch.contiguous_format, torch.channels_last):
            assert (block(x.contiguous(memory_format=layout)) - expected).abs().max().item() <= 1e-5


def test_kl_cli_tiles_and_verifies(vae, kl_files, small_image, tmp_path):
    weights = kl_files("sd15")["diffusers"]
    lat = tmp_path / "s.latent"
    result = vae("encode", small_image, "-o", lat, "--model", "sd15", "--weights", weights, "--tile", "32")
    assert result.exit_code == 0, result.stderr
    result = vae("decode", lat, "-o", tmp_path / "s.png", "--weights", weights, "--tile", "32", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)["verify"]
    assert check["tiled"] is True and check["window"] == [0, 0, 61, 45] and check["max_abs_diff"] <= 1e-3


def test_default_budget_is_half_the_available_ram_under_the_cap():
    """The tiny family caps its budget at 1 GiB; KL models (cap=None) get half the available RAM."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    cpu = torch.device("cpu")
    assert tiling.default_budget(cpu) == min(tiling.DEFAULT_BUDGET, available // 2)
    assert abs(tiling.default_budget(cpu, cap=None) - available // 2) < 256 << 20  # RAM in use moves a little
    assert tiling.default_budget(cpu, cap=None) > tiling.DEFAULT_BUDGET  # this machine has over 2 GB free


# --- layer by layer out of core: whole layers in RAM or scratch files, every layer computed once ---


class ConvCount:
    """Counts the output elements every 2-D convolution computes (F.conv2d, module convs and the Winograd
    convolutions of the wide layers included)."""

    def __init__(self, monkeypatch):
        import torch.nn.functional as F

        from vaecli import winograd

        self.elements = 0

        def counted(conv):
            def run(*args, **kwargs):
                out = conv(*args, **kwargs)
                self.elements += out.numel()
                return out
            return run

        monkeypatch.setattr(F, "conv2d", counted(F.conv2d))
        monkeypatch.setattr(winograd, "_winograd", counted(winograd._winograd))


def conv_elements(blocks, x) -> int:
    """Output elements of every convolution of `blocks` run whole on `x` (each layer once)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += output.numel()

    handles = [m.register_forward_hook(hook) for b in blocks for m in b.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        torch.nn.Sequential(*blocks)(x.clone())
    finally:
        for handle in handles:
            handle.remove()
    return total


@pytest.mark.parametrize("half, shape, budget", [("decoder", (2, 4, 7, 5), 160 << 10),
                                                 ("decoder", (1, 4, 7, 5), 2 << 20),
                                                 ("encoder", (2, 3, 56, 40), 160 << 10),
                                                 ("encoder", (1, 3, 50, 38), 2 << 20)])
def test_layerwise_out_of_core_equals_untiled(sd15, monkeypatch, half, shape, budget):
    """sd15 configuration, a batch of two, odd sizes: tiny budgets put the layers in scratch files (every layer
    there at 160 KB, some in RAM at 2 MB), a chunk of rows per file call and a few rows per band; each convolution
    runs once (no recomputation); equal to the untiled chain (1e-5 of its range) and to the tile path."""
    torch.manual_seed(4)
    if half == "decoder":
        head, blocks = sd15.decoder_plan()
        x = head(torch.randn(*shape).contiguous(memory_format=torch.channels_last))
    else:
        blocks, _ = sd15.encoder_plan()
        x = (torch.rand(*shape) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        x_before = x.clone()
        whole = torch.nn.Sequential(*blocks)(x.clone())
        expected = conv_elements(blocks, x)
        count, stats = ConvCount(monkeypatch), {}
        out = tiling.streamed(blocks, x, budget, stats=stats)
        assert count.elements == expected  # every layer once, the shortcuts and folded upsamplers included
        assert torch.equal(x, x_before)  # the caller's input is left as it was
        # The tile path cuts tiles aligned to the downsampling: images a multiple of 8, as the codec pads them.
        tiles = tiling.streamed_tiles(blocks, x, 1 << 20) if x.shape[-1] % 8 == 0 else whole
    scale = whole.abs().max().item()
    assert out.shape == whole.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out - whole).abs().max().item() <= 1e-5 * scale
    assert (out - tiles).abs().max().item() <= 1e-5 * scale
    assert stats["path"] == "layerwise" and stats["scratch_bytes"] > 0
    if budget > 1 << 20:
        assert 0 < stats["ram_bytes"] <= budget
    else:
        assert stats["ram_bytes"] == 0
    assert tiling.last_stats() == stats


def test_layerwise_in_ram_matches_banded_and_uses_no_scratch(sd15):
    """With room for every layer, nothing goes to a file and the numbers are the banded untiled run's."""
    from vaecli import banded

    torch.manual_seed(5)
    head, blocks = sd15.decoder_plan()
    with torch.inference_mode():
        x = head(torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last))
        stats = {}
        out = tiling.streamed(blocks, x, 1 << 34, stats=stats)
        ref = banded.run_chain(blocks, x.clone())
    assert stats == {"path": "layerwise", "scratch_bytes": 0, "ram_bytes": stats["ram_bytes"]} and stats["ram_bytes"]
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_layerwise_scratch_folder_and_free_space(sd15, monkeypatch, tmp_path):
    """Scratch files go to `scratch_dir` (unlinked: nothing is left); too little free space there is a clear error
    before any layer runs."""
    import shutil
    import tempfile

    from vaecli.errors import OutputError

    made = []
    real = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: made.append(kw["dir"]) or real(**kw))
    torch.manual_seed(6)
    head, blocks = sd15.decoder_plan()
    with torch.inference_mode():
        x = head(torch.randn(1, 4, 4, 4).contiguous(memory_format=torch.channels_last))
        stats = {}
        tiling.streamed(blocks, x, 256 << 10, scratch_dir=tmp_path, stats=stats)
        assert made and set(map(str, made)) == {str(tmp_path)} and stats["scratch_bytes"] > 0
        assert list(tmp_path.iterdir()) == []

        count = ConvCount(monkeypatch)
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=stats["scratch_bytes"] - 1))
        with pytest.raises(OutputError, match=f"scratch folder {tmp_path}: this needs about"):
            tiling.streamed(blocks, x, 256 << 10, scratch_dir=tmp_path)
        assert count.elements == 0


def test_row_store_files_ram_recast_and_plan():
    """Row stores: a band of rows in and out of RAM or a file, a narrower store over a wider one's bytes, spare
    files reused, and a dry Scratch planning the same peaks as the real one."""
    from vaecli.scratch import RowStore, Scratch

    torch.manual_seed(7)
    x = torch.randn(1, 6, 5, 4).contiguous(memory_format=torch.channels_last)
    real, dry = Scratch(6 * 5 * 4 * 4, torch.device("cpu")), Scratch(6 * 5 * 4 * 4, torch.device("cpu"), dry=True)
    for scratch in (real, dry):
        a = scratch.rows(6, 5, 4, torch.float32)  # fits the budget: RAM
        b = scratch.rows(6, 5, 4, torch.float32)  # past it: a file
        assert not a.in_file and b.in_file
        if not scratch.dry:
            for store in (a, b):
                store.write(0, x[:, :, :2])
                store.write(2, x[:, :, 2:])
                assert torch.equal(store.read(1, 4), x[:, :, 1:4])
                assert store.read(0, 5).is_contiguous(memory_format=torch.channels_last)
            narrow = scratch.recast(b, 3)
            narrow.write(0, x[:, :3, :1])
            assert torch.equal(narrow.read(0, 1), x[:, :3, :1]) and torch.equal(b.read(1, 5), x[:, :, 1:])
            b = narrow
        scratch.release(b)
        c = scratch.rows(4, 5, 4, torch.float32)  # the spare file, reused
        assert c.in_file and scratch.file_bytes == 6 * 5 * 4 * 4
        scratch.release(a)
        scratch.release(c)
    assert (real.peak_file_bytes, real.peak_ram_bytes) == (dry.peak_file_bytes, dry.peak_ram_bytes)
    real.close()
    assert real.file_bytes == 0 and real.in_ram == 0
    wrapped = RowStore.wrap(x)
    wrapped.write(1, torch.zeros(1, 6, 1, 4))
    assert x[:, :, 1].abs().max() == 0  # a wrapped store writes into the tensor itself


def test_gathered_moments_equal_one_group_norm(monkeypatch):
    """Moments gathered over uneven bands of rows and small pieces (a large offset between rows: the spread between
    the parts' means counts) equal the whole image's, as GroupNorm takes them."""
    monkeypatch.setattr(layerwise, "MOMENT_BYTES", 3 * 16 * 29 * 4)  # 3 rows of (29, 16) per kernel call
    torch.manual_seed(8)
    x = (torch.randn(1, 16, 23, 29) + torch.linspace(0, 50, 23).view(1, 1, 23, 1)).contiguous(
        memory_format=torch.channels_last)
    gather = layerwise._Gather(4)
    for r0, r1 in ((0, 5), (5, 6), (6, 23)):
        gather.add(x[:, :, r0:r1])
    n, mean, m2 = gather.moments()
    whole_n, whole_mean, whole_m2 = tiling.group_moments(x.double(), 4)
    assert len(gather.parts) == 2 + 1 + 6 and n == whole_n
    assert torch.allclose(mean, whole_mean, rtol=1e-6) and torch.allclose(m2, whole_m2, rtol=1e-5)
    scale, shift = tiling.norm_affine(torch.nn.GroupNorm(4, 16), (n, mean, m2), 16)
    assert (x.double() * scale + shift - torch.nn.functional.group_norm(x.double(), 4)).abs().max() <= 1e-5


def test_mid_block_in_bands_equals_whole(monkeypatch):
    """A KL mid block past the budget: resnets layer by layer (scratch files at a 1-byte budget), the attention with
    only keys and values whole and 5-row bands of queries; equal to the block run whole (1e-5 of its range)."""
    from vaecli.models.kl import MidBlock

    torch.manual_seed(9)
    mid = MidBlock(64).eval()
    with torch.no_grad():
        for p in mid.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(1, 64, 37, 29).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(layerwise, "CHUNK_BYTES", 64 * 29 * 4 * 5)
    with torch.inference_mode():
        whole = mid(x.clone())
        for budget in (1, 1 << 30):
            stats = {}
            out = layerwise.mid_block(mid, x.clone(), budget, stats=stats)
            assert (out - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()
            assert (stats["scratch_bytes"] > 0) == (budget == 1)
