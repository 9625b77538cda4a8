"""Video I/O through imageio-ffmpeg (and Pillow for GIF output): streaming frame readers and atomic writers.

Frames inside the library are (3, H, W) float32 tensors in [0, 1]; nothing here holds a whole clip.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from vaecli.errors import InputError, OutputError, UsageError
from vaecli.files import check_input, output_error, output_file_mode, reading, temp_prefix, writing
from vaecli.media import max_pixels

# imageio-ffmpeg warns through logging (a rotated clip's swapped size, a reader it had to kill): with no handler set
# up, Python prints those on stderr, through -q. What matters reaches the user as an error.
logging.getLogger("imageio_ffmpeg").addHandler(logging.NullHandler())
logging.getLogger("imageio_ffmpeg").propagate = False

FFMPEG_EXTS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
VIDEO_EXTS = FFMPEG_EXTS | {".gif"}
STILL_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MJPEG_EXTS = {".mjpeg", ".mjpg"}  # a stream of JPEG pictures: it starts as one JPEG does
CODECS = {".webm": "libvpx-vp9"}  # everything else: H.264
# Frame rates every writer here stores (latents.py's metadata check uses the same bounds): beyond them ffmpeg
# refuses the rate or a GIF's frame delay overflows.
FPS_MIN, FPS_MAX = 0.001, 1000.0
# 30 and 29.97 (30000/1001, or typed as 29.97), 24 and 23.976 name the same rate: 1001/1000 and the typed rounding.
SAME_RATE = 1.0011
FPS_RANGE = f"expected fps between {FPS_MIN:g} and {FPS_MAX:g}"
GIF_MAX_DELAY_MS = 655350  # a GIF frame delay is a 16-bit count of centiseconds
GIF_MIN_DELAY_CS = 2  # browsers slow any shorter frame to 10 cs
FRAME_NAME = re.compile(r"frame_\d{6,}\.png")  # what --as-frames writes


def fps_ok(fps: float) -> bool:
    """Whether `fps` is a frame rate within FPS_MIN .. FPS_MAX."""
    return math.isfinite(fps) and FPS_MIN <= fps <= FPS_MAX


@dataclass(frozen=True)
class VideoInfo:
    """A clip's frame rate, frame size (W, H) and duration in seconds, as ffmpeg reports them."""

    fps: float
    size: tuple[int, int]
    duration: float


def check_not_latent(path: Path) -> None:
    """Refuse a latent file given as a clip, by its name (before its default output, the same name, is refused)."""
    if Path(path).name.lower().endswith((".latent", ".safetensors")):
        raise InputError(f"{path}: is a latent file, not a video (use 'vae decode')")


def _open(path: Path):
    import imageio_ffmpeg

    path = Path(path)
    check_not_latent(path)
    check_input(path, "a video file")
    if path.suffix.lower() in STILL_EXTS:
        raise InputError(f"{path}: is a still image, not a video (use 'vae encode')")
    with reading(path), open(path, "rb") as f:  # ffmpeg would call either 'not a video ffmpeg can read'
        head = f.read(12)
    if not head:
        raise InputError(f"{path}: empty file, expected a video")
    still = _still_format(head, path.suffix.lower())
    if still:  # ffmpeg reads it as a clip of one frame at 25 fps
        raise InputError(f"{path}: is a {still} image, not a video (use 'vae encode')")
    # ffmpeg's image pipe is constant-rate: it would repeat the frames of a variable-rate clip (a GIF, a phone's)
    # to its base rate while the clip's mean rate is what is recorded. Each source frame once, at the mean rate.
    gen = imageio_ffmpeg.read_frames(_ffmpeg_input(path), pix_fmt="rgb24", output_params=["-fps_mode", "passthrough"])
    try:
        meta = next(gen)
    except (OSError, RuntimeError, StopIteration, ValueError):
        gen.close()
        raise InputError(f"{path}: not a video ffmpeg can read") from None
    if not meta.get("fps") or not meta.get("size"):
        gen.close()
        if meta.get("size") and head.startswith(b"GIF8"):  # one picture, no frame delay: no rate to record
            raise InputError(f"{path}: is a still GIF image (one picture, no frame rate), not a video "
                             f"(use 'vae encode')")
        raise InputError(f"{path}: not a video ffmpeg can read (no video stream)")
    (w, h), limit = meta["size"], max_pixels()
    if w * h > limit:  # as for images: a decompression bomb, or more than this machine is set up to take
        gen.close()
        raise InputError(f"{path}: video frames have {w * h} pixels ({w}x{h}), over the limit of {limit} pixels "
                         f"(set VAE_MAX_PIXELS to allow larger frames)")
    return gen, VideoInfo(fps=float(meta["fps"]), size=tuple(meta["size"]), duration=float(meta.get("duration") or 0))


