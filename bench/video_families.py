"""Bench: the causal video models stream in flat memory: `vae video` / `vae decode` peak RSS and time for 33 vs 129
frames, and diffusers' Wan VAE on the same clip (whole clip, and with its own tiling: the difference blending makes).

Models: wan2.1 (production widths, seeded random weights, diffusers folder) and taew2_1 (production widths, seeded
random weights). The clip is pan_motorcycle.mp4 scaled to `--size` and looped to the frame counts by the bundled
ffmpeg (libx264 crf 18). Each command runs in a fresh process (peak RSS of its process tree, `bench.svd.measured`);
diffusers runs in a child script that encodes the whole clip at once (`AutoencoderKLWan.encode`) and, with
`enable_tiling()`, again, reporting its peak RSS, time, and the max difference of the tiled posterior mean from the
whole one and of vaecli's latents from the whole one.

With `--max-memory 2GB ...` each command runs again under those budgets (Wan frames past one go tile by tile):
peak RSS, time, and the latents' max difference from the default run's.

Run: `python bench/video_families.py [--size 320x192] [--frames 33 129] [--models wan2.1 taew2_1] [--no-diffusers]
[--rounds 3] [--max-memory 2GB]`
(needs ../shared; the wan2.1 runs take minutes each on 2 cores; diffusers tiles only past 256 px, so its
blending shows at sizes above that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import imageio_ffmpeg
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from bench.svd import machine, measured  # noqa: E402

FLAT = 0.05  # the bound on peak RSS growth from 33 to 129 frames

DIFFUSERS_SCRIPT = """\
import json, resource, sys, time
import torch
from diffusers import AutoencoderKLWan
from vaecli import video
from vaecli.latents import load_latent

