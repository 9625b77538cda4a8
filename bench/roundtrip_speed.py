"""Bench: `vae roundtrip` as a whole process (what a user waits for) vs the same job written with diffusers.

The job: a 1024x1024 PNG (a shared photo resized) through the taesd layout (diffusers `AutoencoderTiny`,
latent_channels=4, seeded random weights, saved with `save_pretrained` into a temporary folder), fp32 on the CPU,
the reconstruction written as a PNG. Ours: `vae roundtrip img.png -m taesd -w FOLDER -o recon.png` (which also
computes PSNR and SSIM); diffusers: a ~10-line script run by the same python (below, `DIFFUSERS_SCRIPT`). Each
run is a fresh process, timed with its peak RSS by `bench.video_memory.peak_rss_mb`; rounds interleave the two
sides (vae, diffusers, vae, diffusers, ...) after one unmeasured warm-up each, and best and median are reported
(target: ours/diffusers <= 0.6). Neither side gets THP_MEM_ALLOC_ENABLE from here (`vae` sets it for itself).

Also the fixed cost of a `vae` process: `vae --help` (target < 0.3 s), `python -c "import torch"`,
`python -c "import vaecli.cli"`, and a roundtrip of a 64x64 image (imports, weight load, start-up; diffusers' script
on the same image for comparison); and the metrics' share: `vaecli.metrics` PSNR + SSIM (`psnr_ssim` when it
exists) on two 1024x1024 images in this process, as a percentage of the vae roundtrip (target <= 5%).

Run: `python bench/roundtrip_speed.py [--rounds 5] [--photo PATH] [--variant='--tile off' ...]` (needs ../shared for
the photo); a `--variant` adds `vae roundtrip ... ARGS` to the same interleaved rounds, for diagnosis.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from bench.video_memory import peak_rss_mb  # noqa: E402

# diffusers' AutoencoderTiny takes and returns images in [-1, 1] (EncoderTiny adds 1 and halves; DecoderTiny
# doubles and subtracts 1), with unscaled latents between encode and decode, as its docs show.
DIFFUSERS_SCRIPT = """\
import sys
import numpy as np
import torch
from diffusers import AutoencoderTiny
from PIL import Image

folder, src, dst = sys.argv[1:4]
with torch.inference_mode():
    vae = AutoencoderTiny.from_pretrained(folder).eval()
    x = torch.from_numpy(np.asarray(Image.open(src).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    latents = vae.encode(x * 2 - 1).latents
    y = ((vae.decode(latents).sample + 1) / 2).clamp(0, 1)
    Image.fromarray(y[0].permute(1, 2, 0).mul(255).round().byte().numpy()).save(dst)
"""


def stats(values: list[float]) -> dict:
    return {"best": round(min(values), 4), "median": round(statistics.median(values), 4),
            "runs": [round(v, 4) for v in values]}


def interleaved(cmds: dict[str, list[str]], rounds: int, warmup: bool = True) -> dict[str, dict]:
    """Wall seconds and peak RSS of each command, each a fresh process, the commands interleaved round by round."""
    if warmup:
        for cmd in cmds.values():
            peak_rss_mb(cmd)
    secs: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(rounds):
        for name, cmd in cmds.items():
            r, s = peak_rss_mb(cmd)
            secs[name].append(s)
            rss[name].append(r)
    return {k: {**stats(secs[k]), "peak_rss_mb": round(max(rss[k]), 1)} for k in cmds}


def metrics_time(a_path: Path, b_path: Path, rounds: int) -> dict:
    """Seconds of vaecli's PSNR + SSIM on two images, in this process, as `vae roundtrip` computes them."""
    from vaecli import media, metrics

    a, _ = media.read_image(a_path)
    b, _ = media.read_image(b_path)
    fused = getattr(metrics, "psnr_ssim", None)
    fn = (lambda: fused(a, b)) if fused else (lambda: (metrics.psnr(a, b), metrics.ssim(a, b)))
    times = []
    with torch.inference_mode():
        fn()  # warm-up
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return {"api": "psnr_ssim" if fused else "psnr+ssim", **stats(times)}


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
                 platform.processor())
    import diffusers

    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "diffusers": diffusers.__version__, "python": platform.python_version()}


def make_inputs(tmp: Path, photo: Path) -> tuple[Path, Path, Path]:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    folder = tmp / "taesd"
    AutoencoderTiny(latent_channels=4).eval().save_pretrained(folder)
    with Image.open(photo) as img:
        rgb = img.convert("RGB")
        big, tiny = tmp / "img1024.png", tmp / "img64.png"
        rgb.resize((1024, 1024), Image.Resampling.LANCZOS).save(big)
        rgb.resize((64, 64), Image.Resampling.LANCZOS).save(tiny)
    return folder, big, tiny