def _still_format(head: bytes, suffix: str) -> str | None:
    """The still-image format whose signature starts `head`, the first 12 bytes of a file named `*suffix`, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff") and suffix not in MJPEG_EXTS:
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    return None


def _ffmpeg_input(path: Path) -> str:
    # ffmpeg takes "name:" at the start of a relative path for a protocol ('file:clip.mp4' reads clip.mp4, 'a:b.mp4'
    # fails): an absolute path is always the file itself.
    return os.path.abspath(path)


def _decode_error(path: Path) -> str | None:
    """ffmpeg's first error decoding the video stream of `path` to the end (None if there is none)."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-xerror", "-i", _ffmpeg_input(path),
           "-map", "0:v:0", "-f", "null", "-"]
    run = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    # Without the "[h264 @ 0x55d0...]" prefixes, which change from run to run.
    lines = [re.sub(r"^(\[[^\]]*\]\s*)+", "", line.strip()) for line in run.stderr.splitlines()]
    lines = [line for line in lines if line]
    # An error logged is one even when ffmpeg exits 0: Matroska's reader says 'File ended prematurely' at a cut and
    # carries on to a clean end.
    if run.returncode == 0 and not lines:
        return None
    return lines[0][:120] if lines else f"exit status {run.returncode}"


def _riff_short(path: Path) -> tuple[int, int] | None:
    """(bytes held, bytes declared) where `path` is an AVI shorter than its RIFF header says, else None."""
    with reading(path), open(path, "rb") as f:
        head = f.read(12)
        held = os.fstat(f.fileno()).st_size
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"AVI ":
        return None
    declared = int.from_bytes(head[4:8], "little") + 8
    # 0 and all-ones are what a writer that could not seek back leaves: no size was declared.
    return (held, declared) if held < declared and declared < 0xFFFFFFF0 else None


def _gif_cut(path: Path) -> bool:
    """Whether `path` is a GIF that does not end with the trailer byte every GIF ends with (zero padding aside)."""
    with reading(path), open(path, "rb") as f:
        if f.read(6) not in (b"GIF87a", b"GIF89a"):
            return False
        f.seek(max(6, os.fstat(f.fileno()).st_size - 4096))
        return not f.read().rstrip(b"\0").endswith(b";")


def probe(path: Path) -> VideoInfo:
    """Frame rate, size and duration of a video file, or an InputError if ffmpeg cannot read it."""
    gen, info = _open(path)
    gen.close()
    return info


