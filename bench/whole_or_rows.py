"""Bench: the tiny models' two exact CPU paths, whole image vs row bands, as a `vae` command meets them: first call.

A command encodes or decodes an image once, in a fresh process, so what counts is the first call: every whole-image
activation is then memory the process has never touched, which the kernel faults in (and, with huge pages, zeroes
and compacts) layer after layer; row bands reuse a few windows. For each dtype, half and size, taef2 (the real
weights in ../shared/weights) runs `Codec.encode_raw` / `decode_raw` in a fresh process per measurement (huge pages
as in the CLI, the default memory budget) under `--tile auto` (what the command does: whole while the widest
activation is at most `vaecli.models.tiny.WHOLE_ACTIVATION_BYTES`, else row bands) and `--tile off` (whole), rounds
interleaved. Per case: the path auto took, first-call and second-call seconds (best and median), the first call's
system (page-fault) seconds, the process's peak RSS, and auto's first call over off's.
bf16 runs only where oneDNN has bf16 kernels (AVX-512 or AVX-NE-CONVERT).
Run: `python bench/whole_or_rows.py [--dtypes fp32 bf16] [--sizes 512 768 1024] [--rounds 3] [--json out.json]`.
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


def child(dtype: str, half: str, size: int, tile: str) -> dict:
    """One measurement in this (fresh) process."""
    import resource
    import time

    from vaecli import allocator

    allocator.huge_pages()  # before torch's first allocation, as the CLI does
    import torch

    from vaecli.codec import load_codec

    codec = load_codec("taef2", dtype=dtype, tile="auto" if tile == "auto" else None)
    gen = torch.Generator().manual_seed(size)
    f, c = codec.spec.spatial_factor, codec.spec.latent_channels
    if half == "encode":
        x = torch.rand(1, 3, size, size, generator=gen)
    else:
        x = torch.randn(1, c, size // f, size // f, generator=gen)
    x = x.to(codec.dtype).contiguous(memory_format=torch.channels_last)
    pixels = size * size
    path = "rows" if codec.tile_size(pixels) else "whole"
    with torch.inference_mode():
        run = (lambda: codec.encode_raw(x, False, None)) if half == "encode" else (lambda: codec.decode_raw(x))
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        run()
        second = time.perf_counter() - t0
    return {"path": path, "first": first, "second": second, "first_sys": r1.ru_stime - r0.ru_stime,
            "peak_mb": r1.ru_maxrss / 1024}


def summary(dtype: str, half: str, size: int, runs: dict[str, list[dict]]) -> dict:
    out = {"dtype": dtype, "half": half, "size": size, "auto_path": runs["auto"][0]["path"]}
    for tile, rs in runs.items():
        for key in ("first", "second"):
            vals = [r[key] for r in rs]
            out[f"{tile}_{key}"] = {"best": min(vals), "median": statistics.median(vals)}
        out[f"{tile}_first_sys_median"] = statistics.median(r["first_sys"] for r in rs)
        out[f"{tile}_peak_mb"] = max(r["peak_mb"] for r in rs)
    out["auto_over_off_first_median"] = out["auto_first"]["median"] / out["off_first"]["median"]
    return out


def table(results: list[dict]) -> str:
    lines = ["| case | auto path | auto first s best / median | off (whole) first s best / median | "
             "auto / off (median) | first-call sys s auto / off | second call s auto / off (median) | "
             "peak MB auto / off |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        a, o = r["auto_first"], r["off_first"]
        lines.append(
            f"| {r['dtype']} {r['half']} {r['size']} | {r['auto_path']} | {a['best']:.3f} / {a['median']:.3f} | "
            f"{o['best']:.3f} / {o['median']:.3f} | {r['auto_over_off_first_median']:.2f} | "
            f"{r['auto_first_sys_median']:.2f} / {r['off_first_sys_median']:.2f} | "
            f"{r['auto_second']['median']:.3f} / {r['off_second']['median']:.3f} | "
            f"{r['auto_peak_mb']:.0f} / {r['off_peak_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 768, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # a child process: dtype half size tile
    args = parser.parse_args()
    if args.one:
        dtype, half, size, tile = args.one
        print(json.dumps(child(dtype, half, int(size), tile)))
        return
    from bench.pixel_time import bf16_kernels

    dtypes = [d for d in args.dtypes if d == "fp32" or bf16_kernels()]
    cases = [(d, h, s) for d in dtypes for h in ("encode", "decode") for s in args.sizes]
    runs: dict = {case: {"auto": [], "off": []} for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            for tile in ("auto", "off"):
                proc = subprocess.run([sys.executable, __file__, "--one", *map(str, case), tile], capture_output=True,
                                      text=True, check=True)
                runs[case][tile].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = [summary(*case, r) for case, r in runs.items()]
    from bench.memory import machine as cpu

    machine = cpu()
    print(f"machine: {json.dumps(machine)}")
    print(table(results))
    out = {"bench": "whole_or_rows", "machine": machine, "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
