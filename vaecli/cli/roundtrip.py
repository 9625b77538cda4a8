"""`vae roundtrip`: images through the autoencoder, with PSNR and SSIM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli.batch import check_at_least_one
from vaecli.cli.common import (
    Alpha,
    AlphaOpt,
    BatchOpt,
    DebugOpt,
    Device,
    DeviceOpt,
    DType,
    DTypeOpt,
    FailFastOpt,
    JsonOpt,
    LatentFormat,
    MaxMemOpt,
    ModelName,
    NameOpt,
    NoVerifyOpt,
    QuietOpt,
    RecursiveOpt,
    ScratchOpt,
    SkipOpt,
    SuffixOpt,
    TileOpt,
    WeightsOpt,
    app,
    expand,
    fail,
    namer,
    output_path,
    plan_jobs,
    run_batch,
    tiling_kwargs,
)
from vaecli.registry import DEFAULT_MODEL


@app.command()
def roundtrip(
    inputs: Annotated[list[str], typer.Argument(
        help="Images to pass through the autoencoder, folders, globs, or - for stdin.")],
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", parser=output_path, metavar="PATH", help="Write reconstructions here: a file, or a "
        "folder for several inputs or with a trailing slash (default: only report the metrics).")] = None,
    model: Annotated[ModelName, typer.Option("-m", "--model", help="Registry model (see 'vae models').")]
    = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    via: Annotated[LatentFormat, typer.Option(
        "--via", help="'png' quantizes the latent through the 8-bit PNG latent scheme, as a saved PNG latent "
        "would be.")] = LatentFormat.safetensors,
    diff: Annotated[Optional[Path], typer.Option(
        "--diff", help="One input: also write a heat map of its reconstruction error here (PNG; black = exact, "
        "pale yellow = 0.1 or more, averaged over RGB); an input whose reconstruction exists is skipped only if this "
        "exists too.")] = None,
    alpha: AlphaOpt = Alpha.white,
    recursive: RecursiveOpt = False,
    batch_size: BatchOpt = 8,
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
    """Encode and decode images, reporting PSNR and SSIM of the reconstruction against the input."""

    from vaecli import batch, latents, media, metrics
    from vaecli.codec import load_codec
    from vaecli.errors import UsageError
    from vaecli.files import output_done
    from vaecli.pipeline import encode_group, scratch_fields, scratch_text

    try:
        if output is None:  # nothing is written, so options about the written files would be silently ignored
            given = {"--name": name is not None, "--suffix": bool(suffix),
                     "--skip-existing" if skip_existing else "--overwrite": skip_existing is not None}
            unused = [option for option, on in given.items() if on]
            if unused:
                raise UsageError(f"{unused[0]} only applies with -o: without it roundtrip writes no reconstructions, "
                                 f"it only reports the metrics")
        check_at_least_one({"--batch-size": batch_size})
        jobs, skip = plan_jobs(expand(inputs, output, recursive, batch.IMAGE_EXTS, quiet), output,
                               namer(name, suffix, ".png", model.value), skip_existing, beside=False,
                               naming_options={"--name": name is not None, "--suffix": bool(suffix)})
        for job in jobs:
            if job.dst is not None:
                media.check_output_extension(job.dst)
        if diff is not None:
            if len(jobs) != 1:
                raise UsageError(f"--diff {diff}: needs exactly one input image, got {len(jobs)}")
            if diff.suffix.lower() != ".png":
                raise UsageError(f"--diff {diff}: expected a .png file")
            if diff.resolve() == jobs[0].src.resolve():
                raise UsageError(f"--diff {diff}: would overwrite the input")
            if jobs[0].dst is not None and diff.resolve() == jobs[0].dst.resolve():
                raise UsageError(f"--diff {diff}: is also the reconstruction's -o; give them different paths")
        codec = load_codec(model.value, weights, ("encoder", "decoder"), device.value, dtype.value, not no_verify,
                           **tiling_kwargs(tile, max_memory, scratch))
    except Exception as exc:
        raise fail(exc, debug, as_json) from None

    def compute(group) -> None:
        for job, latent, meta in encode_group(group, codec):
            if via == LatentFormat.png:
                latent = latents.quantize_png(latent)
            # checked here, not only by the writer: without -o a NaN reconstruction would report PSNR null as "ok"
            recon = media.quantize8(media.check_finite(codec.decode_latent(latent, meta)))
            heat = None
            if diff is not None:
                from vaecli import sheet

                heat = sheet.heat_image(sheet.error_map(job.payload[0], recon), (recon.shape[-1], recon.shape[-2]))
            # encode_group reset the count for this image; the decode adds its own peak
            job.payload = (recon, *metrics.psnr_ssim(recon, job.payload[0]), heat, codec.scratch_bytes)

    def write(job) -> None:
        recon, p, s, heat, scratch_used = job.payload
        if heat is not None:
            from vaecli.media import write_pillow

            write_pillow(diff, heat, format="PNG")
        if job.dst is not None:
            try:
                media.write_image(job.dst, recon)
            except BaseException:  # no output of a failed input stays: the heat map goes with the reconstruction
                if heat is not None:
                    diff.unlink(missing_ok=True)
                raise
        where = f" -> {job.dst}" if job.dst else ""
        job.extra = {"model": codec.spec.name, "psnr": round(p, 4), "ssim": round(s, 5),
                     **scratch_fields(scratch_used),
                     "line": f"{job.src}{where}  PSNR {p:.2f} dB  SSIM {s:.4f}{scratch_text(scratch_used)}"}

    run_batch(jobs, as_json, quiet, debug=debug, read=lambda job: media.read_image(job.src, alpha.value),
              compute=compute, write=write, batch_size=batch_size, fail_fast=fail_fast,
              key=lambda job: tuple(job.payload[0].shape),
              # skipped when every output asked for exists: the heat map too
              skip=lambda job: skip and job.dst is not None and output_done(job.dst)
              and (diff is None or output_done(diff)))
