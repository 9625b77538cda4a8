"""Bench: `vae decode` of an SVD latent clip (whole command, default flags) vs diffusers' whole-clip decode.

The model: diffusers `AutoencoderKLTemporalDecoder` at its production channel widths (block_out_channels
(128, 256, 512, 512), latent 4, layers_per_block 2), seeded random weights with the norms and mix factors nudged
(as tests/conftest.py `diffusers_kl` does), saved with `save_pretrained` into a temporary folder that both sides
load. The input: `vae video` encodes the first `--frames` frames of ../shared/video/pan_motorcycle.mp4 (512x320; the
bundled ffmpeg scales it first when `--size` differs) with that model, unmeasured.

Timed, each a fresh process (wall time, interpreter start-up and weight load included, and the peak RSS of the
process tree from the child rusage of a small probe interpreter, as `bench.video_memory.peak_rss_mb` does, so the
child cannot inherit this process's peak), the two sides interleaved round by round:
- vaecli: `vae decode clip.latent -o DIR --as-frames --weights FOLDER -q --json` (plus --chunk / --max-memory when
  given), which streams the clip through `Codec.decode_stream` (whole-clip GroupNorm statistics, layers past the
  budget in scratch files) and writes DIR/clip/frame_*.png (DIR is removed before each round: vae skips outputs
  that exist);
- diffusers: a short script (`DIFFUSERS_SCRIPT`) that loads the model, reads the latent with
  `vaecli.latents.load_latent`, divides by the scaling factor, runs `decode(z, num_frames=T)` under
  `torch.inference_mode()` and writes the frames as PNGs (the first round also saves them as a float .pt); it
  reports its own load / decode / write seconds.
Targets (issue, 14 frames 512x320 on the CPU): vaecli peak RSS <= 2.5 GB, time <= 0.8x diffusers'.

Then agreement: vaecli's PNG frames vs diffusers' float frames (quantization: ~0.5/255 plus the float difference)
and vs diffusers' PNGs; and an in-process `load_codec('svd', [FOLDER], device='cpu').decode_frames(latent, meta)` vs
diffusers' float frames (target max |diff| <= 1e-4), with that call's seconds.

`--direct` adds a third side, `vae decode` with `VAE_WINOGRAD=0` (oneDNN's direct convolutions everywhere), to
measure what the Winograd convolutions of `vaecli/winograd.py` give.

Run: `python bench/svd.py [--rounds 2] [--frames 14] [--size 512x320] [--chunk N] [--max-memory 2GB] [--quick]
[--direct]`
(needs ../shared). `--quick` is a smoke run (6 frames at 256x160, one round). The default run takes 10-20 minutes
on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CLIP = SHARED / "video" / "pan_motorcycle.mp4"
sys.path.insert(0, str(ROOT))

WIDTHS = (128, 256, 512, 512)
RSS_TARGET_MB = 2500
RATIO_TARGET = 0.8
DIFF_TARGET = 1e-4

DIFFUSERS_SCRIPT = """\
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
import numpy as np
import torch
from diffusers import AutoencoderKLTemporalDecoder
from PIL import Image
from vaecli.latents import load_latent

