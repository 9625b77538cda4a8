"""The memory contract, command by command: a `vae` process peaks within its activation budget (--max-memory) plus
a fixed overhead (the process with its weights, one decoded input and its output), whatever the input's size.

Each command runs in a fresh process on an input far larger than the budget; its peak RSS is checked against the
bound. A memory test, not a timing test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import pytest
from PIL import Image

BUDGET_MB = 256
SLACK_MB = 200  # allocator slack, the PNG/ffmpeg buffers, thread stacks


def peak_rss_mb(args: list, weights: Path) -> float:
    """Peak RSS (MB) of `vae *args` in a fresh child process; fails with its stderr if it fails."""
    vae = str(Path(sys.executable).with_name("vae"))
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(r.stderr); sys.exit(r.returncode) if r.returncode else "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    env = {**os.environ, "VAE_WEIGHTS_DIR": str(weights)}
    run = subprocess.run([sys.executable, "-c", probe, vae, *map(str, args)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    return float(run.stdout)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_images, shared):
    root = tmp_path_factory.mktemp("memory")
    photo = Image.open(shared_images / "astronaut.png").convert("RGB")
    photo.resize((64, 64)).save(root / "tiny.png")
    photo.resize((1280, 1024)).save(root / "big.png")
    (root / "folder").mkdir()
    for i in range(3):
        photo.rotate(90 * i).resize((768, 640)).save(root / "folder" / f"{i}.png")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(shared / "video" /
                    "pan_motorcycle.mp4"), "-vf", "scale=1280:720", "-frames:v", "2", "-c:v", "libx264", "-crf", "18",
                    str(root / "720p.mp4")], check=True)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(shared / "video" /
                    "pan_motorcycle.mp4"), "-vf", "scale=640:360", "-frames:v", "2", "-c:v", "libx264", "-crf", "18",
                    str(root / "360p.mp4")], check=True)
    # A tiny video model at its production widths (random weights: memory does not depend on them). Streamed whole,
    # its 360p frames alone take ~1 GB; past the budget they go tile by tile.
    import torch

    from vaecli.models.taehv import TAEHV
    from vaecli.registry import REGISTRY

    torch.save(TAEHV(REGISTRY["taew2_1"].config).state_dict(), root / "taew2_1.pth")
    return root


@pytest.fixture(scope="module")
def baseline_mb(inputs, shared_weights) -> float:
    """The fixed cost: a process that loads the encoder and decoder and roundtrips a 64x64 image."""
    return peak_rss_mb(["roundtrip", inputs / "tiny.png", "-o", inputs / "tiny.recon.png", "-q"], shared_weights)


# case -> (command, the latent it needs made first or None, frame size); {big}, {clip}, {folder}: inputs, {out}: tmp.
CASES = {
    "encode": (["encode", "{big}", "-o", "{out}/x.latent"], None, (1280, 1024)),
    "decode": (["decode", "{out}/pre.latent", "-o", "{out}/x.png"], ["encode", "{big}"], (1280, 1024)),
    "roundtrip": (["roundtrip", "{big}", "-o", "{out}/x.png"], None, (1280, 1024)),
    "folder": (["roundtrip", "{folder}", "-o", "{out}/dir"], None, (1280, 1024)),
    "video": (["video", "{clip}", "-o", "{out}/x.latent"], None, (1280, 720)),
    "video-decode": (["decode", "{out}/pre.latent", "-o", "{out}/x.mp4"], ["video", "{clip}"], (1280, 720)),
    "video-roundtrip": (["video", "{clip}", "-o", "{out}/x.latent", "--roundtrip"], None, (1280, 720)),
    "video-taehv": (["video", "{clip360}", "-o", "{out}/x.latent", "--roundtrip", "--model", "taew2_1", "--weights",
                     "{taehv}"], None, (640, 360)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_stays_within_the_budget(inputs, baseline_mb, shared_weights, tmp_path, case):
    command, needs, (w, h) = CASES[case]
    paths = {"big": inputs / "big.png", "clip": inputs / "720p.mp4", "folder": inputs / "folder", "out": tmp_path,
             "clip360": inputs / "360p.mp4", "taehv": inputs / "taew2_1.pth"}
    if needs is not None:  # made at the default budget: only the command under test is measured
        peak_rss_mb([arg.format(**paths) for arg in needs] + ["-o", tmp_path / "pre.latent", "-q"], shared_weights)
    args = [arg.format(**paths) for arg in command] + ["--max-memory", f"{BUDGET_MB}MB", "-q"]
    peak = peak_rss_mb(args, shared_weights)
    float_frame_mb = w * h * 3 * 4 / 2**20
    bound = baseline_mb + BUDGET_MB + SLACK_MB + 4 * float_frame_mb  # an input, its padded copy, the output, its bytes
    assert peak <= bound, f"{case}: {peak:.0f} MB > {bound:.0f} MB (baseline {baseline_mb:.0f} MB)"
