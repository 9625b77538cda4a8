"""`vae encode`: images to latent files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli.cli.common import (
    LATENT_EXTS,
    Alpha,
    AlphaOpt,
    BatchOpt,
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
    OutputOpt,
    QuietOpt,
    RecursiveOpt,
    SkipOpt,
    Space,
    SuffixOpt,
    TileOpt,
    UsageError,
    VaeError,
    WeightsOpt,
    app,
    encode_group,
    fail,
    namer,
    plan_jobs,
    run_batch,
    tiling_kwargs,
)
from vaecli.registry import DEFAULT_MODEL


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

    from vaecli import batch, latents, media
    from vaecli.codec import load_codec

    try:
        n_hint = 2 if len(inputs) > 1 or any(Path(i).is_dir() or i == "-" for i in inputs) else 1
        kind = _latent_format(output, n_hint, fmt)
        ext = ".latent.png" if kind == "png" else ".latent"
        jobs, skip = plan_jobs(inputs, output, recursive, batch.IMAGE_EXTS, namer(name, suffix, ext, model.value),
                           skip_existing)
        if seed is not None and not sample:
            raise UsageError("--seed only applies with --sample")
        codec = load_codec(model.value, weights, ("encoder",), device.value, dtype.value, not no_verify,
                           **tiling_kwargs(tile, max_memory))
        codec.check_encode_options(space.value if space else None, sample)
    except VaeError as exc:
        raise fail(exc) from None
    save = latents.save_png if kind == "png" else latents.save_safetensors

    def compute(group) -> None:
        options = {"space": space.value if space else None, "sample": sample, "seed": seed}
        for job, latent, meta in encode_group(group, codec, **options):
            job.payload = (latent.clone(), meta)

    def write(job) -> None:
        latent, meta = job.payload
        save(job.dst, latent, meta)
        shape = list(latent.shape)
        job.extra = {"model": codec.spec.name, "shape": shape,
                     "line": f"{job.src} -> {job.dst}  {codec.spec.name} latent {shape}"}

    run_batch(jobs, as_json, quiet, read=lambda job: media.read_image(job.src, alpha.value), compute=compute,
               write=write, batch_size=1 if sample else batch_size, fail_fast=fail_fast,
               key=lambda job: tuple(job.payload[0].shape), skip=lambda job: skip and job.dst.exists())
