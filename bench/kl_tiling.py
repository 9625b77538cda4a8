"""Bench: exact KL decodes under a memory budget vs untiled, and diffusers' blended tiling.

For each image side (default 1024 and 2048; `--with-4096` adds 4096), sd15 configuration with seeded random weights
(diffusers' layout, saved once and loaded by each run), fp32 on the CPU, one random latent of side/8 x side/8:

- vaecli untiled (`tile=None`: the whole-image banded path): decode seconds and peak RSS;
- vaecli under `--max-memory` (default 2GB; layer by layer, whole layers past the budget in scratch files): decode
  seconds, peak RSS, scratch bytes at their peak, RAM bytes of whole layers, and the max difference from untiled;
- diffusers `enable_tiling()` at SD 1.5's tile settings (512-pixel tiles, 25% overlap, blended): decode seconds,
  peak RSS and the max difference from vaecli's untiled decode (itself within ~1e-5 of diffusers' untiled one).

Each run is a fresh child process (`--child`), reporting its decode time (model load excluded) and its peak RSS
(VmHWM from /proc/self/status: the child's own high-water mark, model and interpreter included); outputs go to
.npy files the parent compares. `--encode` measures encodes of a random image the same way (no diffusers side).
`--seams` adds the old 512x512 check: vaecli's and diffusers' 256-pixel tiles against their own untiled decodes.

Run: `python bench/kl_tiling.py [--sides 1024 2048] [--with-4096] [--max-memory 2GB] [--encode] [--seams]`.
On 2 cores a 2048 decode takes several minutes per run (three runs per side).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD15_TILE = 512  # diffusers' SD 1.5 VAE config: sample_size 512 (tile_sample_min_size), overlap factor 0.25


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(args) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    gen = torch.Generator().manual_seed(args.side)  # the same latent/image in every child, whatever loading draws
    result: dict = {}
    if args.child == "diffusers":
        from diffusers import AutoencoderKL

        ref = AutoencoderKL.from_pretrained(args.weights).eval()
        ref.enable_tiling()
        ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = SD15_TILE, SD15_TILE // 8, 0.25
        z = torch.randn(1, 4, args.side // 8, args.side // 8, generator=gen)
        with torch.inference_mode():
            t = time.perf_counter()
            out = ((ref.decode(z).sample + 1) / 2).clamp(0, 1)
            result["seconds"] = time.perf_counter() - t
    else:
        from vaecli import tiling
        from vaecli.codec import load_codec

        budget = tiling.parse_size(args.budget) if args.budget else 0
        codec = load_codec("sd15", weights=[Path(args.weights)], device="cpu", tile="auto" if budget else None,
                           budget=budget, scratch=args.scratch)
        with torch.inference_mode():
            if args.child == "encode":
                x = torch.rand(1, 3, args.side, args.side, generator=gen).contiguous(memory_format=torch.channels_last)
                t = time.perf_counter()
                out = codec.encode_raw(x, False, None)
            else:
                z = torch.randn(1, 4, args.side // 8, args.side // 8, generator=gen)
                z = z.contiguous(memory_format=torch.channels_last)
                t = time.perf_counter()
                out = codec.decode_raw(z)
            result["seconds"] = time.perf_counter() - t
        result["stats"] = tiling.last_stats() if budget else {}
    np.save(args.out, out.float().numpy())
    result["peak_rss_mb"] = vm_hwm_mb()
    print(json.dumps(result))


def run_child(kind: str, side: int, weights: Path, out: Path, budget: str | None = None,
              scratch: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--side", str(side), "--weights", str(weights), "--out", str(out)]
    if budget:
        cmd += ["--budget", budget]
    if scratch:
        cmd += ["--scratch", scratch]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} {side} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["command_seconds"] = time.perf_counter() - t
    return result


def diff(a: Path, b: Path) -> tuple[float, float]:
    """Max and mean absolute difference of two saved outputs."""
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    worst, total = 0.0, 0.0
    for r in range(0, x.shape[2], 256):
        d = np.abs(x[:, :, r:r + 256] - y[:, :, r:r + 256])
        worst, total = max(worst, float(d.max())), total + float(d.sum(dtype=np.float64))
    return worst, total / x.size


def seams(ref) -> dict:
    from vaecli.checkpoints import kl_state_dict
    from vaecli.codec import build_model
    from vaecli.families import family
    from vaecli.registry import REGISTRY

    spec = REGISTRY["sd15"]
    ours = build_model(spec).eval()
    ours.load_state_dict(kl_state_dict(ref.state_dict(), 4, "bench"))
    ours = ours.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    z = torch.randn(1, 4, 64, 64)
    zl = z.contiguous(memory_format=torch.channels_last)
    whole = family(spec)(spec, ours, torch.device("cpu"), torch.float32, tile=None).decode_raw(zl)
    tiled = family(spec)(spec, ours, torch.device("cpu"), torch.float32, tile=256).decode_raw(zl)
    ref_whole = ((ref.decode(z).sample + 1) / 2).clamp(0, 1)
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 256, 32
    ref_tiled = ((ref.decode(z).sample + 1) / 2).clamp(0, 1)
    ref.disable_tiling()
    return {"vaecli_max_abs_diff": (tiled - whole).abs().max().item(),
            "diffusers_max_abs_diff": (ref_tiled - ref_whole).abs().max().item(),
            "diffusers_mean_abs_diff": (ref_tiled - ref_whole).abs().mean().item()}


def bench_side(side: int, weights: Path, tmp: Path, args) -> dict:
    kind = "encode" if args.encode else "decode"
    files = {name: tmp / f"{kind}{side}_{name}.npy" for name in ("untiled", "budget", "diffusers")}
    row: dict = {}
    # Past --untiled-max the untiled run would not fit this machine's RAM (sd15 at 4096 px: ~32 GB): the budget
    # run is compared per pixel with the largest untiled side instead.
    whole = side <= args.untiled_max
    if whole:
        row["untiled"] = u = run_child(kind, side, weights, files["untiled"])
        print(f"{kind} {side}x{side} untiled:        {u['seconds']:7.1f} s  peak RSS {u['peak_rss_mb']:7.0f} MB",
              flush=True)
    row["budget"] = b = run_child(kind, side, weights, files["budget"], args.max_memory, args.scratch)
    st = b.get("stats", {})
    b["us_per_pixel"] = b["seconds"] / side ** 2 * 1e6
    if whole:
        b["max_abs_diff"] = diff(files["budget"], files["untiled"])[0]
        versus = f"{b['seconds'] / u['seconds']:.2f}x untiled  max diff {b['max_abs_diff']:.1e}"
    else:
        versus = f"{b['us_per_pixel']:.1f} us/pixel (untiled not run: over --untiled-max)"
    print(f"{kind} {side}x{side} --max-memory {args.max_memory}: {b['seconds']:7.1f} s  peak RSS "
          f"{b['peak_rss_mb']:7.0f} MB  scratch {st.get('scratch_bytes', 0) / 2**20:7.0f} MB  layers in RAM "
          f"{st.get('ram_bytes', 0) / 2**20:6.0f} MB  ({st.get('path') or 'fits: untiled'})  {versus}", flush=True)
    if whole and not args.encode and not args.skip_diffusers:
        row["diffusers_tiled"] = d = run_child("diffusers", side, weights, files["diffusers"])
        d["max_abs_diff"], d["mean_abs_diff"] = diff(files["diffusers"], files["untiled"])
        print(f"{kind} {side}x{side} diffusers enable_tiling(): {d['seconds']:7.1f} s  peak RSS "
              f"{d['peak_rss_mb']:7.0f} MB  {d['seconds'] / u['seconds']:.2f}x untiled  diff from untiled max "
              f"{d['max_abs_diff']:.3f} mean {d['mean_abs_diff']:.4f}", flush=True)
    for f in files.values():
        f.unlink(missing_ok=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 2048], help="image sides")
    parser.add_argument("--with-4096", action="store_true", help="also 4096x4096 (long: tens of minutes)")
    parser.add_argument("--max-memory", default="2GB", help="budget of the tiled runs (default 2GB)")
    parser.add_argument("--scratch", default=None, help="scratch folder of the tiled runs (default: system temp)")
    parser.add_argument("--untiled-max", type=int, default=2048,
                        help="largest side run untiled and with diffusers (default 2048: 4096 needs ~32 GB)")
    parser.add_argument("--encode", action="store_true", help="measure encodes instead of decodes")
    parser.add_argument("--skip-diffusers", action="store_true", help="no diffusers enable_tiling() runs")
    parser.add_argument("--seams", action="store_true", help="also the 512x512 seam check (vaecli vs diffusers)")
    parser.add_argument("--child", choices=["decode", "encode", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--budget", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from tests.conftest import diffusers_kl

    sides = args.sides + ([4096] if args.with_4096 and 4096 not in args.sides else [])
    result: dict = {"bench": "kl_tiling", "machine": f"{platform.machine()} {os.cpu_count()} cores",
                    "torch_threads": torch.get_num_threads(), "max_memory": args.max_memory, "time": time.time()}
    ref = diffusers_kl("sd15")
    if args.seams:
        with torch.inference_mode():
            result["seams_512"] = s = seams(ref)
        print(f"512x512 in 4 tiles, max abs diff from untiled: vaecli {s['vaecli_max_abs_diff']:.2e}, diffusers "
              f"enable_tiling {s['diffusers_max_abs_diff']:.2e} (mean {s['diffusers_mean_abs_diff']:.2e})",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "sd15"
        ref.save_pretrained(weights)
        del ref
        result["sides"] = {side: bench_side(side, weights, Path(tmp), args) for side in sides}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
