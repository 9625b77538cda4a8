"""`vae decode`: latent files back to images and clips."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli.cli.common import (
    REGISTRY,
    ChunkOpt,
    DebugOpt,
    Device,
    DeviceOpt,
    DType,
    DTypeOpt,
    FailFastOpt,
    JsonOpt,
    MaxMemOpt,
    ModelName,
    NameOpt,
    NoVerifyOpt,
    OutputOpt,
    QuietOpt,
    RecursiveOpt,
    ScratchOpt,
    SkipOpt,
    SuffixOpt,
    TileOpt,
    UsageError,
    WeightsOpt,
    app,
    expand,
    fail,
    namer,
    parse_chunk,
    plan_jobs,
    run_batch,
    tiling_kwargs,
)


@app.command()
def decode(
    inputs: Annotated[list[str], typer.Argument(
        help="Latent files written by 'vae encode' or 'vae video', folders, globs, or - for stdin.")],
    output: OutputOpt = None,
    model: Annotated[Optional[ModelName], typer.Option(
        "-m", "--model", help="Decode with this model instead of the one named in the latent's metadata; required "
        "for ComfyUI .latent files, which name none (read as that model's raw latents).")] = None,
    weights: WeightsOpt = None,
    chunk: ChunkOpt = "auto",
    as_frames: Annotated[bool, typer.Option(
        "--as-frames", help="Latent videos: write a folder of PNG frames (frame_000000.png, ...).")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Also decode another, exact way and report the max abs difference and PSNR: tiny models a "
        "window across tile seams or band edges untiled, KL models the whole image untiled, SVD the whole clip at "
        "once, causal video models (Wan, TAEHV) that went tile by tile the clip in whole frames; latent videos of "
        "per-frame models: frame 0.")] = False,
    image_ext: Annotated[str, typer.Option(
        "--ext", help="Image extension for outputs vaecli names (png, jpg, webp, ...).")] = "png",
    recursive: RecursiveOpt = False,
    skip_existing: SkipOpt = None,
    fail_fast: FailFastOpt = False,
    name: NameOpt = None,
    suffix: SuffixOpt = "",
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
    """Decode latent files back to images (PNG, JPEG, WebP, BMP, TIFF) or latent videos to clips (by -o extension)."""
    from vaecli import batch, clips, latents, media, video
    from vaecli.causal import check_tile
    from vaecli.codec import Codec, check_latent_fits, get_spec, load_codec, resolve_device
    from vaecli.errors import InputError, OutputError
    from vaecli.files import output_done, output_exists
    from vaecli.pipeline import scratch_fields, scratch_text

    # Beside its latent, x.png may be the photo x.latent was made from: never replaced unless asked. (A frames
    # folder is replaced only when it holds nothing but an earlier --as-frames output: video.check_frames_folder.)
    keep = output is None and skip_existing is None and not as_frames

    image_suffix = "." + image_ext.lstrip(".").lower()

    def default_name(p: Path) -> str:
        try:
            is_video = latents.read_metadata(p, model.value if model else None).get("kind") == "video"
        except Exception:
            is_video = False  # reported when the input itself is processed
        ext = "" if as_frames else ".mp4" if is_video else image_suffix
        return namer(name, suffix, ext, model.value if model else "")(p)

    try:
        tiling_options = tiling_kwargs(tile, max_memory, scratch)
        resolve_device(device.value)  # now, not when each input loads its model: a usage error, not a failed input
        frames_per_pass = parse_chunk(chunk)
        if model:
            check_tile(get_spec(model.value), tiling_options["tile"])
        if image_suffix not in media.OUTPUT_FORMATS:  # named as given, not as the file name it would make
            raise UsageError(f"--ext {image_ext if image_ext.strip() else repr(image_ext)}: expected one of "
                             f"{', '.join(e.lstrip('.') for e in media.OUTPUT_FORMATS)}")
        pairs = expand(inputs, output, recursive, batch.LATENT_EXTS, quiet)
        jobs, skip = plan_jobs(pairs, output, default_name, skip_existing,
                               naming_options={"--name": name is not None, "--suffix": bool(suffix),
                                               "--ext": image_suffix != ".png"})
        jobs = _comfyui_items(jobs, model.value if model else None)
        for job in jobs:
            suffix_ = job.dst.suffix.lower()
            if not as_frames and suffix_ not in media.OUTPUT_FORMATS and suffix_ not in video.VIDEO_EXTS:
                raise UsageError(f"cannot write '{suffix_ or job.dst}': expected an image extension "
                                 f"({', '.join(media.OUTPUT_FORMATS)}) or a video extension "
                                 f"({', '.join(sorted(video.VIDEO_EXTS))})")
    except Exception as exc:
        raise fail(exc, debug, as_json) from None
    codecs: dict[str, Codec] = {}

    def codec_for(name: str) -> Codec:
        if name not in codecs:
            codecs[name] = load_codec(name, weights, ("decoder",), device.value, dtype.value, not no_verify,
                                      **tiling_options)
        return codecs[name]

    def read(job):
        if keep and output_exists(job.dst):
            raise OutputError(f"{job.dst}: exists, refusing to replace it (it may be the original image or clip; "
                              f"--overwrite replaces it, -o writes elsewhere)")
        meta = latents.read_metadata(job.src)
        name = model.value if model else str(meta.get("model"))
        if "model" not in meta and not model:
            raise InputError(f"{job.src}: the latent names no model; pass --model")
        if name not in REGISTRY:
            raise InputError(f"{job.src}: made by model '{name}', which this vaecli does not know; pass --model")
        video = meta.get("kind") == "video"
        if video and job.dst.suffix.lower() in media.OUTPUT_FORMATS and not as_frames:
            raise InputError(f"{job.src}: a latent video; write it as .mp4, .mov, .mkv, .webm, .gif "
                             f"or use --as-frames")
        if not video and as_frames:
            raise InputError(f"{job.src}: an image latent: --as-frames writes the frames of a latent video")
        if not video and job.dst.suffix.lower() not in media.OUTPUT_FORMATS:
            raise InputError(f"{job.src}: an image latent; write it as {', '.join(media.OUTPUT_FORMATS)}")
        # From the header, before any value is read: what a hostile file claims to hold is not allocated.
        check_latent_fits(get_spec(name), meta["shape"][-3:], meta)
        if video:
            return name, None, meta
        latent, meta = latents.load_latent(job.src)
        return name, latent, meta

    def compute(group) -> None:
        for job in group:
            name, latent, meta = job.payload
            if latent is None:  # a latent video streams straight to its output
                info = clips.decode_clip(codec_for(name), job.src, job.dst, frames_per_pass, as_frames,
                                         verify=verify)
                job.payload = None
                job.extra = {"model": name, **info,
                             "line": f"{job.src} -> {job.dst}  {name} {info['frames']} frames "
                                     f"{info['size'][0]}x{info['size'][1]} @ {info['fps']:g} fps"
                                     + verify_text(info.get("verify"))}
            else:
                codec = codec_for(name)
                codec.scratch_bytes = 0
                pixels = codec.decode_latent(latent, meta)
                scratch_used = codec.scratch_bytes
                check = codec.verify_tiling(latent, meta, pixels) if verify else None
                job.payload = (name, pixels, check, scratch_used)

    def write(job) -> None:
        if job.payload is None:
            return
        name, pixels, check, scratch_used = job.payload
        media.write_image(job.dst, pixels)
        size = [pixels.shape[-1], pixels.shape[-2]]
        line = f"{job.src} -> {job.dst}  {name} {size[0]}x{size[1]}{scratch_text(scratch_used)}"
        job.extra = {"model": name, "size": size, **scratch_fields(scratch_used)}
        if check is not None:
            job.extra["verify"] = check
        job.extra["line"] = line + verify_text(check)

    def verify_text(check: dict | None) -> str:
        if check is None:
            return ""
        if not check["tiled"]:
            return "  verify: not tiled"
        where = f" ({check['compared']})" if "compared" in check else ""
        return f"  verify{where}: max diff {check['max_abs_diff'] * 255:.3f}/255, PSNR {check['psnr']:.2f} dB"

    run_batch(jobs, as_json, quiet, debug=debug, read=read, compute=compute, write=write, fail_fast=fail_fast,
               skip=lambda job: skip and output_done(job.dst, folder=as_frames))


def _comfyui_items(jobs: list, model: str | None) -> list:
    """Jobs for ComfyUI `.latent` inputs carry the model to read them with; a batch of B > 1 becomes B jobs, item i
    written as `<stem>_<i><ext>` beside where the whole file's output would go."""
    from vaecli import latents
    from vaecli.files import resolved

    out = []
    for job in jobs:
        n = latents.comfyui_batch(job.src)
        if n is None:
            out.append(job)
            continue
        for i in range(n):
            dst = job.dst
            if n > 1:
                dst = dst.with_name(f"{dst.stem}_{i}{dst.suffix}" if dst.suffix else f"{dst.name}_{i}")
            out.append(replace(job, src=latents.latent_item(job.src, model, i, n), dst=dst))
    if len(out) > len(jobs):  # b.latent's item 1 writes b_1.png: so may an input named b_1.latent
        seen: dict[Path, str] = {}
        for job in out:
            r, what = resolved(job.dst), _described(job.src)
            if r in seen:
                raise UsageError(f"inputs {seen[r]} and {what} would both write {job.dst}")
            seen[r] = what
    return out


def _described(src) -> str:
    """An input as messages name it: a file, or item i of a batched ComfyUI file."""
    from vaecli.latents import LatentItem

    return f"{src} (item {src.index})" if isinstance(src, LatentItem) else str(src)