def line(name: str, r: dict, target: str = "") -> str:
    rss = f"  peak RSS {r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else ""
    return f"{name:38s} best {r['best']:7.3f} s  median {r['median']:7.3f} s{rss}{target}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the 1024x1024 job")
    parser.add_argument("--fixed-rounds", type=int, default=None, help="rounds of the fixed costs (default: 2x)")
    parser.add_argument("--photo", type=Path, default=SHARED / "images" / "astronaut.png")
    parser.add_argument("--variant", action="append", default=[], metavar="ARGS",
                        help="also time `vae roundtrip ... ARGS` in the same rounds, e.g. --variant='--tile off'")
    args = parser.parse_args()
    fixed_rounds = args.fixed_rounds or 2 * args.rounds
    py = sys.executable
    vae = str(Path(py).with_name("vae"))
    started = time.time()
    print(f"# vae roundtrip speed bench, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vae_rtspeed_") as tmp_s:
        tmp = Path(tmp_s)
        folder, big, tiny = make_inputs(tmp, args.photo)
        script = tmp / "diffusers_roundtrip.py"
        script.write_text(DIFFUSERS_SCRIPT)
        ours_out, ref_out = tmp / "recon_vae.png", tmp / "recon_diffusers.png"
        ours_cmd = [vae, "roundtrip", str(big), "-m", "taesd", "-w", str(folder), "-o", str(ours_out)]
        job = interleaved({
            "vae": ours_cmd,
            "diffusers": [py, str(script), str(folder), str(big), str(ref_out)],
            **{f"vae {v}": [*ours_cmd[:-1], str(tmp / f"recon_variant{i}.png"), *shlex.split(v)]
               for i, v in enumerate(args.variant)},
        }, args.rounds)
        a = np.asarray(Image.open(ours_out), dtype=np.int16)
        b = np.asarray(Image.open(ref_out), dtype=np.int16)
        same = {"max_abs_diff_uint8": int(np.abs(a - b).max()), "mean_abs_diff_uint8": float(np.abs(a - b).mean())}
        ratio = {"best": round(job["vae"]["best"] / job["diffusers"]["best"], 3),
                 "median": round(job["vae"]["median"] / job["diffusers"]["median"], 3)}
        print("\n1024x1024 roundtrip, taesd layout fp32 CPU, whole process (rounds interleaved):")
        print(line("vae roundtrip", job["vae"]))
        print(line("diffusers script", job["diffusers"]))
        for v in args.variant:
            r = job[f"vae {v}"]
            print(line(f"vae roundtrip {v}", r, f"  ratio best {r['best'] / job['diffusers']['best']:.3f}"
                       f" median {r['median'] / job['diffusers']['median']:.3f}"))
        print(f"ratio ours/diffusers: best {ratio['best']:.3f}  median {ratio['median']:.3f}  (target <= 0.6)"
              f"  [{'PASS' if ratio['median'] <= 0.6 else 'FAIL'} on medians,"
              f" {'PASS' if ratio['best'] <= 0.6 else 'FAIL'} on bests]")
        print(f"outputs agree: max |diff| {same['max_abs_diff_uint8']}/255, mean {same['mean_abs_diff_uint8']:.4f}",
              flush=True)

        fixed = interleaved({
            "vae --help": [vae, "--help"],
            "python -c 'import torch'": [py, "-c", "import torch"],
            "python -c 'import vaecli.cli'": [py, "-c", "import vaecli.cli"],
            "vae roundtrip 64x64": [vae, "roundtrip", str(tiny), "-m", "taesd", "-w", str(folder), "-o",
                                    str(tmp / "tiny_vae.png")],
            "diffusers script 64x64": [py, str(script), str(folder), str(tiny), str(tmp / "tiny_diffusers.png")],
        }, fixed_rounds)
        print(f"\nfixed cost of a process ({fixed_rounds} interleaved rounds):")
        for name, r in fixed.items():
            target = ""
            if name == "vae --help":
                target = f"  (target < 0.3 s: {'PASS' if r['median'] < 0.3 else 'FAIL'} on median)"
            print(line(name, r, target))
        share_of = fixed["vae roundtrip 64x64"]["median"] / job["vae"]["median"]
        print(f"64x64 roundtrip / 1024x1024 roundtrip (medians): {100 * share_of:.1f}%", flush=True)

        met = metrics_time(big, ours_out, max(fixed_rounds, 5))
    share = {"best": round(100 * met["best"] / job["vae"]["best"], 2),
             "median": round(100 * met["median"] / job["vae"]["median"], 2)}
    print(f"\nmetrics ({met['api']}, 1024x1024, in-process): best {met['best']:.3f} s  median {met['median']:.3f} s;"
          f" {share['best']:.1f}% (best) / {share['median']:.1f}% (median) of the vae roundtrip"
          f"  (target <= 5%: {'PASS' if share['median'] <= 5 else 'FAIL'} on medians)")
    print(json.dumps({"bench": "roundtrip_speed", "machine": machine(), "rounds": args.rounds,
                      "fixed_rounds": fixed_rounds, "photo": str(args.photo),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                      "wall_s": round(time.time() - started, 1), "roundtrip_1024": job, "ratio": ratio,
                      "outputs_agree": same, "fixed_cost": fixed, "tiny_share_pct": round(100 * share_of, 1),
                      "metrics": met, "metrics_share_pct": share}))


if __name__ == "__main__":
    main()
