"""The `vae` command line: parses options, wires the library together, prints results.

torch is imported only inside commands that compute, so `vae --help` and `vae models` start fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli import __version__
from vaecli.errors import UsageError, VaeError
from vaecli.registry import DEFAULT_MODEL, REGISTRY

app = typer.Typer(
    name="vae",
    help="Move images into diffusion-model latents and back: encode, decode, roundtrip.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelName = Enum("ModelName", {name: name for name in REGISTRY}, type=str)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Alpha(str, Enum):
    white = "white"
    black = "black"
    drop = "drop"


class Space(str, Enum):
    scaled = "scaled"
    raw = "raw"
    normalized = "normalized"


class LatentFormat(str, Enum):
    safetensors = "safetensors"
    png = "png"


LATENT_EXTS = {".latent": "safetensors", ".safetensors": "safetensors", ".png": "png"}

OutputOpt = Annotated[Optional[Path], typer.Option(
    "-o", "--output", help="Output file, or a folder for several inputs (default: beside each input).")]
WeightsOpt = Annotated[Optional[list[Path]], typer.Option(
    "-w", "--weights", help="Weights file or folder (original .pth, diffusers folder or .safetensors); "
    "repeat for encoder and decoder files. Default: search VAE_WEIGHTS_DIR, weights/, ~/.cache/vaecli.")]
NoVerifyOpt = Annotated[bool, typer.Option(
    "--no-verify", help="Use weights found on the search path even if their SHA-256 does not match.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to compute.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Compute dtype.")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object per input on stdout; human messages go to stderr.")]
AlphaOpt = Annotated[Alpha, typer.Option(
    "--alpha", help="Transparent images: composite on white or black, or drop the alpha channel.")]


RecursiveOpt = Annotated[bool, typer.Option("-r", "--recursive", help="Walk folders recursively.")]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", help="Same-sized images computed together (split further to stay within memory).")]
SkipOpt = Annotated[Optional[bool], typer.Option(
    "--skip-existing/--overwrite", help="Skip inputs whose output exists (default with -o FOLDER, so an "
    "interrupted batch resumes), or recompute everything.", show_default=False)]
FailFastOpt = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first input that fails.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress or per-file lines; errors only.")]
TileOpt = Annotated[str, typer.Option(
    "--tile", help="Tiny models: 'auto' tiles when the image would not fit --max-memory; 'off'; or a tile size in "
    "pixels. Tiles overlap by the receptive field and keep only exact centres: no seams.")]
MaxMemOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", help="Memory budget for activations, e.g. 2GB (default: 1GiB, or half the free RAM if less).")]
NameOpt = Annotated[Optional[str], typer.Option(
    "--name", help="Output file name template with {stem}, {ext}, {model}, e.g. '{stem}.{model}{ext}'.")]
SuffixOpt = Annotated[str, typer.Option("--suffix", help="Added to each output's stem, e.g. '_taef2'.")]


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _fail(exc: VaeError) -> typer.Exit:
    _say(f"Error: {exc}")
    return typer.Exit(exc.exit_code)


class Reporter:
    """Reports finished inputs: JSON lines on stdout; a rich progress bar on a terminal, else plain lines."""

    def __init__(self, total: int, as_json: bool, quiet: bool):
        self.total, self.as_json, self.quiet = total, as_json, quiet
        self.counts = {"ok": 0, "skipped": 0, "error": 0}
        self.failures: list[str] = []
        self.progress = None
        if sys.stderr.isatty() and not quiet and total > 1:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class Rate(ProgressColumn):
                def render(self, task) -> Text:
                    speed = task.finished_speed or task.speed
                    return Text(f"{speed:.2f} files/s" if speed else "")

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.progress.add_task("vae", total=total)
            self.progress.start()

    def __call__(self, job) -> None:
        self.counts[job.status] += 1
        if job.status == "error":
            msg = job.error if job.error.startswith(str(job.src)) else f"{job.src}: {job.error}"
            self.failures.append(msg)
            self._line(f"Error: {msg}", always=True)
        elif job.status == "skipped":
            self._line(f"{job.src} -> {job.dst}  skipped (exists; --overwrite to redo)")
        else:
            self._line(job.extra.pop("line"))
        if self.as_json:
            record = {"input": str(job.src), "output": str(job.dst) if job.dst and job.status != "error" else None,
                      "status": job.status, "error": job.error, **job.extra}
            typer.echo(json.dumps(record))
        if self.progress is not None:
            self.progress.advance(self.task)

    def _line(self, text: str, always: bool = False) -> None:
        if self.progress is not None:
            if always:
                self.progress.console.print(text, markup=False, highlight=False)
        elif always or not self.quiet:
            _say(text)

    def finish(self) -> int:
        """Print the summary; the exit code: 0 all done, 1 some failed."""
        if self.progress is not None:
            self.progress.stop()
        if self.total > 1 and not self.quiet:
            _say(f"done: {self.counts['ok']} ok, {self.counts['skipped']} skipped, {self.counts['error']} failed")
        if self.total > 1 and self.failures:
            _say(f"{len(self.failures)} of {self.total} inputs failed:")
            for msg in self.failures:
                _say(f"  {msg}")
        return 1 if self.failures else 0


def _run_batch(jobs, as_json: bool, quiet: bool, **stages) -> None:
    """Run jobs through `vaecli.batch.run`, report them, and exit with 0, 1, or 130 when interrupted."""
    import signal

    from vaecli import batch

    reporter = Reporter(len(jobs), as_json, quiet)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        batch.run(jobs, on_done=reporter, **stages)
    except KeyboardInterrupt:
        reporter.finish()
        _say("Interrupted: finished outputs are complete; rerun to do the rest")
        raise typer.Exit(130) from None
    except VaeError as exc:
        raise _fail(exc) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(reporter.finish())


def _plan(inputs: list[str], output: Optional[Path], recursive: bool, exts: tuple[str, ...],
          name: Callable[[Path], str], skip_existing: Optional[bool], beside: bool = True):
    """Expand inputs, plan their outputs (none without -o unless `beside`), and whether existing ones are skipped."""
    from vaecli.batch import Job, expand_inputs
    from vaecli.files import is_folder_target, plan_outputs

    pairs = expand_inputs(inputs, recursive, exts)
    if not pairs:
        raise UsageError("no inputs (stdin was empty)")
    srcs, rels = [p for p, _ in pairs], [r for _, r in pairs]
    outs = plan_outputs(srcs, output, name, rels) if output is not None or beside else [None] * len(srcs)
    folder = output is not None and is_folder_target(output, len(srcs))
    skip = folder if skip_existing is None else skip_existing
    return [Job(src, dst) for src, dst in zip(srcs, outs, strict=True)], skip


def _tiling(tile: str, max_memory: Optional[str]) -> dict:
    """`load_codec` keyword arguments for --tile and --max-memory."""
    from vaecli import tiling

    return {"tile": tiling.resolve_tile(tile), "budget": tiling.parse_size(max_memory) if max_memory else 0}


def _split(group: list, codec) -> list[list]:
    """Cut a group of same-sized image jobs into forward passes that stay within the model's pixel budget."""
    h, w = group[0].payload[0].shape[-2:]
    per = max(1, codec.max_batch_pixels // (h * w))
    return [group[i:i + per] for i in range(0, len(group), per)]


def _namer(template: Optional[str], suffix: str, ext: str, model: str = "") -> Callable[[Path], str]:
    from vaecli.files import strip_suffixes

    template = template or "{stem}{suffix}{ext}"

    def name(p: Path) -> str:
        stem = strip_suffixes(p, ".latent")
        try:
            return template.format(stem=stem, ext=ext, model=model, suffix=suffix)
        except (KeyError, IndexError, ValueError):
            raise UsageError(f"--name {template}: use only {{stem}}, {{ext}}, {{model}} and {{suffix}}") from None

    return name


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vaecli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """vaecli: a latent codec for diffusion autoencoders (TAESD family; default model taef2)."""


def _latent_format(output: Optional[Path], n_inputs: int, fmt: Optional[LatentFormat]) -> str:
    from vaecli.files import is_folder_target

    if output is not None and not is_folder_target(output, n_inputs):
        by_ext = LATENT_EXTS.get(output.suffix.lower())
        if by_ext is None:
            raise UsageError(f"-o {output}: expected a latent file ending in .latent, .safetensors or .png")
        if fmt is not None and fmt.value != by_ext:
            raise UsageError(f"--format {fmt.value} disagrees with the output name {output}")
        return by_ext
    return fmt.value if fmt else "safetensors"


@app.command()
def encode(
    inputs: Annotated[list[str], typer.Argument(
        help="Images (PNG, JPEG, WebP, BMP, TIFF), folders, globs, or - to read paths from stdin.")],
    output: OutputOpt = None,
    model: Annotated[ModelName, typer.Option("-m", "--model", help="Registry model (see 'vae models').")]
    = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    fmt: Annotated[Optional[LatentFormat], typer.Option(
        "--format", help="Latent file format (default: from the -o extension, else safetensors).")] = None,
    space: Annotated[Optional[Space], typer.Option(
        "--latent-space", help="KL models: 'scaled' = (mean - shift) * scale, what the denoiser consumes (default); "
        "'raw' = the posterior itself; 'normalized' = FLUX.2's 2x2-patchified, batch-normed latents.")] = None,
    sample: Annotated[bool, typer.Option(
        "--sample", help="KL models: draw from the posterior instead of taking its mean.")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for --sample (reproducible draws).")] = None,
    alpha: AlphaOpt = Alpha.white,
    recursive: RecursiveOpt = False,
    batch_size: BatchOpt = 8,
    skip_existing: SkipOpt = None,
    fail_fast: FailFastOpt = False,
    name: NameOpt = None,
    suffix: SuffixOpt = "",
    tile: TileOpt = "auto",
    max_memory: MaxMemOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    no_verify: NoVerifyOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode images into latents (.latent/.safetensors with metadata, or 8-bit .png)."""
    import torch

    from vaecli import batch, latents, media
    from vaecli.codec import load_codec

    try:
        n_hint = 2 if len(inputs) > 1 or any(Path(i).is_dir() or i == "-" for i in inputs) else 1
        kind = _latent_format(output, n_hint, fmt)
        ext = ".latent.png" if kind == "png" else ".latent"
        jobs, skip = _plan(inputs, output, recursive, batch.IMAGE_EXTS, _namer(name, suffix, ext, model.value),
                           skip_existing)
        if seed is not None and not sample:
            raise UsageError("--seed only applies with --sample")
        codec = load_codec(model.value, weights, ("encoder",), device.value, dtype.value, not no_verify,
                           **_tiling(tile, max_memory))
        codec.check_encode_options(space.value if space else None, sample)
    except VaeError as exc:
        raise _fail(exc) from None
    save = latents.save_png if kind == "png" else latents.save_safetensors

    def compute(group) -> None:
        size = group[0].payload[1].size
        for part in _split(group, codec):
            pixels = torch.cat([job.payload[0] for job in part])
            out, meta = codec.encode_batch(pixels, size, space.value if space else None, sample, seed)
            for job, latent in zip(part, out, strict=True):
                job.payload = (latent.clone(), meta)

    def write(job) -> None:
        latent, meta = job.payload
        save(job.dst, latent, meta)
        shape = list(latent.shape)
        job.extra = {"model": codec.spec.name, "shape": shape,
                     "line": f"{job.src} -> {job.dst}  {codec.spec.name} latent {shape}"}

    _run_batch(jobs, as_json, quiet, read=lambda job: media.read_image(job.src, alpha.value), compute=compute,
               write=write, batch_size=1 if sample else batch_size, fail_fast=fail_fast,
               key=lambda job: tuple(job.payload[0].shape), skip=lambda job: skip and job.dst.exists())


@app.command()
def decode(
    inputs: Annotated[list[str], typer.Argument(
        help="Latent files written by 'vae encode' or 'vae video', folders, globs, or - for stdin.")],
    output: OutputOpt = None,
    model: Annotated[Optional[ModelName], typer.Option(
        "-m", "--model", help="Decode with this model instead of the one named in the latent's metadata.")] = None,
    weights: WeightsOpt = None,
    chunk: Annotated[int, typer.Option("--chunk", help="Latent videos: frames decoded at a time (SVD mixes "
                                                     "frames within a chunk).")] = 8,
    as_frames: Annotated[bool, typer.Option(
        "--as-frames", help="Latent videos: write a folder of PNG frames (frame_000000.png, ...).")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Also decode a window around a tile seam untiled and report the max abs difference and "
        "PSNR of the tiled result there.")] = False,
    image_ext: Annotated[str, typer.Option(
        "--ext", help="Image extension for outputs vaecli names (png, jpg, webp, ...).")] = "png",
    recursive: RecursiveOpt = False,
    skip_existing: SkipOpt = None,
    fail_fast: FailFastOpt = False,
    name: NameOpt = None,
    suffix: SuffixOpt = "",
    tile: TileOpt = "auto",
    max_memory: MaxMemOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    no_verify: NoVerifyOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Decode latent files back to images (PNG, JPEG, WebP, BMP, TIFF) or latent videos to clips (by -o extension)."""
    from vaecli import batch, clips, latents, media, video
    from vaecli.codec import Codec, check_latent_fits, get_spec, load_codec
    from vaecli.errors import InputError

    image_suffix = "." + image_ext.lstrip(".").lower()

    def default_name(p: Path) -> str:
        try:
            is_video = latents.read_metadata(p).get("kind") == "video"
        except VaeError:
            is_video = False  # reported when the input itself is processed
        ext = "" if as_frames else ".mp4" if is_video else image_suffix
        return _namer(name, suffix, ext, model.value if model else "")(p)

    try:
        tiling_options = _tiling(tile, max_memory)
        media.check_output_extension(Path("x" + image_suffix))
        jobs, skip = _plan(inputs, output, recursive, batch.LATENT_EXTS, default_name, skip_existing)
        for job in jobs:
            suffix_ = job.dst.suffix.lower()
            if not as_frames and suffix_ not in media.OUTPUT_FORMATS and suffix_ not in video.VIDEO_EXTS:
                raise UsageError(f"cannot write '{suffix_ or job.dst}': expected an image extension "
                                 f"({', '.join(media.OUTPUT_FORMATS)}) or a video extension "
                                 f"({', '.join(sorted(video.VIDEO_EXTS))})")
    except VaeError as exc:
        raise _fail(exc) from None
    codecs: dict[str, Codec] = {}

    def codec_for(name: str) -> Codec:
        if name not in codecs:
            codecs[name] = load_codec(name, weights, ("decoder",), device.value, dtype.value, not no_verify,
                                      **tiling_options)
        return codecs[name]

    def read(job):
        meta = latents.read_metadata(job.src)
        name = model.value if model else str(meta.get("model"))
        if name not in REGISTRY:
            raise InputError(f"{job.src}: made by model '{name}', which this vaecli does not know; pass --model")
        if meta.get("kind") == "video":
            if job.dst.suffix.lower() in media.OUTPUT_FORMATS and not as_frames:
                raise InputError(f"{job.src}: a latent video; write it as .mp4, .mov, .mkv, .webm, .gif "
                                 f"or use --as-frames")
            return name, None, meta
        if job.dst.suffix.lower() not in media.OUTPUT_FORMATS or as_frames:
            raise InputError(f"{job.src}: an image latent; write it as {', '.join(media.OUTPUT_FORMATS)}")
        latent, meta = latents.load_latent(job.src)
        check_latent_fits(get_spec(name), latent, meta)
        return name, latent, meta

    def compute(group) -> None:
        for job in group:
            name, latent, meta = job.payload
            if latent is None:  # a latent video streams straight to its output
                info = clips.decode_clip(codec_for(name), job.src, job.dst, chunk, as_frames)
                job.payload = None
                job.extra = {"model": name, **info,
                             "line": f"{job.src} -> {job.dst}  {name} {info['frames']} frames "
                                     f"{info['size'][0]}x{info['size'][1]} @ {info['fps']:g} fps"}
            else:
                pixels = codec_for(name).decode_latent(latent, meta)
                check = codec_for(name).verify_tiling(latent, meta, pixels) if verify else None
                job.payload = (name, pixels, check)

    def write(job) -> None:
        if job.payload is None:
            return
        name, pixels, check = job.payload
        media.write_image(job.dst, pixels)
        size = [pixels.shape[-1], pixels.shape[-2]]
        line = f"{job.src} -> {job.dst}  {name} {size[0]}x{size[1]}"
        job.extra = {"model": name, "size": size}
        if check is not None:
            job.extra["verify"] = check
            line += (f"  verify: max diff {check['max_abs_diff'] * 255:.3f}/255, PSNR {check['psnr']:.2f} dB"
                     if check["tiled"] else "  verify: not tiled")
        job.extra["line"] = line

    _run_batch(jobs, as_json, quiet, read=read, compute=compute, write=write, fail_fast=fail_fast,
               skip=lambda job: skip and job.dst.exists())


@app.command()
def roundtrip(
    inputs: Annotated[list[str], typer.Argument(
        help="Images to pass through the autoencoder, folders, globs, or - for stdin.")],
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Write reconstructions here: a file, or a folder for several inputs "
        "(default: only report the metrics).")] = None,
    model: Annotated[ModelName, typer.Option("-m", "--model", help="Registry model (see 'vae models').")]
    = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    via: Annotated[LatentFormat, typer.Option(
        "--via", help="'png' quantizes the latent through the 8-bit PNG latent scheme, as a saved PNG latent "
        "would be.")] = LatentFormat.safetensors,
    alpha: AlphaOpt = Alpha.white,
    recursive: RecursiveOpt = False,
    batch_size: BatchOpt = 8,
    skip_existing: SkipOpt = None,
    fail_fast: FailFastOpt = False,
    name: NameOpt = None,
    suffix: SuffixOpt = "",
    tile: TileOpt = "auto",
    max_memory: MaxMemOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    no_verify: NoVerifyOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode and decode images, reporting PSNR and SSIM of the reconstruction against the input."""
    import torch

    from vaecli import batch, latents, media, metrics
    from vaecli.codec import load_codec

    try:
        jobs, skip = _plan(inputs, output, recursive, batch.IMAGE_EXTS,
                           _namer(name, suffix, ".png", model.value), skip_existing, beside=False)
        for job in jobs:
            if job.dst is not None:
                media.check_output_extension(job.dst)
        codec = load_codec(model.value, weights, ("encoder", "decoder"), device.value, dtype.value, not no_verify,
                           **_tiling(tile, max_memory))
    except VaeError as exc:
        raise _fail(exc) from None

    def compute(group) -> None:
        size = group[0].payload[1].size
        for part in _split(group, codec):
            out, meta = codec.encode_batch(torch.cat([job.payload[0] for job in part]), size)
            for job, latent in zip(part, out, strict=True):
                if via == LatentFormat.png:
                    latent = latents.quantize_png(latent)
                recon = codec.decode_latent(latent, meta)
                recon = torch.from_numpy(media.to_uint8(recon)).permute(2, 0, 1)[None].float() / 255
                job.payload = (recon, metrics.psnr(recon, job.payload[0]), metrics.ssim(recon, job.payload[0]))

    def write(job) -> None:
        recon, p, s = job.payload
        if job.dst is not None:
            media.write_image(job.dst, recon)
        where = f" -> {job.dst}" if job.dst else ""
        job.extra = {"model": codec.spec.name, "psnr": round(p, 4), "ssim": round(s, 5),
                     "line": f"{job.src}{where}  PSNR {p:.2f} dB  SSIM {s:.4f}"}

    _run_batch(jobs, as_json, quiet, read=lambda job: media.read_image(job.src, alpha.value), compute=compute,
               write=write, batch_size=batch_size, fail_fast=fail_fast, key=lambda job: tuple(job.payload[0].shape),
               skip=lambda job: skip and job.dst is not None and job.dst.exists())


@app.command("video")
def video_cmd(
    source: Annotated[Path, typer.Argument(help="A clip ffmpeg can read: mp4, mov, webm, mkv, gif, ...")],
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Latent video file (.latent/.safetensors; default: beside the clip).")] = None,
    frames: Annotated[Optional[int], typer.Option(
        "--frames", help="Encode at most this many frames (a clip that ends sooner is encoded to its end).")] = None,
    start: Annotated[int, typer.Option("--start", help="First source frame (0-based).")] = 0,
    stride: Annotated[int, typer.Option("--stride", help="Keep every K-th frame.")] = 1,
    fps: Annotated[Optional[float], typer.Option(
        "--fps", help="Resample to this frame rate instead of --stride.")] = None,
    model: Annotated[ModelName, typer.Option("-m", "--model", help="Registry model (see 'vae models').")]
    = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    chunk: Annotated[int, typer.Option(
        "--chunk", help="Frames encoded (and decoded) at a time; SVD's temporal decoder mixes frames within "
        "a chunk, like diffusers' decode_chunk_size.")] = 8,
    roundtrip: Annotated[bool, typer.Option(
        "--roundtrip", help="Also decode the latents, write the reconstructed clip and report PSNR per frame.")]
    = False,
    recon: Annotated[Optional[Path], typer.Option(
        "--recon", help="Where --roundtrip writes the clip (default: <output>.recon.mp4).")] = None,
    tile: TileOpt = "auto",
    max_memory: MaxMemOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    no_verify: NoVerifyOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Encode a video clip into a latent video [frames, channels, h, w], streaming (audio is not carried)."""
    from vaecli import clips, video
    from vaecli.codec import load_codec
    from vaecli.files import plan_outputs, strip_suffixes

    try:
        clips.check_selection(start, frames, stride, fps, chunk)
        if output is not None and output.suffix.lower() not in (".latent", ".safetensors"):
            raise UsageError(f"-o {output}: expected a latent file ending in .latent or .safetensors")
        out = plan_outputs([source], output, lambda p: p.stem + ".latent")[0]
        if roundtrip:
            recon = recon or out.with_name(strip_suffixes(out, ".latent") + ".recon.mp4")
            video.check_video_output(recon)
            plan_outputs([source], recon, lambda p: p.name)
        elif recon is not None:
            raise UsageError("--recon needs --roundtrip")
        roles = ("encoder", "decoder") if roundtrip else ("encoder",)
        codec = load_codec(model.value, weights, roles, device.value, dtype.value, not no_verify,
                           **_tiling(tile, max_memory))
    except VaeError as exc:
        raise _fail(exc) from None

    def compute(group) -> None:
        job = group[0]
        report = clips.encode_clip(codec, job.src, job.dst, start=start, frames=frames, stride=stride, fps=fps,
                                   chunk=chunk, recon=recon if roundtrip else None)
        if frames is not None and report.frames < frames:
            _say(f"note: {job.src} has only {report.frames} frames to select from frame {start}; "
                 f"encoded {report.frames} of --frames {frames}")
        job.extra = {"model": codec.spec.name, "frames": report.frames, "shape": report.shape, "fps": report.fps,
                     "size": list(report.size)}
        line = f"{job.src} -> {job.dst}  {codec.spec.name} latent {report.shape} @ {report.fps:g} fps"
        if roundtrip:
            job.extra.update(recon=str(recon), written_size=list(report.written_size),
                             psnr=[round(p, 4) for p in report.psnr], mean_psnr=round(report.mean_psnr, 4))
            line += f"; recon -> {recon}  mean PSNR {report.mean_psnr:.2f} dB"
        job.extra["line"] = line

    from vaecli.batch import Job

    _run_batch([Job(source, out)], as_json, False, read=lambda job: None, compute=compute,
               write=lambda job: None)


@app.command()
def info(
    inputs: Annotated[list[Path], typer.Argument(help="Latent files (.latent, .safetensors, .latent.png).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file on stdout.")] = False,
) -> None:
    """Show a latent file's metadata: model, shape, latent space, source size, format version."""
    from vaecli.latents import read_metadata

    failed = 0
    for path in inputs:
        try:
            meta = read_metadata(path)
        except VaeError as exc:
            failed += 1
            _say(f"Error: {exc}")
            if as_json:
                typer.echo(json.dumps({"input": str(path), "status": "error", "error": str(exc)}))
            continue
        shape = meta.get("shape") or meta.get("latent_shape")
        if as_json:
            typer.echo(json.dumps({"input": str(path), "status": "ok", **meta, "shape": shape}))
            continue
        w, h = meta.get("image_size", ["?", "?"])
        what = (f"video, {shape[0]} frames @ {meta.get('fps'):g} fps" if meta.get("kind") == "video" else "image")
        scale = (f" (scale {meta.get('scaling_factor')}, shift {meta.get('shift_factor')})"
                 if meta.get("space") == "scaled" else "")
        typer.echo(f"{path}: {meta.get('model')} latent {shape} {meta.get('dtype')}, {what}, from {w}x{h} "
                   f"(padding {meta.get('padding')}), space {meta.get('space')}{scale}, "
                   f"format {meta.get('format')} v{meta.get('version')}")
    if failed:
        raise typer.Exit(1)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per model on stdout.")] = False,
    manifest: Annotated[bool, typer.Option(
        "--manifest", help="Print the manifest of known weights files (weights/manifest.tsv).")] = False,
) -> None:
    """List the models vaecli knows, their latent shape rule, and whether their weights are found."""
    from vaecli.registry import manifest_lines
    from vaecli.weights import find_on_search_path

    if manifest:
        typer.echo("\n".join(manifest_lines()))
        return
    for spec in REGISTRY.values():
        status = {}
        for wf in spec.weights:
            try:
                status[wf.role] = str(find_on_search_path(spec, wf))
            except VaeError as exc:
                status[wf.role] = None if "not found" in str(exc) else "checksum mismatch"
        f = spec.spatial_factor
        rule = f"{spec.latent_channels} x H/{f} x W/{f}"
        if as_json:
            typer.echo(json.dumps({"name": spec.name, "family": spec.family, "channels": spec.latent_channels,
                                   "spatial_factor": f, "latent_shape": rule, "weights": status,
                                   "default": spec.name == DEFAULT_MODEL, "description": spec.description}))
            continue
        found = [r for r, s in status.items() if s and s != "checksum mismatch"]
        state = "found" if len(found) == len(status) else "missing" if not found else "partial"
        if "checksum mismatch" in status.values():
            state = "checksum mismatch"
        if not spec.has_decoder and found:
            state += " (encoder only)"
        default = " (default)" if spec.name == DEFAULT_MODEL else ""
        typer.echo(f"{spec.name:<8} {rule:<18} {state:<24} {spec.description}{default}")


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        _say("Interrupted")
        sys.exit(130)
