"""Bench: images/s of `vae encode` with the local engine vs `--engine ray` on this machine (a local Ray instance).

Ray cases: 2 workers of 1 CPU, 1 worker of 2 CPUs. Each is one whole invocation, so Ray's start-up (instance,
actors, model loads) is counted in images/s; the steady rate is taken from when the JSON records arrive
(records after the first, over the time from the first to the last).
Run: `python bench/ray_throughput.py [--n 64]` (needs ../shared and `pip install 'vaecli[ray]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, seconds to the first record, steady records/s) of one `vae ... --json` command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stamps = [time.perf_counter() - t for _ in proc.stdout]
    if proc.wait() != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    wall = time.perf_counter() - t
    return wall, stamps[0], (len(stamps) - 1) / max(1e-9, stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("VAE_WEIGHTS_DIR", str(SHARED / "weights"))
    vae = str(Path(sys.executable).with_name("vae"))
    cases = {"local": [], "ray 2x1cpu": ["--engine", "ray", "--workers", "2", "--shard-size", "4"],
             "ray 1x2cpu": ["--engine", "ray", "--workers", "1", "--cpus-per-worker", "2", "--shard-size", "4"]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        photos = sorted(p for p in (SHARED / "images").iterdir() if p.suffix in (".png", ".jpg"))
        src = Path(tmp) / "images"
        src.mkdir()
        for i in range(args.n):
            Image.open(photos[i % len(photos)]).convert("RGB").resize((512, 512)).save(src / f"img{i:03d}.png")
        for name, extra in cases.items():
            wall, first, steady = timed([vae, "encode", str(src), "-o", str(Path(tmp) / name), *extra])
            results[name] = {"seconds": round(wall, 2), "images_per_s": round(args.n / wall, 3),
                             "first_record_s": round(first, 2), "steady_images_per_s": round(steady, 3)}
            print(f"{name:11s} {args.n} images: {wall:6.1f} s  {args.n / wall:5.2f} images/s  first after "
                  f"{first:5.1f} s, then {steady:5.2f} images/s", flush=True)
    print(json.dumps({"bench": "ray_throughput", "n": args.n, **results}))


if __name__ == "__main__":
    main()
