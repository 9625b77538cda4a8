"""Bench: 32 images of 512x512 encoded with taef2 in one `vae encode` vs 32 separate invocations,
and the wall time of `vae --help` (torch must not be imported for it).

Run: `python bench/batch_throughput.py [--n 32]` (needs ../shared). Targets: one invocation >= 2.5x the
images/s of separate ones; `vae --help` under 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def timed(cmd: list[str]) -> float:
    """Wall seconds of one command (which must succeed)."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("VAE_WEIGHTS_DIR", str(SHARED / "weights"))
    vae = str(Path(sys.executable).with_name("vae"))
    help_times = [timed([vae, "--help"]) for _ in range(5)]
    print(f"vae --help: median {statistics.median(help_times):.3f} s (target < 0.3 s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        src.mkdir()
        names = sorted(p for p in (SHARED / "images").iterdir() if p.suffix in (".png", ".jpg"))
        for i in range(args.n):
            img = Image.open(names[i % len(names)]).convert("RGB").resize((512, 512))
            img.save(src / f"img{i:03d}.png")
        one = timed([vae, "encode", str(src), "-o", str(Path(tmp) / "one"), "--quiet"])
        separate = sum(timed([vae, "encode", str(p), "-o", str(Path(tmp) / "sep" / (p.stem + ".latent"))])
                       for p in sorted(src.iterdir()))
    rate_one, rate_sep = args.n / one, args.n / separate
    print(f"one invocation:   {one:7.1f} s  {rate_one:6.2f} images/s")
    print(f"{args.n} invocations: {separate:7.1f} s  {rate_sep:6.2f} images/s")
    print(f"speed-up: {rate_one / rate_sep:.2f}x (target >= 2.5x)")
    print(json.dumps({"bench": "batch_throughput", "n": args.n, "help_s": round(statistics.median(help_times), 3),
                      "one_s": round(one, 2), "separate_s": round(separate, 2),
                      "speedup": round(rate_one / rate_sep, 2)}))


if __name__ == "__main__":
    main()
