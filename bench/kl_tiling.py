"""Bench: exact KL tiling vs diffusers' blended tiling, and the peak memory of tiled sd15 decodes.

1. sd15 configuration (seeded random weights), a 512x512 decode in 4+ tiles: max abs difference from the untiled
   decode, for vaecli (`--tile 256`: GroupNorm statistics of the whole image) and for diffusers'
   `enable_tiling()` (256-pixel tiles normalised separately, then blended), each against its own untiled result.
2. Peak RSS of `vae decode` of sd15 latents for 1024x1024 and 2048x2048 images with `--max-memory 2GB`
   (each in a fresh process): with exact tiling it follows the budget, not the image (target: 2048 < 3 GB).
Run: `python bench/kl_tiling.py [--skip-memory]` (the 2048 decode takes several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.video_memory import peak_rss_mb  # noqa: E402
from tests.conftest import diffusers_kl  # noqa: E402
from vaecli import latents  # noqa: E402
from vaecli.checkpoints import kl_state_dict  # noqa: E402
from vaecli.codec import Codec, build_model  # noqa: E402
from vaecli.registry import REGISTRY  # noqa: E402


def seams(ref) -> dict:
    spec = REGISTRY["sd15"]
    ours = build_model(spec).eval()
    ours.load_state_dict(kl_state_dict(ref.state_dict(), 4, "bench"))
    ours = ours.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    z = torch.randn(1, 4, 64, 64)
    zl = z.contiguous(memory_format=torch.channels_last)
    whole = Codec(spec, ours, torch.device("cpu"), torch.float32, tile=None)._decode_raw(zl)
    tiled = Codec(spec, ours, torch.device("cpu"), torch.float32, tile=256)._decode_raw(zl)
    ref_whole = ((ref.decode(z).sample + 1) / 2).clamp(0, 1)
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 256, 32
    ref_tiled = ((ref.decode(z).sample + 1) / 2).clamp(0, 1)
    return {"vaecli_max_abs_diff": (tiled - whole).abs().max().item(),
            "diffusers_max_abs_diff": (ref_tiled - ref_whole).abs().max().item(),
            "diffusers_mean_abs_diff": (ref_tiled - ref_whole).abs().mean().item()}


def memory(ref, sides: list[int]) -> dict:
    vae = str(Path(sys.executable).with_name("vae"))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(Path(tmp) / "sd15")
        for side in sides:
            torch.manual_seed(side)
            meta = latents.make_metadata(REGISTRY["sd15"], (side, side), (0, 0, 0, 0), "fp32")
            lat = Path(tmp) / f"{side}.latent"
            latents.save_safetensors(lat, torch.randn(4, side // 8, side // 8), meta)
            rss, secs = peak_rss_mb([vae, "decode", str(lat), "-o", str(Path(tmp) / f"{side}.png"), "--weights",
                                     str(Path(tmp) / "sd15"), "--max-memory", "2GB"])
            out[side] = {"peak_rss_mb": round(rss, 1), "seconds": round(secs, 1)}
            print(f"sd15 decode {side}x{side} --max-memory 2GB: peak RSS {rss:7.1f} MB  {secs:6.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-memory", action="store_true", help="only the seam comparison")
    parser.add_argument("--skip-seams", action="store_true", help="only the memory runs")
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 2048], help="image sides for the memory runs")
    args = parser.parse_args()
    ref = diffusers_kl("sd15")
    result = {}
    if not args.skip_seams:
        with torch.inference_mode():
            result["seams_512"] = s = seams(ref)
        print(f"512x512 in 4 tiles, max abs diff from untiled: vaecli {s['vaecli_max_abs_diff']:.2e}, diffusers "
              f"enable_tiling {s['diffusers_max_abs_diff']:.2e} (mean {s['diffusers_mean_abs_diff']:.2e})",
              flush=True)
        ref.disable_tiling()
    if not args.skip_memory:
        result["memory"] = memory(ref, args.sides)
    print(json.dumps({"bench": "kl_tiling", **result}))


if __name__ == "__main__":
    main()
