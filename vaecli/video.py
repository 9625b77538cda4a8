"""Video I/O through imageio-ffmpeg (and Pillow for GIF output): streaming frame readers and atomic writers.

Frames inside the library are (3, H, W) float32 tensors in [0, 1]; nothing here holds a whole clip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaecli.errors import InputError, UsageError
from vaecli.files import output_file_mode, writing

FFMPEG_EXTS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
VIDEO_EXTS = FFMPEG_EXTS | {".gif"}
STILL_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
CODECS = {".webm": "libvpx-vp9"}  # everything else: H.264


@dataclass(frozen=True)
class VideoInfo:
    """A clip's frame rate, frame size (W, H) and duration in seconds, as ffmpeg reports them."""

    fps: float
    size: tuple[int, int]
    duration: float


def _open(path: Path):
    import imageio_ffmpeg

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a video file")
    if path.suffix.lower() in STILL_EXTS:
        raise InputError(f"{path}: is a still image, not a video (use 'vae encode')")
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(gen)
    except (OSError, RuntimeError, StopIteration, ValueError):
        gen.close()
        raise InputError(f"{path}: not a video ffmpeg can read") from None
    if not meta.get("fps") or not meta.get("size"):
        gen.close()
        raise InputError(f"{path}: not a video ffmpeg can read (no video stream)")
    return gen, VideoInfo(fps=float(meta["fps"]), size=tuple(meta["size"]), duration=float(meta.get("duration") or 0))


def probe(path: Path) -> VideoInfo:
    """Frame rate, size and duration of a video file, or an InputError if ffmpeg cannot read it."""
    gen, info = _open(path)
    gen.close()
    return info


def select(index: int, start: int, stride: int, fps_in: float, fps_out: float | None) -> bool:
    """Whether source frame `index` is kept: from `start`, every `stride`-th, or resampled to `fps_out`."""
    if index < start:
        return False
    k = index - start
    if fps_out is None:
        return k % stride == 0
    # Keep the first frame at or after each output tick t = n / fps_out (times relative to `start`).
    return int(np.floor(k * fps_out / fps_in + 1e-9)) != int(np.floor((k - 1) * fps_out / fps_in + 1e-9)) or k == 0


def read_frames(path: Path, start: int = 0, stride: int = 1, fps: float | None = None,
                limit: int | None = None) -> tuple[VideoInfo, Iterator[tuple[int, torch.Tensor]]]:
    """The clip's info and a lazy iterator of (source index, (3, H, W) float frame in [0, 1]) for selected frames."""
    gen, info = _open(path)
    w, h = info.size

    def frames() -> Iterator[tuple[int, torch.Tensor]]:
        taken = 0
        try:
            for index, raw in enumerate(gen):
                if limit is not None and taken >= limit:
                    break
                if not select(index, start, stride, info.fps, fps):
                    continue
                arr = np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
                taken += 1
                yield index, torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)
        except RuntimeError as exc:  # ffmpeg died mid-stream: a truncated or corrupt file
            raise InputError(f"{path}: ffmpeg failed while reading frames ({str(exc).splitlines()[0][:120]})") \
                from None
        finally:
            gen.close()

    return info, frames()


def check_video_output(path: Path, as_frames: bool = False) -> str:
    """The kind of video output a path names: "ffmpeg", "gif", or (with `as_frames`) "frames", a PNG folder."""
    if as_frames:
        return "frames"
    suffix = Path(path).suffix.lower()
    if suffix in FFMPEG_EXTS:
        return "ffmpeg"
    if suffix == ".gif":
        return "gif"
    raise UsageError(f"cannot write video as '{suffix or path}': expected one of {', '.join(sorted(VIDEO_EXTS))} "
                     f"(or --as-frames for a folder of PNG frames)")