folder, clip, n, ours = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
vae = AutoencoderKLWan.from_pretrained(folder).eval()
_, stream = video.read_frames(clip, limit=n)
x = torch.stack([p for _, p in stream]).movedim(0, 1)[None] * 2 - 1
out = {}
with torch.inference_mode():
    t = time.perf_counter()
    whole = vae.encode(x).latent_dist.mean
    out["whole_s"] = time.perf_counter() - t
    out["whole_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    vae.enable_tiling()
    t = time.perf_counter()
    tiled = vae.encode(x).latent_dist.mean
    out["tiled_s"] = time.perf_counter() - t
    out["tiled_vs_whole"] = (tiled - whole).abs().max().item()
    latent, meta = load_latent(ours)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    raw = latent * std + mean
    out["vaecli_vs_whole"] = (raw - whole[0].movedim(1, 0)).abs().max().item()
print(json.dumps(out))
"""


def make_clip(tmp: Path, size: tuple[int, int], frames: int) -> Path:
    """pan_motorcycle.mp4 scaled to `size` and looped to `frames` frames."""
    out = tmp / f"clip{frames}.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-stream_loop", "-1", "-i",
                    str(SHARED / "video" / "pan_motorcycle.mp4"), "-vf", f"scale={size[0]}:{size[1]}", "-frames:v",
                    str(frames), "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p", str(out), "-y"], check=True)
    return out


def make_weights(tmp: Path) -> dict[str, Path]:
    """Seeded random production-width weights: a diffusers folder for wan2.1, a .pth for taew2_1."""
    from diffusers import AutoencoderKLWan

    from vaecli.models.taehv import TAEHV
    from vaecli.registry import REGISTRY

    torch.manual_seed(0)
    AutoencoderKLWan().eval().save_pretrained(tmp / "wan21")
    tiny = TAEHV(REGISTRY["taew2_1"].config)
    with torch.no_grad():
        for p in tiny.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    torch.save(tiny.state_dict(), tmp / "taew2_1.pth")
    return {"wan2.1": tmp / "wan21", "taew2_1": tmp / "taew2_1.pth"}


def budgeted(results: dict, vae: str, model: str, weights: Path, clip: Path, lat: Path, n: int, budget: str,
             tmp: Path) -> None:
    """`vae video` and `vae decode` of the same clip under `--max-memory budget` (frames past it go tile by tile):
    peak RSS, time, and how far the latents are from the default run's."""
    from vaecli.latents import load_latent

    out = tmp / f"{model}{n}_{budget}.latent"
    rss, secs = measured([vae, "video", str(clip), "-o", str(out), "--model", model, "--weights", str(weights),
                          "--max-memory", budget, "-q"], tmp / "out.txt")
    diff = (load_latent(out)[0] - load_latent(lat)[0]).abs().max().item()
    results[f"{model} video {n} max-memory {budget}"] = {"peak_rss_mb": rss, "seconds": secs, "max_diff": diff}
    print(f"{model:8} video  {n:4} frames --max-memory {budget}: {secs:7.1f} s  peak RSS {rss:7.0f} MB  latents vs "
          f"default max diff {diff:.1e}", flush=True)
    rss, secs = measured([vae, "decode", str(lat), "-o", str(tmp / f"{model}{n}_{budget}.mp4"), "--weights",
                          str(weights), "--max-memory", budget, "-q"], tmp / "out.txt")
    results[f"{model} decode {n} max-memory {budget}"] = {"peak_rss_mb": rss, "seconds": secs}
    print(f"{model:8} decode {n:4} frames --max-memory {budget}: {secs:7.1f} s  peak RSS {rss:7.0f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="320x192")
    parser.add_argument("--frames", type=int, nargs="+", default=[33, 129])
    parser.add_argument("--models", nargs="+", default=["taew2_1", "wan2.1"])
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds of every length; medians and bests are reported (peak RSS varies "
                             "by a few percent from run to run with the threads' timing)")
    parser.add_argument("--max-memory", nargs="*", default=[],
                        help="also run each command under these budgets (e.g. 2GB): peak RSS, time, and the max "
                             "difference of the latents from the default run's")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    vae = str(Path(sys.executable).with_name("vae"))
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch {m['torch']}", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = make_weights(tmp)
        clips = {n: make_clip(tmp, size, n) for n in args.frames}
        for model in args.models:
            runs: dict[str, list[tuple[float, float]]] = {}
            for rnd in range(args.rounds):  # interleaved: every length once per round, so drift hits all alike
                for n, clip in clips.items():
                    lat = tmp / f"{model}{n}.latent"
                    lat.unlink(missing_ok=True)
                    runs.setdefault(f"{model} video {n}", []).append(measured(
                        [vae, "video", str(clip), "-o", str(lat), "--model", model, "--weights", str(weights[model]),
                         "-q"], tmp / "out.txt"))
                    mp4 = tmp / f"{model}{n}.mp4"
                    mp4.unlink(missing_ok=True)
                    runs.setdefault(f"{model} decode {n}", []).append(measured(
                        [vae, "decode", str(lat), "-o", str(mp4), "--weights", str(weights[model]), "-q"],
                        tmp / "out.txt"))
                    for cmd in ("video", "decode"):
                        rss, secs = runs[f"{model} {cmd} {n}"][-1]
                        print(f"{model:8} {cmd:6} {n:4} frames {size[0]}x{size[1]} round {rnd + 1}: {secs:7.1f} s  "
                              f"peak RSS {rss:7.0f} MB", flush=True)
                    if rnd == 0:
                        for budget in args.max_memory:
                            budgeted(results, vae, model, weights[model], clip, lat, n, budget, tmp)
            for key, rs in runs.items():
                rss = sorted(r for r, _ in rs)
                secs = sorted(t for _, t in rs)
                results[key] = {"peak_rss_mb": statistics.median(rss), "best_peak_rss_mb": rss[0],
                                "seconds": statistics.median(secs), "best_seconds": secs[0], "rounds": rs}
            lo, hi = min(args.frames), max(args.frames)
            if lo == hi:
                continue
            for cmd in ("video", "decode"):
                a, b = results[f"{model} {cmd} {lo}"], results[f"{model} {cmd} {hi}"]
                growth = b["peak_rss_mb"] / a["peak_rss_mb"] - 1
                results[f"{model} {cmd} growth"] = growth
                print(f"{model:8} {cmd:6} median peak RSS {lo} -> {hi} frames: {a['peak_rss_mb']:.0f} -> "
                      f"{b['peak_rss_mb']:.0f} MB, {growth:+.1%} ({'flat' if growth <= FLAT else 'NOT flat'} within "
                      f"{FLAT:.0%}); best {a['best_peak_rss_mb']:.0f} -> {b['best_peak_rss_mb']:.0f} MB; median time "
                      f"{a['seconds']:.1f} -> {b['seconds']:.1f} s", flush=True)
        if not args.no_diffusers and "wan2.1" in args.models:
            for n, clip in clips.items():
                script = tmp / "diffusers_wan.py"
                script.write_text(DIFFUSERS_SCRIPT)
                out = subprocess.run([sys.executable, str(script), str(weights["wan2.1"]), str(clip), str(n),
                                      str(tmp / f"wan2.1{n}.latent")], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[f"diffusers wan2.1 encode {n}"] = r
                print(f"diffusers wan2.1 encode {n} frames: whole {r['whole_s']:.1f} s (peak RSS "
                      f"{r['whole_peak_mb']:.0f} MB), enable_tiling() {r['tiled_s']:.1f} s, tiled vs whole max diff "
                      f"{r['tiled_vs_whole']:.2e}; vaecli (streamed) vs whole {r['vaecli_vs_whole']:.2e}", flush=True)
    print(json.dumps({"bench": "video_families", "machine": m, "size": list(size), "results": results}))


if __name__ == "__main__":
    main()