def same_rate(fps: float, clip_fps: float) -> bool:
    """Whether a requested `fps` is the clip's rate to within NTSC's 1000/1001 (30 for a 29.97 fps clip)."""
    return max(fps, clip_fps) <= min(fps, clip_fps) * SAME_RATE


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
    if fps is not None and same_rate(fps, info.fps):
        fps = None  # every frame: resampling by a thousandth would only drop one frame in a thousand
    if fps is not None and fps > info.fps:
        gen.close()
        raise InputError(f"{path}: --fps {fps:g} is above the clip's {info.fps:g} fps: frames are dropped to lower "
                         f"the rate, never repeated (leave --fps out to keep every frame)")

    def frames() -> Iterator[tuple[int, torch.Tensor]]:
        taken, count = 0, 0
        try:
            for index, raw in enumerate(gen):
                count = index + 1
                if limit is not None and taken >= limit:
                    return
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
        promised = info.duration * info.fps
        # ffmpeg ends a truncated file early without failing. Frames short of what the header promises may also be
        # a longer audio track: a decode that stops at the first error tells the two apart.
        if count < promised - 1.5 and (why := _decode_error(path)):
            raise InputError(f"{path}: truncated or corrupt video: ffmpeg decoded {count} of the {round(promised)} "
                             f"frames its header promises ({why})")
        # An AVI cut off loses its index, and ffmpeg then estimates the duration from what is left: its RIFF
        # header's size still says how long the file was.
        if (sizes := _riff_short(path)) and (why := _decode_error(path)):
            raise InputError(f"{path}: truncated or corrupt video: the file holds {sizes[0]} of the {sizes[1]} bytes "
                             f"its AVI header declares ({why})")
        # A GIF records no duration either, and ffmpeg reads one cut off to the cut without a word: it ends with a
        # trailer byte.
        if _gif_cut(path):
            raise InputError(f"{path}: truncated or corrupt video: ffmpeg decoded {count} frames and the GIF ends "
                             f"without its trailer (expected a final ';' byte)")

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