class VideoWriter:
    """Writes frames to a video file (or PNG folder) as they come; the file appears only on `close()`.

    H.264/VP9 need even dimensions: odd sizes are padded by one replicated row/column (`written_size`).
    """

    def __init__(self, path: Path, fps: float, size: tuple[int, int], as_frames: bool = False):
        self.path, self.fps, self.size = Path(path), fps, size
        self._tmp: Path | None = None
        self._ffmpeg = None
        try:
            with writing(self.path):
                self._open(as_frames)
        except BaseException:
            self.abort()
            raise

    def _open(self, as_frames: bool) -> None:
        fps, size = self.fps, self.size
        self.kind = check_video_output(self.path, as_frames)
        self.count = 0
        w, h = size
        self.written_size = (w + w % 2, h + h % 2) if self.kind == "ffmpeg" else size
        self._gif_frames: list = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "frames":  # a hidden folder beside it, renamed into place when complete
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent))
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=f".part{self.path.suffix}",
                                   dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        if self.kind == "ffmpeg":
            import imageio_ffmpeg

            # x264 holds its look-ahead frames (40 by default): at 1080p that is hundreds of MB in the encoder
            # process, and a short clip never fills it; 10 frames keep long clips' memory near short ones'.
            codec = CODECS.get(self.path.suffix.lower(), "libx264")
            self._ffmpeg = imageio_ffmpeg.write_frames(
                str(self._tmp), self.written_size, fps=fps, codec=codec, pix_fmt_out="yuv420p", quality=None,
                macro_block_size=1, ffmpeg_log_level="error",
                output_params=["-crf", "16"] + (["-b:v", "0"] if "vpx" in codec else ["-rc-lookahead", "10"]),
            )
            self._ffmpeg.send(None)

    def write(self, frame: torch.Tensor) -> None:
        """Append one (3, H, W) frame in [0, 1]."""
        with writing(self.path):
            self._write(frame)

    def _write(self, frame: torch.Tensor) -> None:
        from vaecli.media import to_uint8

        arr = to_uint8(frame)
        if self.kind == "frames":
            from vaecli.media import write_image

            write_image(self._tmp / f"frame_{self.count:06d}.png", frame[None])
        elif self.kind == "gif":
            from PIL import Image

            self._gif_frames.append(Image.fromarray(arr, "RGB"))
        else:
            pad_w, pad_h = self.written_size[0] - arr.shape[1], self.written_size[1] - arr.shape[0]
            if pad_w or pad_h:
                arr = np.pad(arr, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            self._ffmpeg.send(np.ascontiguousarray(arr))
        self.count += 1

    def close(self) -> None:
        """Finish the file and move it into place."""
        with writing(self.path):
            self._close()

    def _close(self) -> None:
        if self.kind == "frames":
            self._tmp.chmod(output_file_mode(folder=True))
            if self.path.is_dir():  # --overwrite: the old folder goes only once the new one is complete
                old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old", dir=self.path.parent))
                os.replace(self.path, old / "x")
                os.replace(self._tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self._tmp, self.path)
            self._tmp = None
            return
        if self.kind == "gif":
            if not self._gif_frames:
                raise UsageError("no frames to write")
            self._gif_frames[0].save(self._tmp, format="GIF", save_all=True, append_images=self._gif_frames[1:],
                                     duration=round(1000 / self.fps), loop=0)
        else:
            self._ffmpeg.close()
        os.chmod(self._tmp, output_file_mode())
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop a partly written file."""
        if self._ffmpeg is not None:
            import logging

            # imageio-ffmpeg warns that a video closed with no frames is invalid: this one is being dropped, and
            # the user gets the one error line that says why.
            log = logging.getLogger("imageio_ffmpeg")
            disabled, log.disabled = log.disabled, True
            try:
                self._ffmpeg.close()
            except Exception:  # ffmpeg may already be gone; the temp file is removed either way
                pass
            finally:
                log.disabled = disabled
        if self._tmp is not None and self._tmp.is_dir():
            shutil.rmtree(self._tmp, ignore_errors=True)
        elif self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
