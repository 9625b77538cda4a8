"""Whole clips through a codec, streaming: frames are read, encoded, decoded and written a chunk at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from vaecli import latents, metrics, video
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

    @property
    def mean_psnr(self) -> float | None:
        """Mean of the per-frame PSNRs in dB, when the clip was reconstructed."""
        return sum(self.psnr) / len(self.psnr) if self.psnr else None


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    while batch := list(islice(it, n)):
        yield batch


def check_selection(start: int, frames: int | None, stride: int, fps: float | None, chunk: int | None) -> None:
    """Raise a UsageError for a frame selection or chunk size that cannot mean anything."""
    if (chunk is not None and chunk < 1) or stride < 1 or (frames is not None and frames < 1) or start < 0 or (
            fps is not None and fps <= 0):
        raise UsageError("--chunk, --stride and --frames must be at least 1, --start at least 0, --fps positive")
    if stride != 1 and fps is not None:
        raise UsageError("use --stride or --fps, not both")


def encode_clip(codec: Codec, src: Path, out: Path, *, start: int = 0, frames: int | None = None, stride: int = 1,
                fps: float | None = None, chunk: int | None = None, recon: Path | None = None,
                on_frames: Callable[[int], None] | None = None) -> ClipReport:
    """Encode the selected frames of clip `src` into latent video `out`, `chunk` frames at a time (None: as many
    as fit the codec's memory budget); with `recon`, also decode and write them."""
    check_selection(start, frames, stride, fps, chunk)
    info, stream = video.read_frames(src, start=start, stride=stride, fps=fps, limit=frames)
    chunk = chunk or codec.frames_per_pass(info.size)
    out_fps = fps or info.fps / stride
    report = ClipReport(frames=0, shape=[], fps=out_fps, size=info.size)
    writer = latents.LatentVideoWriter(out)
    recon_writer = video.VideoWriter(recon, out_fps, info.size) if recon else None
    meta: dict = {}
    try:
        for batch in _chunks(stream, chunk):
            indices, pixels = zip(*batch, strict=True)
            x = torch.stack(pixels)
            lat, meta = codec.encode_batch(x, info.size)
            writer.write(lat)
            if recon_writer is not None:
                decoded = codec.decode_frames(lat, meta, chunk)
                for original, frame in zip(x, decoded, strict=True):
                    frame = quantize8(frame)
                    recon_writer.write(frame)
                    report.psnr.append(metrics.psnr(frame[None], original[None]))
            report.frame_indices += indices
            if on_frames:
                on_frames(len(indices))
        if not report.frame_indices:
            raise InputError(f"{src}: no frames selected (the clip ends before frame {start})")
        report.frames = len(report.frame_indices)
        meta.update(kind="video", fps=out_fps, frame_indices=report.frame_indices, source_fps=info.fps,
                    source_size=list(info.size), source=Path(src).name)
        writer.close(meta)
        report.shape = [report.frames, *lat.shape[1:]]
        if recon_writer is not None:
            recon_writer.close()
            report.written_size = recon_writer.written_size
    except BaseException:
        writer.abort()
        if recon_writer is not None:
            recon_writer.abort()
        raise
    return report


def decode_clip(codec: Codec, src: Path, out: Path, chunk: int | None = None, as_frames: bool = False,
                on_frames: Callable[[int], None] | None = None) -> dict:
    """Decode latent video `src` into a clip (or, `as_frames`, a PNG folder) at `out`, at its source size and fps,
    `chunk` frames at a time (None: as many as fit the codec's memory budget)."""
    if chunk is not None and chunk < 1:
        raise UsageError(f"--chunk must be at least 1, got {chunk}")
    meta, shape, read = latents.open_latent_video(src)
    size = tuple(meta["image_size"])
    chunk = chunk or codec.frames_per_pass(size)
    with video.VideoWriter(out, float(meta["fps"]), size, as_frames) as writer:
        for i in range(0, shape[0], chunk):
            for frame in codec.decode_frames(read(i, i + chunk), meta, chunk):
                writer.write(frame)
            if on_frames:
                on_frames(min(chunk, shape[0] - i))
    return {"frames": shape[0], "fps": meta["fps"], "size": list(size), "written_size": list(writer.written_size)}
