"""Whole clips through a codec, streaming: frames are read, encoded, decoded and written a chunk at a time."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from vaecli import latents, metrics, video
from vaecli.batch import check_at_least_one
from vaecli.codec import Codec
from vaecli.errors import InputError, UsageError
from vaecli.media import quantize8


@dataclass
class ClipReport:
    """What encoding (and optionally reconstructing) a clip produced."""

    frames: int
    shape: list[int]
    fps: float
    size: tuple[int, int]
    frame_indices: list[int] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    written_size: tuple[int, int] | None = None
    dropped: int = 0  # frames after the last 1 + f * k that a causal video model did not encode
    scratch_bytes: int = 0  # the most scratch-file space the clip's encode (and reconstruction) held at once

    @property
    def mean_psnr(self) -> float | None:
        """Mean of the per-frame PSNRs in dB, when the clip was reconstructed."""
        return sum(self.psnr) / len(self.psnr) if self.psnr else None


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    while batch := list(islice(it, n)):
        yield batch


def check_selection(start: int, frames: int | None, stride: int, fps: float | None, chunk: int | None) -> None:
    """Raise a UsageError for a frame selection or chunk size that cannot mean anything."""
    check_at_least_one({"--chunk": chunk, "--stride": stride, "--frames": frames})
    if start < 0:
        raise UsageError(f"--start must be at least 0, got {start}")
    if fps is not None and not video.fps_ok(fps):
        raise UsageError(f"--fps {fps:g}: {video.FPS_RANGE}")
    if stride != 1 and fps is not None:
        raise UsageError("use --stride or --fps, not both")


def encode_clip(codec: Codec, src: Path, out: Path, *, start: int = 0, frames: int | None = None, stride: int = 1,
                fps: float | None = None, chunk: int | None = None, recon: Path | None = None,
                on_frames: Callable[[int], None] | None = None, sample: bool = False,
                seed: int | None = None) -> ClipReport:
    """Encode the selected frames of clip `src` into latent video `out`, `chunk` frames at a time (None: as many
    as fit the codec's memory budget); with `recon`, also decode and write them; with `sample`, draws from the
    posterior (latent frame i's noise from `pipeline.frame_seed(seed, i)`) instead of its mean.

    A causal video model (Wan, TAEHV) encodes the first 1 + f * k frames (`report.dropped` says how many follow).
    """
    check_selection(start, frames, stride, fps, chunk)
    info, stream = video.read_frames(src, start=start, stride=stride, fps=fps, limit=frames)
    chunk = chunk or codec.frames_per_pass(info.size)
    if fps is not None and video.same_rate(fps, info.fps):
        fps = None  # the clip's own rate, as read_frames takes it: every frame, recorded at the clip's rate
    out_fps = fps or info.fps / stride
    if not video.fps_ok(out_fps):  # recorded in the latent: refused now rather than when it is decoded
        raise InputError(f"{src}: {info.fps:g} fps / --stride {stride} is {out_fps:g} fps: {video.FPS_RANGE} "
                         f"(use --fps)")
    report = ClipReport(frames=0, shape=[], fps=out_fps, size=info.size)
    writer = latents.LatentVideoWriter(out)
    recon_writer = video.VideoWriter(recon, out_fps, info.size) if recon else None
    codec.scratch_bytes = 0
    enc = codec.clip_encoder(info.size, sample=sample, seed=seed)
    whole = recon_writer is not None and not codec.streams_frames(info.size)
    kept: list[torch.Tensor] = []  # latents decoded as one clip at the end (SVD, or tile by tile)
    originals: deque[torch.Tensor] = deque()  # source frames waiting for their reconstruction
    dec = None
    n_latents, shape = 0, []
    lead = 0  # decoded frames still to leave out: startup frames some models keep precede the clip (taecvx)

    def reconstruct(decoded: torch.Tensor, source: Iterator[torch.Tensor] | None = None) -> None:
        nonlocal lead
        for frame in decoded:
            if lead:
                lead -= 1
                continue
            frame = quantize8(frame)
            recon_writer.write(frame)
            original = next(source) if source is not None else originals.popleft()
            report.psnr.append(metrics.psnr(frame[None], original[None]))

    def emit(lat: torch.Tensor) -> None:
        nonlocal dec, n_latents, shape, lead
        if not lat.shape[0]:
            return
        writer.write(lat)
        n_latents, shape = n_latents + lat.shape[0], list(lat.shape[1:])
        if whole:
            kept.append(lat)
        elif recon_writer is not None:
            if dec is None:
                dec, lead = codec.clip_decoder(enc.meta), codec.lead_frames(None)
            reconstruct(dec.push(lat))

    try:
        for batch in _chunks(stream, chunk):
            indices, pixels = zip(*batch, strict=True)
            x = torch.stack(pixels)
            if recon_writer is not None and not whole:
                originals.extend(x)
            report.frame_indices += indices
            emit(enc.push(x))
            if on_frames:
                on_frames(len(indices))
        if not report.frame_indices:
            raise InputError(f"{src}: no frames selected (the clip ends before frame {start})")
        tail, report.dropped = enc.flush()
        emit(tail)
        if report.dropped:
            report.frame_indices = report.frame_indices[:-report.dropped]
        report.frames = len(report.frame_indices)
        meta = dict(enc.meta, kind="video", fps=out_fps, frame_indices=report.frame_indices, source_fps=info.fps,
                    source_size=list(info.size), source=Path(src).name)
        if codec.spec.temporal_factor > 1:
            meta["temporal_factor"] = codec.spec.temporal_factor
        report.shape = [n_latents, *shape]
        if whole:  # the source frames again, for the PSNRs, rather than all of them held
            _, again = video.read_frames(src, start=start, stride=stride, fps=fps, limit=frames)
            lat = torch.cat(kept)
            lead = codec.lead_frames(lat.shape[0])
            for decoded in codec.decode_stream(lambda i, j: lat[i:j], lat.shape[0], meta, chunk):
                reconstruct(decoded, (pixels for _, pixels in again))
        if recon_writer is not None:
            recon_writer.close()
            report.written_size = recon_writer.written_size
        try:  # the latent last: both outputs exist, or neither
            writer.close(meta)
        except BaseException:
            if recon is not None:
                Path(recon).unlink(missing_ok=True)
            raise
        report.scratch_bytes = codec.scratch_bytes
    except BaseException:
        writer.abort()
        if recon_writer is not None:
            recon_writer.abort()
        raise
    return report


def decode_clip(codec: Codec, src: Path, out: Path, chunk: int | None = None, as_frames: bool = False,
                on_frames: Callable[[int], None] | None = None, verify: bool = False) -> dict:
    """Decode latent video `src` into a clip (or, `as_frames`, a PNG folder) at `out`, at its source size and fps,
    `chunk` frames at a time (None: as many as fit the codec's memory budget); with `verify`, also compare the
    decoded frames with a second, exact whole decode (`verify_clip`)."""
    meta, shape, read = latents.open_latent_video(src)
    size = tuple(meta["image_size"])
    check = ClipCheck(codec, read, shape[0], meta) if verify else None
    codec.scratch_bytes = 0
    with video.VideoWriter(out, float(meta["fps"]), size, as_frames) as writer:
        done = 0
        for frames in codec.decode_stream(read, shape[0], meta, chunk):
            if check is not None:
                check.add(done, frames)
            for frame in frames:
                writer.write(frame)
            done += frames.shape[0]
            if on_frames:
                on_frames(frames.shape[0])
    info = {"frames": done, "latent_frames": shape[0], "fps": meta["fps"], "size": list(size),
            "written_size": list(writer.written_size),
            "scratch_bytes": codec.scratch_bytes}
    if check is not None:
        info["verify"] = check.result()
    return info


class ClipCheck:
    """`--verify` for a latent video: the decoded frames against an exact reference computed another way.

    Where the codec has a reference for the clip (`reference_frames`: SVD's whole clip at once, a causal video model's
    whole-frame stream when the decode went tile by tile), every frame against it; otherwise (per-frame models) the
    first frame against the codec's own image check (a window decoded untiled, or the whole frame for KL).
    """

    def __init__(self, codec: Codec, read, frames: int, meta: dict):
        self.codec, self.read, self.meta = codec, read, meta
        ref = codec.reference_frames(read, frames, meta)
        self.ref, self.what = ref if ref is not None else (None, "")
        self.pending: list[torch.Tensor] = []  # reference frames not compared yet
        self.max_diff, self.sq, self.count, self.frames, self.first = 0.0, 0.0, 0, 0, None

    def add(self, start: int, frames: torch.Tensor) -> None:
        """Compare decoded frames start .. start + k, (k, 3, H, W) in [0, 1] (given in order)."""
        if self.ref is None:
            if start == 0:
                self.first = self.codec.verify_tiling(self.read(0, 1)[0], self.meta, frames[:1])
            return
        k = frames.shape[0]
        while sum(p.shape[0] for p in self.pending) < k:
            self.pending.append(next(self.ref))
        ref = torch.cat(self.pending)
        self.pending = [ref[k:]]
        diff = frames - ref[:k]
        self.max_diff = max(self.max_diff, diff.abs().max().item())
        self.sq += diff.double().pow(2).sum().item()
        self.count, self.frames = self.count + diff.numel(), self.frames + k

    def result(self) -> dict:
        """What was compared, the max abs difference and the PSNR (dB) there."""
        if self.ref is None:
            return {**self.first, "compared": "frame 0"}
        mse = self.sq / max(1, self.count)
        frames = "the frame" if self.frames == 1 else f"all {self.frames} frames"
        return {"tiled": True, "compared": f"{frames} with {self.what}",
                "max_abs_diff": self.max_diff, "psnr": float("inf") if mse == 0 else -10 * math.log10(mse)}
