"""KL mid-block attention: exact softmax attention over every position at every size, in bounded memory."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vaecli.models import kl

TOL = 1e-5


def qkv(batch: int, heads: int, n: int, c: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random (B, heads, N, C) queries, keys and values; queries scaled up so each attends to few keys."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, c, generator=g) * s for s in (2.0, 1.0, 1.0))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(C)) v in float64: queries (B, heads, n, C), k, v (B, heads, M, C) -> (B, heads, n, C)."""
    q, k, v = (t.double() for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.fixture
def chunks(monkeypatch):
    """Records the scores each scaled_dot_product_attention call holds (B x heads x queries x keys, in bytes)."""
    sizes: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        sizes.append(4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(kl.F, "scaled_dot_product_attention", spy)
    return sizes


def test_chunked_attention_equals_full_attention(monkeypatch, chunks):
    """4,096 positions, batch and heads > 1, in 14 query chunks (the last one short), against the whole N x N."""
    q, k, v = qkv(2, 2, 4096, 8, seed=0)
    monkeypatch.setattr(kl, "SCORE_BYTES", 4 * 2 * 2 * 4096 * 300)  # 300 queries at a time
    with torch.inference_mode():
        out = kl.attention(q, k, v)
    assert len(chunks) == 14 and max(chunks) <= kl.SCORE_BYTES
    assert out.shape == q.shape and (out - reference(q, k, v)).abs().max().item() <= TOL


def test_attention_is_exact_past_65536_positions(chunks):
    """70,000 positions (the old limit was 65,536) in query chunks: sampled output rows against float64 rows."""
    q, k, v = qkv(1, 1, 70_000, 8, seed=1)
    with torch.inference_mode():
        out = kl.attention(q, k, v)
    assert len(chunks) > 1 and max(chunks) <= kl.SCORE_BYTES
    rows = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(2))[:300]
    expected = reference(q[:, :, rows], k, v)
    assert (out[:, :, rows] - expected).abs().max().item() <= TOL
    # The tolerance has teeth: dropping half the keys (as any pooling or subsampling does) moves the rows far more.
    assert (reference(q[:, :, rows], k[:, :, ::2], v[:, :, ::2]) - expected).abs().max().item() > 100 * TOL


def test_attention_is_exact_at_262144_positions(chunks):
    """262,144 positions (a 4096x4096 image at f=8): sampled queries against all keys, in several chunks.

    Query rows are independent, so these rows are what the full run computes for them; the full N x N run itself
    (7e10 scores) takes minutes on a small CPU, which bench/kl_attention.py measures instead.
    """
    q, k, v = qkv(1, 1, 1 << 18, 4, seed=3)
    rows = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(4))[:600]
    with torch.inference_mode():
        out = kl.attention(q[:, :, rows], k, v)
    assert len(chunks) == 3 and max(chunks) <= kl.SCORE_BYTES  # 256 queries x 262,144 keys each
    assert (out - reference(q[:, :, rows], k, v)).abs().max().item() <= TOL


def test_decoder_past_65536_latent_positions_matches_diffusers(monkeypatch, tmp_path):
    """A 258x256 latent (66,048 positions) through a user's decode (load_codec, banded CPU path) vs diffusers' untiled
    decode, on a small-width KL configuration with seeded random weights."""
    from diffusers import AutoencoderKL

    from vaecli import banded, codec, latents
    from vaecli.registry import REGISTRY, KLConfig

    mult = (1, 1)
    spec = dataclasses.replace(REGISTRY["sd15"], name="kl-attn-test",
                               config=KLConfig(latent_channels=4, channels=32, channel_mult=mult, num_res_blocks=1))
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    torch.manual_seed(0)
    n = len(mult)
    ref = AutoencoderKL(block_out_channels=(32,) * n, layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    with torch.no_grad():  # non-trivial GroupNorm affines, so a swapped norm would show
        for key, p in ref.named_parameters():
            if "norm" in key:
                p.add_(torch.randn_like(p) * 0.1)
    ref.eval().save_pretrained(tmp_path / "vae")

    runs = []
    run_chain = banded.run_chain
    monkeypatch.setattr(banded, "run_chain", lambda *a: runs.append(1) or run_chain(*a))
    c = codec.load_codec(spec.name, [tmp_path / "vae"], roles=("decoder",), device="cpu")
    z = torch.randn(4, 258, 256)
    f = spec.spatial_factor
    meta = latents.make_metadata(spec, (256 * f, 258 * f), (0, 0, 0, 0), "fp32", space="raw")
    ours = c.decode_latent(z, meta)
    assert runs == [1]  # the banded CPU path, with the mid-block attention run whole at latent resolution
    with torch.inference_mode():
        expected = ((ref.decode(z[None]).sample + 1) / 2).clamp(0, 1)
    assert ours.shape == expected.shape == (1, 3, 258 * f, 256 * f)
    assert (ours - expected).abs().max().item() <= 1e-4
