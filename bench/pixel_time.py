"""Bench: time per pixel of the tiny models from 512 to 2048 px, on the path the `vae` command takes for each size.

For each dtype (a fresh process each: loading a bf16 tiny codec changes the process's allocator settings), taef2 (the
real weights in ../shared/weights) is loaded as the `vae` command loads it (`load_codec`, `--tile auto`, the default
memory budget, huge pages), and `Codec.encode_raw` / `decode_raw` run on seeded random inputs at each size: whole
where the activations fit the budget, in row bands past it (`vaecli/rows.py`). Sizes are interleaved round by
round (one warm-up each). Per case: the path, best and median seconds, and the time per pixel relative to the
smallest size's (best; medians in brackets); the issue's target is within 1.10 up to 2048.
bf16 runs only where oneDNN has bf16 kernels (AVX-512 or AVX-NE-CONVERT): elsewhere torch's own bf16 convolutions
are several times slower than fp32 and the figure would say nothing about the streaming.
Run: `python bench/pixel_time.py [--dtypes fp32 bf16] [--sizes 512 1024 2048] [--rounds 3] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(dtype: str, sizes: list[int], n_rounds: int) -> list[dict]:
    """Each half at each size in this process, sizes interleaved round by round."""
    from vaecli import allocator

    allocator.huge_pages()  # before torch's first allocation, as the CLI does
    import torch

    from bench.speed import rounds
    from vaecli.codec import load_codec

    codec = load_codec("taef2", dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    f, c = codec.spec.spatial_factor, codec.spec.latent_channels
    results = []
    with torch.inference_mode():
        for half in ("encode", "decode"):
            fns, paths = {}, {}
            for size in sizes:
                shape = (1, 3, size, size) if half == "encode" else (1, c, size // f, size // f)
                x = (torch.rand(shape, generator=gen) if half == "encode" else torch.randn(shape, generator=gen))
                x = x.to(codec.dtype).contiguous(memory_format=torch.channels_last)
                fns[size] = ((lambda x=x: codec.encode_raw(x, False, None)) if half == "encode"
                             else (lambda x=x: codec.decode_raw(x)), 1)
                paths[size] = "rows" if codec.tile_size(size * size) else "whole"
            times = rounds(fns, n_rounds)
            base = sizes[0]
            for size in sizes:
                best, med = min(times[size]), statistics.median(times[size])
                scale = (size / base) ** 2
                results.append({"model": "taef2", "dtype": dtype, "half": half, "size": size, "path": paths[size],
                                "best": best, "median": med,
                                "per_pixel_vs_first": best / min(times[base]) / scale,
                                "per_pixel_vs_first_median": med / statistics.median(times[base]) / scale})
    return results


def bf16_kernels() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", choices=["fp32", "bf16"], help=argparse.SUPPRESS)  # a child process's dtype
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.sizes, args.rounds)))
        return
    results = []
    for dtype in args.dtypes:
        if dtype == "bf16" and not bf16_kernels():
            print("bf16 skipped: this CPU has no oneDNN bf16 kernels", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--one", dtype, "--rounds", str(args.rounds), "--sizes",
               *map(str, args.sizes)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results += json.loads(out.strip().splitlines()[-1])
    print("| case | path | s best / median | time per pixel vs the first size (median) |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| taef2 {r['dtype']} {r['half']} {r['size']} | {r['path']} | {r['best']:.3f} / {r['median']:.3f} | "
              f"{r['per_pixel_vs_first']:.2f} ({r['per_pixel_vs_first_median']:.2f}) |")
    if args.json:
        args.json.write_text(json.dumps({"bench": "pixel_time", "results": results}, indent=1))


if __name__ == "__main__":
    main()