folder, src, dst = sys.argv[1:4]
float_out = sys.argv[4] if len(sys.argv) > 4 else None
t1 = time.perf_counter()
with torch.inference_mode():
    vae = AutoencoderKLTemporalDecoder.from_pretrained(folder).eval()
    latent, meta = load_latent(Path(src))
    assert meta.get("space", "scaled") == "scaled", meta.get("space")
    z = latent.float() / float(meta.get("scaling_factor", 0.18215))
    t2 = time.perf_counter()
    x = vae.decode(z, num_frames=z.shape[0]).sample
    t3 = time.perf_counter()
    left, top, right, bottom = meta.get("padding") or (0, 0, 0, 0)
    x = ((x[:, :, top:x.shape[-2] - bottom, left:x.shape[-1] - right] + 1) / 2).clamp(0, 1)
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    frames = x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(out / f"frame_{i:06d}.png")
    t4 = time.perf_counter()
    if float_out:
        torch.save(x.contiguous(), float_out)
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "decode_s": t3 - t2, "write_s": t4 - t3}))
"""

# A fresh small interpreter runs the command and reads its children's rusage: ru_maxrss survives fork + exec, so a
# command started straight from this (torch-sized) process could report this process's peak instead of its own.
PROBE = ("import resource, subprocess, sys, time; t = time.time(); "
         "r = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'w'), stderr=subprocess.PIPE, text=True); "
         "sys.stderr.write(r.stderr[-3000:]); "
         "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.time() - t)")


def measured(cmd: list[str], stdout: Path, env: dict | None = None) -> tuple[float, float]:
    """Peak RSS (MB) and wall seconds of `cmd` in a fresh process tree (with `env` added to the environment); its
    stdout goes to the file `stdout`."""
    r = subprocess.run([sys.executable, "-c", PROBE, str(stdout), *cmd], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    rc, rss, secs = r.stdout.split()
    if r.returncode or int(rc):
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {rc}):\n{r.stderr.strip()}")
    return float(rss), float(secs)


def machine() -> dict:
    import diffusers

    from bench.memory import machine as cpu

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {**cpu(), "ram_gib": round(mem, 1), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__}


def make_model(folder: Path, seed: int) -> None:
    """The production-width temporal-decoder VAE with seeded random weights, saved as a diffusers folder."""
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    model = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * len(WIDTHS),
                                         block_out_channels=WIDTHS, latent_channels=4, layers_per_block=2)
    with torch.no_grad():  # non-trivial GroupNorm affines and mix factors, as tests/conftest.py diffusers_kl
        for key, p in model.named_parameters():
            if "norm" in key or "mix_factor" in key:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(folder)


def make_clip(tmp: Path, size: tuple[int, int]) -> Path:
    """The shared clip, scaled to `size` with the bundled ffmpeg when it is another size."""
    src = imageio_ffmpeg.read_frames(str(CLIP))
    meta = next(src)
    src.close()
    if tuple(meta["size"]) == size:
        return CLIP
    path = tmp / f"clip_{size[0]}x{size[1]}.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(CLIP), "-vf",
                    f"scale={size[0]}:{size[1]}", "-an", "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p",
                    str(path)], check=True)
    return path


def read_frames(folder: Path) -> torch.Tensor:
    """A folder of frame_*.png -> (T, 3, H, W) float in [0, 1]."""
    files = sorted(folder.glob("frame_*.png"))
    if not files:
        raise RuntimeError(f"{folder}: no frames written")
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def find_key(record, key: str):
    """The first value of `key` anywhere in a nested JSON record, else None."""
    if isinstance(record, dict):
        if key in record:
            return record[key]
        record = list(record.values())
    if isinstance(record, list):
        for v in record:
            found = find_key(v, key)
            if found is not None:
                return found
    return None


def stats(values: list[float]) -> dict:
    return {"best": round(min(values), 3), "median": round(statistics.median(values), 3),
            "runs": [round(v, 3) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; --quick: 1)")
    parser.add_argument("--frames", type=int, default=None, help="frames of the clip (default 14; --quick: 6)")
    parser.add_argument("--size", default=None, help="WxH of the clip (default 512x320; --quick: 256x160)")
    parser.add_argument("--chunk", default=None, help="passed as --chunk to vae decode (and to decode_frames)")
    parser.add_argument("--max-memory", default=None, help="passed as --max-memory to vae decode (and load_codec)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 frames at 256x160, one round")
    parser.add_argument("--no-inprocess", action="store_true", help="skip the in-process decode_frames comparison")
    parser.add_argument("--direct", action="store_true",
                        help="also time vae decode with VAE_WINOGRAD=0 (oneDNN's direct convolutions everywhere)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work in this folder and keep it (weights, latent, frames, diffusers.pt, vaecli.pt)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    frames = args.frames or (6 if args.quick else 14)
    size_s = args.size or ("256x160" if args.quick else "512x320")
    size = tuple(int(v) for v in size_s.lower().split("x"))
    py = sys.executable
    vae = str(Path(py).with_name("vae"))
    extra = [*(["--chunk", args.chunk] if args.chunk else []),
             *(["--max-memory", args.max_memory] if args.max_memory else [])]
    started = time.time()
    mach = machine()
    print(f"# vae SVD decode bench, {time.strftime('%Y-%m-%d %H:%M:%S')}: {frames} frames {size[0]}x{size[1]}, "
          f"{rounds} round(s), vae flags: {' '.join(extra) or 'default'}", flush=True)
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB RAM, torch {mach['torch']} "
          f"({mach['torch_threads']} threads), diffusers {mach['diffusers']}, python {mach['python']}", flush=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(args.keep / "svd_diffusers", ignore_errors=True)
    with (contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="vae_svd_")) \
            as tmp_s:
        tmp = Path(tmp_s)
        folder = tmp / "svd_diffusers"
        t = time.perf_counter()
        make_model(folder, args.seed)
        clip = make_clip(tmp, size)
        latent_path = tmp / "clip.latent"
        subprocess.run([vae, "video", str(clip), "-o", str(latent_path), "--frames", str(frames), "--model", "svd",
                        "--weights", str(folder), "-q"], check=True)
        from vaecli.latents import load_latent

        latent, meta = load_latent(latent_path)
        print(f"inputs: weights + latent {list(latent.shape)} ({meta.get('space')}, scaling "
              f"{meta.get('scaling_factor')}) made in {time.perf_counter() - t:.1f} s", flush=True)
        script = tmp / "diffusers_decode.py"
        script.write_text(DIFFUSERS_SCRIPT)
        ours_dir, ref_dir, ref_float = tmp / "frames_vae", tmp / "frames_diffusers", tmp / "diffusers.pt"
        sides = ["vae", "diffusers"] + (["vae_direct"] if args.direct else [])
        secs: dict[str, list[float]] = {k: [] for k in sides}
        rss: dict[str, list[float]] = {k: [] for k in sides}
        inner: list[dict] = []
        vae_json: list = []
        ours_frames = ours_dir
        for r in range(rounds):
            shutil.rmtree(ours_dir, ignore_errors=True)  # vae skips an output that exists
            cmd = [vae, "decode", str(latent_path), "-o", str(ours_dir), "--as-frames", "--weights", str(folder),
                   "-q", "--json", *extra]
            m, s = measured(cmd, tmp / "vae_stdout.txt")
            secs["vae"].append(s)
            rss["vae"].append(m)
            records = [json.loads(ln) for ln in (tmp / "vae_stdout.txt").read_text().splitlines() if ln.strip()]
            if [rec.get("status") for rec in records] != ["ok"]:
                raise RuntimeError(f"vae decode did not decode the clip: {records}")
            vae_json.append(records[0])
            ours_frames = Path(records[0]["output"])
            print(f"round {r + 1}: vae decode       {s:8.2f} s  peak RSS {m:8.1f} MB", flush=True)
            if args.direct:
                shutil.rmtree(tmp / "frames_direct", ignore_errors=True)
                cmd = [vae, "decode", str(latent_path), "-o", str(tmp / "frames_direct"), "--as-frames", "--weights",
                       str(folder), "-q", *extra]
                m, s = measured(cmd, tmp / "direct_stdout.txt", {"VAE_WINOGRAD": "0"})
                secs["vae_direct"].append(s)
                rss["vae_direct"].append(m)
                print(f"round {r + 1}: vae, direct conv {s:8.2f} s  peak RSS {m:8.1f} MB", flush=True)
            cmd = [py, str(script), str(folder), str(latent_path), str(ref_dir), *([str(ref_float)] if r == 0 else [])]
            m, s = measured(cmd, tmp / "diffusers_stdout.txt")
            secs["diffusers"].append(s)
            rss["diffusers"].append(m)
            inner.append(json.loads((tmp / "diffusers_stdout.txt").read_text().strip().splitlines()[-1]))
            print(f"round {r + 1}: diffusers script {s:8.2f} s  peak RSS {m:8.1f} MB  (decode call "
                  f"{inner[-1]['decode_s']:.2f} s, load {inner[-1]['load_s']:.2f} s, import {inner[-1]['import_s']:.2f}"
                  f" s, PNGs {inner[-1]['write_s']:.2f} s)", flush=True)
        res = {k: {**stats(secs[k]), "peak_rss_mb": round(max(rss[k]), 1), "peak_rss_runs": rss[k]} for k in secs}
        res["diffusers"]["decode_call_s"] = stats([d["decode_s"] for d in inner])
        scratch = find_key(vae_json, "scratch_bytes")
        ratio = {k: round(res["vae"][k] / res["diffusers"][k], 3) for k in ("best", "median")}

        ours = read_frames(ours_frames)
        ref_png = read_frames(ref_dir)
        ref = torch.load(ref_float)
        agree = {"vae_png_vs_diffusers_float": float((ours - ref).abs().max()),
                 "vae_png_vs_diffusers_png_255": round(float((ours - ref_png).abs().max()) * 255, 3),
                 "mean_vae_png_vs_diffusers_png_255": round(float((ours - ref_png).abs().mean()) * 255, 5)}
        inproc = None
        if not args.no_inprocess:
            from vaecli import tiling
            from vaecli.codec import load_codec

            kw = {"budget": tiling.parse_size(args.max_memory)} if args.max_memory else {}
            codec = load_codec("svd", [folder], ("decoder",), device="cpu", **kw)
            t = time.perf_counter()
            got = codec.decode_frames(latent, meta, int(args.chunk) if args.chunk else None)
            call = time.perf_counter() - t
            diff = (got - ref).abs()
            where = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
            inproc = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                      "over_target": int((diff > DIFF_TARGET).sum()), "values": diff.numel(),
                      "max_at_tchw": [int(v) for v in where],
                      "max_abs_diff_per_frame": [float(v) for v in diff.amax(dim=(1, 2, 3))],
                      "decode_frames_s": round(call, 2), "scratch_bytes": getattr(codec, "scratch_bytes", None)}
            if args.keep:
                torch.save(got, tmp / "vaecli.pt")
            del got, codec, diff

    print(f"\nSVD decode, {frames} frames {size[0]}x{size[1]}, production widths, fp32 CPU, whole process "
          f"({rounds} interleaved round(s)):")
    for k, name in (("vae", "vae decode (--as-frames)"), ("vae_direct", "vae decode, VAE_WINOGRAD=0"),
                    ("diffusers", "diffusers decode (whole clip)")):
        if k not in res:
            continue
        print(f"  {name:30s} best {res[k]['best']:8.2f} s  median {res[k]['median']:8.2f} s  "
              f"peak RSS {res[k]['peak_rss_mb']:8.1f} MB")
    d = res["diffusers"]["decode_call_s"]
    print(f"  diffusers decode() call alone: best {d['best']:.2f} s  median {d['median']:.2f} s")
    if inproc:
        print(f"  vaecli decode_frames() in-process (one run, this process): {inproc['decode_frames_s']:.2f} s")
    print(f"  time ratio vae/diffusers: best {ratio['best']:.3f}  median {ratio['median']:.3f}  (target <= "
          f"{RATIO_TARGET}: {'PASS' if ratio['median'] <= RATIO_TARGET else 'FAIL'} on medians, "
          f"{'PASS' if ratio['best'] <= RATIO_TARGET else 'FAIL'} on bests)")
    if "vae_direct" in res:
        w = {k: res["vae"][k] / res["vae_direct"][k] for k in ("best", "median")}
        print(f"  Winograd: vae / vae with direct convolutions: best {w['best']:.3f}  median {w['median']:.3f}")
    print(f"  vae peak RSS {res['vae']['peak_rss_mb']:.1f} MB (target <= {RSS_TARGET_MB} MB: "
          f"{'PASS' if res['vae']['peak_rss_mb'] <= RSS_TARGET_MB else 'FAIL'}); diffusers "
          f"{res['diffusers']['peak_rss_mb']:.1f} MB")
    print(f"  scratch bytes (vae decode --json): {'not reported' if scratch is None else scratch}"
          + ("" if not inproc or inproc["scratch_bytes"] is None
             else f"; in-process codec.scratch_bytes: {inproc['scratch_bytes']}"))
    print(f"  max |vae PNG - diffusers float| {agree['vae_png_vs_diffusers_float']:.5f} "
          f"({agree['vae_png_vs_diffusers_float'] * 255:.3f}/255; quantization: ~0.5/255 plus the float difference)")
    print(f"  max |vae PNG - diffusers PNG| {agree['vae_png_vs_diffusers_png_255']}/255, "
          f"mean {agree['mean_vae_png_vs_diffusers_png_255']}/255")
    if inproc:
        print(f"  in-process decode_frames vs diffusers float: max |diff| {inproc['max_abs_diff']:.3e}, mean "
              f"{inproc['mean_abs_diff']:.3e} (target <= {DIFF_TARGET:g}: "
              f"{'PASS' if inproc['max_abs_diff'] <= DIFF_TARGET else 'FAIL'}); {inproc['over_target']} of "
              f"{inproc['values']} values over it, the max at (t, c, y, x) = {tuple(inproc['max_at_tchw'])}")
        print("  per-frame max |diff|: " + " ".join(f"{v:.1e}" for v in inproc["max_abs_diff_per_frame"]))
    print(json.dumps({"bench": "svd", "machine": mach, "frames": frames, "size": list(size), "rounds": rounds,
                      "chunk": args.chunk, "max_memory": args.max_memory, "seed": args.seed,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                      "wall_s": round(time.time() - started, 1), "results": res, "ratio": ratio,
                      "diffusers_inner": inner, "scratch_bytes": scratch, "agreement": agree, "inprocess": inproc,
                      "vae_json": vae_json}))


if __name__ == "__main__":
    main()
