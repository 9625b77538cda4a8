"""Bench: exact mid-block attention in sd15-configuration decodes, and its share of the decode time.

Each size is decoded in a fresh process through the user's path (`load_codec`, `decode_latent`) with seeded random
weights at production widths: wall time, peak RSS, and the time spent in the decoder's AttnBlock (norm, projections
and attention) and in `attention` alone (softmax attention over all h*w latent positions, in query chunks).
Run: `python bench/kl_attention.py [--sizes 2048 3072 4096]` (minutes per size on 2 cores; 4096 px, 262,144
positions, takes the longest).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.video_memory import peak_rss_mb  # noqa: E402
from vaecli import latents  # noqa: E402
from vaecli.codec import build_model, load_codec  # noqa: E402
from vaecli.models import kl  # noqa: E402
from vaecli.registry import REGISTRY  # noqa: E402
from vaecli.tiling import parse_size  # noqa: E402


def save_weights(path: Path) -> None:
    """The sd15 decoder with seeded random weights (GroupNorm affines moved off 1 and 0), in LDM key names."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(REGISTRY["sd15"], encoder=False)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:
                p.add_(torch.randn_like(p) * 0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def child(side: int, weights: Path, out: Path, budget: int) -> None:
    """Decode a random side x side sd15 latent (`budget`: activation bytes, 0 for the default) and write its timings
    to `out` as JSON."""
    spec = REGISTRY["sd15"]
    codec = load_codec("sd15", [weights], roles=("decoder",), device="cpu", budget=budget)
    spent = {"block": 0.0, "attention": 0.0}
    attention = kl.attention

    def timed(q, k, v):
        t = time.perf_counter()
        y = attention(q, k, v)
        spent["attention"] += time.perf_counter() - t
        return y

    kl.attention = timed  # AttnBlock looks it up at call time
    start: list[float] = []
    block = codec.model.decoder.mid.attn_1
    block.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
    block.register_forward_hook(lambda *_: spent.__setitem__("block", spent["block"] + time.perf_counter() - start[-1]))
    f = spec.spatial_factor
    torch.manual_seed(side)
    z = torch.randn(4, side // f, side // f)
    meta = latents.make_metadata(spec, (side, side), (0, 0, 0, 0), "fp32", space="raw")
    t = time.perf_counter()
    pixels = codec.decode_latent(z, meta)
    total = time.perf_counter() - t
    assert pixels.shape == (1, 3, side, side) and torch.isfinite(pixels).all()
    out.write_text(json.dumps({"decode_s": total, "attn_block_s": spent["block"], "attention_s": spent["attention"],
                               "positions": (side // f) ** 2, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 3072, 4096], help="image sides in pixels")
    parser.add_argument("--max-memory", default="0", help="activation budget as `vae --max-memory` takes it (default: "
                        "half the available RAM); the attention runs whole either way")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.weights, args.out, parse_size(args.max_memory))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "sd15_decoder.safetensors"
        save_weights(weights)
        print(f"{'image':>11} {'positions':>9} {'decode s':>9} {'attn block s':>12} {'attention s':>11} {'share':>6} "
              f"{'peak RSS MB':>11}", flush=True)
        for side in args.sizes:
            out = Path(tmp) / f"{side}.json"
            rss, wall = peak_rss_mb([sys.executable, __file__, "--child", str(side), "--weights", str(weights),
                                     "--out", str(out), "--max-memory", args.max_memory])
            r = json.loads(out.read_text())
            r.update(peak_rss_mb=round(rss, 1), wall_s=round(wall, 1), attn_share=r["attn_block_s"] / r["decode_s"])
            results[side] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
            print(f"{side:>5}x{side:<5} {r['positions']:>9,} {r['decode_s']:>9.1f} {r['attn_block_s']:>12.1f} "
                  f"{r['attention_s']:>11.1f} {r['attn_share']:>6.0%} {rss:>11.0f}", flush=True)
    print(json.dumps({"bench": "kl_attention", "model": "sd15", "max_memory": args.max_memory, "results": results,
                      "time": time.time()}))


if __name__ == "__main__":
    main()
