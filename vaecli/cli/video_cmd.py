"""`vae video`: clips to latent videos, streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli.cli.common import (
    ChunkOpt,
    DebugOpt,
    Device,
    DeviceOpt,
    DType,
    DTypeOpt,
    JsonOpt,
    MaxMemOpt,
    ModelName,
    NoVerifyOpt,
    QuietOpt,
    SampleOpt,
    ScratchOpt,
    SeedOpt,
    SkipOpt,
    TileOpt,
    UsageError,
    VideoLatentFormat,
    WeightsOpt,
    app,
    fail,
    output_path,
    parse_chunk,
    run_batch,
    say,
    tiling_kwargs,
)
from vaecli.errors import OutputError
from vaecli.registry import DEFAULT_MODEL


@app.command("video")
def video_cmd(
    source: Annotated[Path, typer.Argument(help="A clip ffmpeg can read: mp4, mov, webm, mkv, gif, ...")],
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", parser=output_path, metavar="PATH",
        help="Latent video file (.latent/.safetensors), or a folder with a trailing slash (default: beside the "
        "clip).")] = None,
    frames: Annotated[Optional[int], typer.Option(
        "--frames", help="Encode at most this many frames (a clip that ends sooner is encoded to its end).")] = None,
    start: Annotated[int, typer.Option("--start", help="First source frame (0-based).")] = 0,
    stride: Annotated[int, typer.Option("--stride", help="Keep every K-th frame.")] = 1,
    fps: Annotated[Optional[float], typer.Option(
        "--fps", help="Lower the frame rate to this (frames are dropped, never repeated) instead of --stride.")] \
        = None,
    model: Annotated[ModelName, typer.Option("-m", "--model", help="Registry model (see 'vae models').")]
    = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    fmt: Annotated[Optional[VideoLatentFormat], typer.Option(
        "--format", help="safetensors: vaecli's (T, C, h, w) latent video (default); comfyui: a .latent file "
        "ComfyUI's LoadLatent reads, raw (1, C, T, h, w) with vaecli's metadata in its header.")] = None,
    chunk: ChunkOpt = "auto",
    sample: SampleOpt = False,
    seed: SeedOpt = None,
    roundtrip: Annotated[bool, typer.Option(
        "--roundtrip", help="Also decode the latents, write the reconstructed clip and report PSNR per frame.")]
    = False,
    recon: Annotated[Optional[Path], typer.Option(
        "--recon", parser=output_path, metavar="PATH",
        help="Where --roundtrip writes the clip (default: beside the output, clip.latent -> clip.recon.mp4).")] = None,
    skip_existing: SkipOpt = None,
    tile: TileOpt = "auto",
    max_memory: MaxMemOpt = None,
    scratch: ScratchOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    no_verify: NoVerifyOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Encode a video clip into a latent video (frames, channels, h, w), streaming (audio is not carried)."""
    from vaecli import clips, latents, video
    from vaecli.batch import Job
    from vaecli.checkpoints import check_outputs_spare_weights
    from vaecli.codec import load_codec, resolve_device
    from vaecli.files import (
        FolderPath,
        is_folder_target,
        output_done,
        output_exists,
        plan_outputs,
        strip_suffixes,
        temp_prefix,
    )

    try:
        # checked even when the output exists and is skipped, as the other commands check them
        tiling_options = tiling_kwargs(tile, max_memory, scratch)
        resolve_device(device.value)
        frames_per_pass = parse_chunk(chunk)
        clips.check_selection(start, frames, stride, fps, frames_per_pass)
        folder = output is not None and is_folder_target(output, 1)
        if output is not None and not folder and output.suffix.lower() not in (".latent", ".safetensors"):
            raise UsageError(f"-o {output}: expected a latent file ending in .latent or .safetensors, or a folder")
        if str(source) == "-":  # stdin: the other commands read a list of paths there; a clip is read more than once
            raise UsageError("-: reading a clip from stdin is not supported; give its file")
        video.check_not_latent(source)
        out = plan_outputs([source], output, lambda p: p.stem + ".latent")[0]
        if roundtrip:
            if isinstance(recon, FolderPath):
                raise UsageError(f"--recon {recon}/: expected a video file, not a folder")
            recon = recon or out.with_name(strip_suffixes(out, ".latent") + ".recon.mp4")
            if recon.suffix.lower() not in video.VIDEO_EXTS:  # not check_video_output's: video has no --as-frames
                raise UsageError(f"--recon {recon}: expected a video file ending in "
                                 f"{', '.join(sorted(video.VIDEO_EXTS))}")
            if output_exists(recon) and recon.is_dir():  # found now, not when the encoded clip is moved there
                raise OutputError(f"{recon}: is a folder, expected an output file path")
            plan_outputs([source], recon, lambda p: p.name, option="--recon")
        elif recon is not None:
            raise UsageError("--recon needs --roundtrip")
        if seed is not None and not sample:
            raise UsageError("--seed only applies with --sample")
        job = Job(source, out)
        # As for the other commands: by default an output in an -o FOLDER is kept (a rerun resumes), others replaced.
        skip = (folder if skip_existing is None else skip_existing) and output_done(out) and (
            recon is None or output_done(recon))
        if not skip:
            roles = ("encoder", "decoder") if roundtrip else ("encoder",)
            codec = load_codec(model.value, weights, roles, device.value, dtype.value, not no_verify,
                               **tiling_options)
            codec.check_encode_options(None, sample)
            check_outputs_spare_weights(codec.spec, codec.sources, [out])
            if fmt == VideoLatentFormat.comfyui:
                codec.check_encode_options("raw", False)  # ComfyUI's files are raw: a model without them is refused
    except Exception as exc:
        raise fail(exc, debug, as_json) from None

    def compute(group) -> None:
        job = group[0]
        comfy = fmt == VideoLatentFormat.comfyui
        # Not a .part name (see atomic_write), cut to fit as temp names are.
        dst = job.dst.with_name(temp_prefix(job.dst, "frames.tmp") + "frames.tmp") if comfy else job.dst
        try:
            report = clips.encode_clip(codec, job.src, dst, start=start, frames=frames, stride=stride, fps=fps,
                                       chunk=frames_per_pass, recon=recon if roundtrip else None, sample=sample,
                                       seed=seed)
            if comfy:  # ComfyUI's layout, raw (1, C, T, h, w), rewritten a latent plane at a time
                latents.comfyui_video(dst, job.dst, codec.spec)
        except OutputError as exc:  # the intermediate file is ours: name the output the user asked for
            if comfy and str(exc).startswith(f"{dst}: "):
                raise OutputError(f"{job.dst}: {str(exc)[len(str(dst)) + 2:]}") from None
            raise
        finally:
            if comfy and dst.exists():  # not unlink(missing_ok): under a file it raises and hides the real error
                dst.unlink()
        if frames is not None and report.frames + report.dropped < frames and not quiet:
            say(f"note: {job.src} has only {report.frames + report.dropped} frames to select from frame {start}; "
                f"encoded {report.frames} of --frames {frames}")
        if report.dropped and not quiet:
            f = codec.spec.temporal_factor
            say(f"note: {codec.spec.name} encodes clips of 1 + {f}k frames: the last {report.dropped} of "
                f"{report.frames + report.dropped} selected frames of {job.src} were not encoded")
        job.extra = {"model": codec.spec.name, "frames": report.frames, "shape": report.shape, "fps": report.fps,
                     "size": list(report.size), "dropped": report.dropped, "scratch_bytes": report.scratch_bytes}
        if comfy:
            job.extra["format"] = "comfyui"
        line = (f"{job.src} -> {job.dst}  {codec.spec.name} latent {report.shape} @ {report.fps:g} fps"
                + (" (ComfyUI layout, raw)" if comfy else ""))
        if roundtrip:
            job.extra.update(recon=str(recon), written_size=list(report.written_size),
                             psnr=[round(p, 4) for p in report.psnr], mean_psnr=round(report.mean_psnr, 4))
            line += f"; recon -> {recon}  mean PSNR {report.mean_psnr:.2f} dB"
        job.extra["line"] = line

    run_batch([job], as_json, quiet, debug=debug, read=lambda job: None, compute=compute,
              write=lambda job: None, skip=lambda job: skip)
