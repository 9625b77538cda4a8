"""Bench: peak RSS of `vae video` on a 48-frame clip and on the same clip looped to 480 frames.

Streaming means memory does not grow with clip length: the 480-frame run should stay within 1.3x of the
48-frame one. Run: `python bench/video_memory.py [--scale 256:160] [--roundtrip]` (needs ../shared).
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

import imageio_ffmpeg

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT.parent / "shared" / "video" / "pan_motorcycle.mp4"


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Peak RSS (MB) and wall seconds of `cmd`, measured in a fresh child process."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.time() - t)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True).stdout
    rss, secs = out.split()
    return float(rss), float(secs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", default=None, help="ffmpeg scale, e.g. 256:160, to make the bench quicker")
    parser.add_argument("--roundtrip", action="store_true", help="also decode and write the reconstruction")
    args = parser.parse_args()
    os.environ.setdefault("VAE_WEIGHTS_DIR", str(ROOT.parent / "shared" / "weights"))
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    vae = str(Path(sys.executable).with_name("vae"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for loops in (1, 10):
            clip = Path(tmp) / f"clip{loops}.mp4"
            scale = ["-vf", f"scale={args.scale}"] if args.scale else []
            subprocess.run([ffmpeg, "-loglevel", "error", "-stream_loop", str(loops - 1), "-i", str(CLIP), *scale,
                            "-c:v", "libx264", "-crf", "18", str(clip)], check=True)
            cmd = [vae, "video", str(clip), "-o", str(Path(tmp) / f"x{loops}.latent")]
            if args.roundtrip:
                cmd.append("--roundtrip")
            rss, secs = peak_rss_mb(cmd)
            results[48 * loops] = {"peak_rss_mb": round(rss, 1), "seconds": round(secs, 1)}
            print(f"{48 * loops:4d} frames: peak RSS {rss:7.1f} MB  {secs:6.1f} s", flush=True)
    ratio = results[480]["peak_rss_mb"] / results[48]["peak_rss_mb"]
    print(f"480/48 peak RSS ratio: {ratio:.3f} (target <= 1.3)")
    print(json.dumps({"bench": "video_memory", "scale": args.scale, "roundtrip": args.roundtrip,
                      "results": results, "ratio": round(ratio, 3), "time": time.time()}))


if __name__ == "__main__":
    main()
