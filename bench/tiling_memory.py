"""Bench: peak RSS and time of `vae decode` for taef2 latents of growing image size, whole processes.

With `--tile auto` (default) a decode past the budget streams row bands: memory follows the image's width, not its
area, and a 4096x4096 decode should stay under 1.5 GB. `--tiles auto 512 off` also runs each size with forced
512-pixel tiles and whole (`off`, only up to 2048: whole 4096x4096 activations take ~17 GB), interleaved per size.
`--huge` adds the 8192x8192 case (several minutes). Run: `python bench/tiling_memory.py [--huge] [--tiles ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from bench.video_memory import peak_rss_mb  # noqa: E402
from vaecli import latents, media  # noqa: E402
from vaecli.codec import load_codec  # noqa: E402


def make_latent(path: Path, side: int) -> None:
    """A taef2 latent for a `side` x `side` image: astronaut.png's latent, enlarged."""
    codec = load_codec("taef2", roles=("encoder",), device="cpu")
    x, info = media.read_image(SHARED / "images" / "astronaut.png")
    latent, meta = codec.encode_image(x, info.size)
    big = F.interpolate(latent[None], size=(side // 8, side // 8), mode="bilinear", align_corners=False)[0]
    latents.save_safetensors(path, big.contiguous(), {**meta, "image_size": [side, side]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--huge", action="store_true", help="also decode an 8192x8192 image")
    parser.add_argument("--tiles", nargs="+", default=["auto"], help="--tile values to run each size with")
    args = parser.parse_args()
    os.environ.setdefault("VAE_WEIGHTS_DIR", str(SHARED / "weights"))
    vae = str(Path(sys.executable).with_name("vae"))
    sides = [1024, 2048, 4096] + ([8192] if args.huge else [])
    results = {}
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            lat = Path(tmp) / f"{side}.latent"
            make_latent(lat, side)
            for tile in args.tiles:
                if tile == "off" and side > 2048:
                    continue
                rss, secs = peak_rss_mb([vae, "decode", str(lat), "-o", str(Path(tmp) / f"{side}.png"), "--tile",
                                         tile])
                results[f"{side} --tile {tile}"] = {"peak_rss_mb": round(rss, 1), "seconds": round(secs, 1)}
                print(f"taef2 decode {side}x{side} --tile {tile:4}: peak RSS {rss:7.1f} MB  {secs:6.1f} s",
                      flush=True)
    print(json.dumps({"bench": "tiling_memory", "results": results}))


if __name__ == "__main__":
    main()
