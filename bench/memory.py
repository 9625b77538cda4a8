"""Bench: peak RSS (MB) and wall time of whole `vae` commands, each in a fresh process, default flags.

Cases (model taef2, the default; inputs made in a temporary folder):
- images of 1, 4 and 16 megapixels (1024^2, 2048^2, 4096^2: a shared photo resized with PIL, PNG):
  `vae encode`, `vae decode` (of that encode's latent), `vae roundtrip -o recon.png`;
  a folder batch: `vae encode DIR -o OUT/` over 4 copies of the 4 MP image;
- clips of 720p and 1080p at 14 and 100 frames (pan_motorcycle.mp4 scaled and looped by the bundled ffmpeg,
  libx264 crf 18): `vae video clip.mp4 -o x.latent`, `vae decode x.latent -o x.mp4`,
  `vae video clip.mp4 -o y.latent --roundtrip`.
Peak RSS is the child-rusage maximum of the `vae` process (`bench.video_memory.peak_rss_mb`); seconds are its wall
time, interpreter start-up and model load included. Then the issue's targets: 2048x2048 roundtrip <= 1100 MB,
every 720p x 14 video command <= 1100 MB, and 1080p x 100 within +5% of 1080p x 14 for the same command.

Run: `python bench/memory.py [--quick] [--cases SUBSTR] [--max-memory 1GB] [--strict]` (needs ../shared).
`--quick` keeps the 1 and 4 MP images and 720p x 14 (a few minutes); the full run takes much longer on 2 cores
(the 16 MP and 1080p x 100 cases take minutes each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from bench.video_memory import peak_rss_mb  # noqa: E402

SIDES = {1: 1024, 4: 2048, 16: 4096}  # megapixels -> side
CLIPS = {"720p": (1280, 720), "1080p": (1920, 1080)}
FRAMES = (14, 100)
BATCH_COPIES = 4
TARGET_MB = 1100
GROWTH = 0.05


class Inputs:
    """Bench inputs, made on first use in `tmp`: images, clips, and the latents a decode case starts from."""

    def __init__(self, tmp: Path, photo: Path, vae: str, extra: list[str]) -> None:
        self.tmp, self.photo, self.vae, self.extra = tmp, photo, vae, extra
        self.ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()

    def image(self, mp: int) -> Path:
        path = self.tmp / f"img{mp}mp.png"
        if not path.exists():
            side = SIDES[mp]
            with Image.open(self.photo) as img:
                img.convert("RGB").resize((side, side), Image.Resampling.LANCZOS).save(path)
        return path

    def folder(self, mp: int) -> Path:
        path = self.tmp / f"batch{mp}mp"
        if not path.exists():
            path.mkdir()
            for i in range(BATCH_COPIES):
                shutil.copy(self.image(mp), path / f"copy{i}.png")
        return path

    def clip(self, res: str, frames: int) -> Path:
        path = self.tmp / f"clip_{res}_{frames}.mp4"
        if not path.exists():
            w, h = CLIPS[res]
            subprocess.run([self.ffmpeg, "-loglevel", "error", "-y", "-stream_loop", "-1", "-i",
                            str(SHARED / "video" / "pan_motorcycle.mp4"), "-vf", f"scale={w}:{h}",
                            "-frames:v", str(frames), "-an", "-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p",
                            str(path)], check=True)
        return path

    def latent(self, path: Path, make: list[str]) -> Path:
        """`path`, made by the command `make` (unmeasured) when an earlier case has not already written it."""
        if not path.exists():
            subprocess.run([self.vae, *make, "-o", str(path), *self.extra], check=True, capture_output=True,
                           text=True)
        return path


def cases(inp: Inputs, quick: bool) -> list[tuple[str, object]]:
    """(name, thunk) per case, in run order; a thunk makes its inputs and returns the `vae` arguments."""
    out: list[tuple[str, object]] = []
    t = inp.tmp
    for mp in (1, 4) if quick else (1, 4, 16):
        lat = t / f"img{mp}mp.latent"
        out += [
            (f"image {mp}MP encode", lambda mp=mp, lat=lat: ["encode", str(inp.image(mp)), "-o", str(lat)]),
            (f"image {mp}MP decode", lambda mp=mp, lat=lat: [
                "decode", str(inp.latent(lat, ["encode", str(inp.image(mp))])), "-o", str(t / f"dec{mp}mp.png")]),
            (f"image {mp}MP roundtrip", lambda mp=mp: [
                "roundtrip", str(inp.image(mp)), "-o", str(t / f"recon{mp}mp.png")]),
        ]
        if mp == 4:
            out.append((f"batch {BATCH_COPIES}x{mp}MP encode", lambda mp=mp: [
                "encode", str(inp.folder(mp)), "-o", str(t / f"batch{mp}mp_out") + "/"]))
    for res in CLIPS:
        for frames in FRAMES:
            if quick and (res, frames) != ("720p", 14):
                continue
            key = f"{res}_{frames}"
            x = t / f"x_{key}.latent"
            out += [
                (f"video {res} x{frames} video", lambda res=res, frames=frames, x=x: [
                    "video", str(inp.clip(res, frames)), "-o", str(x)]),
                (f"video {res} x{frames} decode", lambda res=res, frames=frames, x=x, key=key: [
                    "decode", str(inp.latent(x, ["video", str(inp.clip(res, frames))])), "-o",
                    str(t / f"x_{key}.mp4")]),
                (f"video {res} x{frames} video --roundtrip", lambda res=res, frames=frames, key=key: [
                    "video", str(inp.clip(res, frames)), "-o", str(t / f"y_{key}.latent"), "--roundtrip"]),
            ]
    return out


def contract(results: dict) -> list[dict]:
    """The issue's targets, each with its verdict: PASS, FAIL, or n/a when its cases did not run (or failed)."""

    def rss(name: str):
        return results.get(name, {}).get("peak_rss_mb")

    checks = [{"check": f"2048x2048 (image 4MP) roundtrip <= {TARGET_MB} MB", "value": rss("image 4MP roundtrip"),
               "limit": TARGET_MB}]
    for cmd in ("video", "decode", "video --roundtrip"):
        checks.append({"check": f"video 720p x14 {cmd} <= {TARGET_MB} MB", "value": rss(f"video 720p x14 {cmd}"),
                       "limit": TARGET_MB})
    for cmd in ("video", "decode", "video --roundtrip"):
        short, long = rss(f"video 1080p x14 {cmd}"), rss(f"video 1080p x100 {cmd}")
        checks.append({"check": f"video 1080p x100 {cmd} <= 1080p x14 + {GROWTH:.0%}", "value": long,
                       "limit": None if short is None else round(short * (1 + GROWTH), 1),
                       "ratio": None if short is None or long is None else round(long / short, 3)})
    for c in checks:
        c["verdict"] = "n/a" if c["value"] is None or c["limit"] is None else (
            "PASS" if c["value"] <= c["limit"] else "FAIL")
    return checks


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        model = platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 1 and 4 MP images and 720p x 14")
    parser.add_argument("--cases", default=None, help="run only the cases whose name contains this substring")
    parser.add_argument("--max-memory", default=None, help="passed as --max-memory to every vae command")
    parser.add_argument("--photo", type=Path, default=SHARED / "images" / "astronaut.png", help="source photo")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a case fails or a target is missed")
    args = parser.parse_args()
    os.environ.setdefault("VAE_WEIGHTS_DIR", str(SHARED / "weights"))
    vae = str(Path(sys.executable).with_name("vae"))
    extra = ["--max-memory", args.max_memory] if args.max_memory else []
    results: dict[str, dict] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vae_memory_") as tmp:
        inp = Inputs(Path(tmp), args.photo, vae, extra)
        todo = [(n, f) for n, f in cases(inp, args.quick) if args.cases is None or args.cases in n]
        if not todo:
            sys.exit(f"no case matches {args.cases!r}")
        print(f"# vae memory bench, {time.strftime('%Y-%m-%d %H:%M:%S')}, max-memory {args.max_memory or 'default'}")
        print("| case | peak RSS MB | seconds |")
        print("| --- | --- | --- |", flush=True)
        for name, thunk in todo:
            try:
                cmd = [vae, *thunk(), *extra]
                rss, secs = peak_rss_mb(cmd)
            except subprocess.CalledProcessError as exc:
                tail = (exc.stderr or "").strip().splitlines()[-3:]
                results[name] = {"error": " / ".join(tail) or f"exit {exc.returncode}"}
                print(f"| {name} | failed | {results[name]['error']} |", flush=True)
                continue
            results[name] = {"peak_rss_mb": round(rss, 1), "seconds": round(secs, 2), "cmd": " ".join(cmd[1:])}
            print(f"| {name} | {rss:.1f} | {secs:.2f} |", flush=True)
    checks = contract(results)
    print("\ncontract" + (f" (note: run with --max-memory {args.max_memory})" if args.max_memory else "") + ":")
    for c in checks:
        extra_s = f" (ratio {c['ratio']})" if c.get("ratio") is not None else ""
        value = "-" if c["value"] is None else f"{c['value']:.1f} MB"
        print(f"  {c['verdict']:4s} {c['check']}: {value}{extra_s}")
    print(json.dumps({"bench": "memory", "quick": args.quick, "cases_filter": args.cases,
                      "max_memory": args.max_memory, "photo": str(args.photo), "machine": machine(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                      "wall_s": round(time.time() - started, 1), "results": results, "contract": checks}))
    failed = any("error" in r for r in results.values()) or any(c["verdict"] == "FAIL" for c in checks)
    if args.strict and failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