def check_frames_folder(path: Path) -> None:
    """Refuse to replace `path` unless it is a folder holding nothing but frame_NNNNNN.png files (a previous
    --as-frames output), so that no file vaecli did not write is ever deleted."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise OutputError(f"{path}: is {kind}, expected a folder of frames or a new name")
    others = sorted(p.name for p in path.iterdir() if not _is_frame(p))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise OutputError(f"{path}: refusing to replace this folder: expected only frame_NNNNNN.png files (an "
                          f"earlier --as-frames output), found {shown} (move them or choose another -o)")


def _is_frame(path: Path) -> bool:
    return FRAME_NAME.fullmatch(path.name) is not None and path.is_file() and not path.is_symlink()


def _remove_frames(folder: Path) -> None:
    """Delete a replaced frames folder file by file: only frames go, never anything that appeared meanwhile."""
    for p in folder.iterdir():
        if _is_frame(p):
            p.unlink()
    try:
        folder.rmdir()
    except OSError:  # something other than frames appeared since the check: keep it rather than delete it
        pass


def _gif_delay(path: Path, fps: float) -> int:
    """A GIF frame's delay in ms at `fps` (whole centiseconds, as GIF stores it), or an OutputError where a GIF
    cannot hold the rate."""
    centis = round(100 / fps)
    if centis * 10 > GIF_MAX_DELAY_MS:
        raise OutputError(f"{path}: a GIF frame lasts at most {GIF_MAX_DELAY_MS / 1000:g} s, got {fps:g} fps "
                          f"(expected at least {1000 / GIF_MAX_DELAY_MS:.5f} fps; write .mp4 instead)")
    if fps > 100 / GIF_MIN_DELAY_CS:  # browsers play shorter delays as 0.1 s: a 60 fps GIF would run at 10 fps
        raise OutputError(f"{path}: a GIF frame lasts at least {GIF_MIN_DELAY_CS / 100:g} s where it is played, "
                          f"got {fps:g} fps (expected at most {100 / GIF_MIN_DELAY_CS:g} fps; write .mp4 instead)")
    return centis * 10


_OS_ERRORS = {os.strerror(e): e for e in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EFBIG)}


def ffmpeg_error(dest: Path, log: str, code: int) -> OutputError:
    """A one-line OutputError from ffmpeg's log: the OS error it names (as for any other write), else its first
    line, the cause (later lines are what failed in turn), without its [component @ address] prefix."""
    lines = [re.sub(r"^(\[[^\]]*\]\s*)+", "", line).strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        for text, number in _OS_ERRORS.items():
            if text in line:
                return output_error(dest, OSError(number, text))
    why = " ".join(lines[0].split())[:200] if lines else f"exit status {code}"
    return OutputError(f"{dest}: cannot write: ffmpeg failed: {why}")


class _Ffmpeg:
    """An ffmpeg process encoding raw RGB frames from its stdin into `path`, its log kept in a temp file (not the
    terminal) so that a failure becomes one OutputError about `dest`."""

    def __init__(self, path: Path, dest: Path, size: tuple[int, int], fps: float, codec: str):
        import imageio_ffmpeg

        self.dest = dest
        # x264 holds its look-ahead frames (40 by default): at 1080p that is hundreds of MB in the encoder
        # process, and a short clip never fills it; 10 frames keep long clips' memory near short ones'.
        tuning = ["-b:v", "0"] if "vpx" in codec else ["-rc-lookahead", "10"]
        # The RGB frames become YUV by BT.601's matrix, in limited range: said in the file, since players take an
        # untagged HD clip for BT.709 and would shift its colours.
        colour = ["-colorspace", "smpte170m", "-color_range", "tv"]
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
               "-s", f"{size[0]}x{size[1]}", "-pix_fmt", "rgb24", "-r", str(Fraction(fps).limit_denominator()),
               "-i", "-", "-an", "-vcodec", codec, "-pix_fmt", "yuv420p", *colour, "-v", "error", "-crf", "16", *tuning,
               str(path)]
        self._log = tempfile.TemporaryFile()
        try:  # its own session: Ctrl-C reaches vaecli, which stops ffmpeg and drops the file
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log,
                                          start_new_session=True)
        except BaseException:
            self._log.close()
            raise

    def send(self, frame: np.ndarray) -> None:
        """Pass one (H, W, 3) uint8 frame to ffmpeg."""
        try:
            self._proc.stdin.write(frame)
        except BrokenPipeError:  # ffmpeg has exited: its status and log say why
            self.close()
            raise OutputError(f"{self.dest}: cannot write: ffmpeg stopped reading frames") from None

    def close(self) -> None:
        """Let ffmpeg finish the file; an OutputError if it failed."""
        try:
            self._proc.stdin.close()
        except BrokenPipeError:  # ffmpeg exited early: its status says whether that was a failure
            pass
        code = self._proc.wait()
        self._log.seek(0)
        log = self._log.read().decode(errors="replace")
        self._log.close()
        if code != 0:
            raise ffmpeg_error(self.dest, log, code)

    def kill(self) -> None:
        """Stop ffmpeg at once (the file it was writing is dropped)."""
        if self._proc.poll() is None:
            self._proc.kill()
        try:
            self._proc.stdin.close()
        except OSError:  # unflushed frames to a process that is gone
            pass
        self._proc.wait()
        self._log.close()


class VideoWriter:
    """Writes frames to a video file (or PNG folder) as they come; the file appears only on `close()`.

    H.264/VP9 need even dimensions: odd sizes are padded by one replicated row/column (`written_size`).
    An existing PNG folder is replaced only when it holds nothing but frames (`check_frames_folder`).
    """

    def __init__(self, path: Path, fps: float, size: tuple[int, int], as_frames: bool = False):
        self.path, self.fps, self.size = Path(path), fps, size
        self._tmp: Path | None = None
        self._ffmpeg: _Ffmpeg | None = None
        self._gif = None  # the GIF temp file, written frame by frame
        if not fps_ok(fps):
            raise InputError(f"{self.path}: {FPS_RANGE}, got {float(fps):g}")
        try:
            with writing(self.path):
                self._open(as_frames)
        except BaseException:
            self.abort()
            raise

    def _open(self, as_frames: bool) -> None:
        self.kind = check_video_output(self.path, as_frames)
        self.count = 0
        w, h = self.size
        self.written_size = (w + w % 2, h + h % 2) if self.kind == "ffmpeg" else self.size
        if self.kind == "gif":
            self._gif_delay = _gif_delay(self.path, self.fps)
        if self.kind == "frames":
            check_frames_folder(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "frames":  # a hidden folder beside it, renamed into place when complete
            self._tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(self.path), suffix=".part", dir=self.path.parent))
            return
        suffix = f".part{self.path.suffix}"
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(self.path, suffix), suffix=suffix, dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        if self.kind == "ffmpeg":
            codec = CODECS.get(self.path.suffix.lower(), "libx264")
            self._ffmpeg = _Ffmpeg(self._tmp, self.path, self.written_size, self.fps, codec)
        elif self.kind == "gif":
            self._gif = open(self._tmp, "wb")

    def write(self, frame: torch.Tensor) -> None:
        """Append one (3, H, W) frame in [0, 1]."""
        with writing(self.path):
            self._write(frame)

    def _write(self, frame: torch.Tensor) -> None:
        from vaecli.media import to_uint8

        arr = to_uint8(frame)
        if self.kind == "frames":  # straight into the temp folder, itself renamed into place when complete: an
            from PIL import Image  # error names the output folder, not a temp file inside it

            from vaecli.media import save_pillow

            save_pillow(Image.fromarray(arr, "RGB"), self._tmp / f"frame_{self.count:06d}.png", format="PNG")
        elif self.kind == "gif":
            self._write_gif(arr)
        else:
            pad_w, pad_h = self.written_size[0] - arr.shape[1], self.written_size[1] - arr.shape[0]
            if pad_w or pad_h:
                arr = np.pad(arr, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            self._ffmpeg.send(np.ascontiguousarray(arr))
        self.count += 1

    def _write_gif(self, arr: np.ndarray) -> None:
        # Frame by frame, each with its own palette as Pillow's save_all makes them (the same pixels), rather than
        # through save_all, which holds every frame of the clip until it writes the file.
        from PIL import GifImagePlugin, Image

        frame = Image.fromarray(arr, "RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        if self.count == 0:
            header, _ = GifImagePlugin.getheader(frame, None, {"loop": 0})
            self._gif.write(b"".join(header))
        data = GifImagePlugin.getdata(frame, (0, 0), duration=self._gif_delay, include_color_table=self.count > 0)
        self._gif.write(b"".join(data))

    def close(self) -> None:
        """Finish the file and move it into place; on any failure nothing of it remains."""
        try:
            with writing(self.path):
                self._close()
        except BaseException:
            self.abort()
            raise

    def _close(self) -> None:
        if self.kind == "frames":
            self._tmp.chmod(output_file_mode(folder=True))
            self._replace_folder()
            self._tmp = None
            return
        if self.kind == "gif":
            if not self.count:
                raise UsageError("no frames to write")
            gif, self._gif = self._gif, None
            with gif:
                gif.write(b";")  # the trailer
        else:
            self._ffmpeg.close()
            self._ffmpeg = None  # finished: kept until then so that abort() can stop it (Ctrl-C while it ends)
        os.chmod(self._tmp, output_file_mode())
        os.replace(self._tmp, self.path)
        self._tmp = None

    def _replace_folder(self) -> None:
        """Move the finished frames folder into place; an old one goes only once the new one is there."""
        check_frames_folder(self.path)  # again: it may have changed while the frames were decoded
        if not self.path.is_dir():
            os.replace(self._tmp, self.path)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old", dir=self.path.parent))
        os.replace(self.path, old / "x")
        try:
            os.replace(self._tmp, self.path)
        except BaseException:
            os.replace(old / "x", self.path)  # the old frames back where they were
            old.rmdir()
            raise
        _remove_frames(old / "x")
        _remove_frames(old)  # the holder, empty unless something other than frames was kept

    def abort(self) -> None:
        """Drop a partly written file."""
        if self._ffmpeg is not None:
            ffmpeg, self._ffmpeg = self._ffmpeg, None
            ffmpeg.kill()
        if self._gif is not None:
            gif, self._gif = self._gif, None
            with suppress(OSError):  # what it still buffers cannot be written either (a full disk): dropped anyway
                gif.close()
        if self._tmp is not None and self._tmp.is_dir():
            shutil.rmtree(self._tmp, ignore_errors=True)
        elif self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tmp = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
