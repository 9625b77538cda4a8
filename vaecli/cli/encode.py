"""`vae encode`: images to latent files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli.batch import LATENT_FORMATS, check_at_least_one
from vaecli.cli.common import (
    Alpha,
    AlphaOpt,
    BatchOpt,
    DebugOpt,
    Device,
    DeviceOpt,
    DType,
    DTypeOpt,
    Engine,
    FailFastOpt,
    JsonOpt,
    LatentFormat,
    MaxMemOpt,
    ModelName,
    NameOpt,
    NoVerifyOpt,
    OutputFormat,
    OutputOpt,
    QuietOpt,
    RecursiveOpt,
    SampleOpt,
    ScratchOpt,
    SeedOpt,
    SkipOpt,
    Space,
    SuffixOpt,
    TileOpt,
    UsageError,
    WeightsOpt,
    app,
    expand,
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
        by_ext = LATENT_FORMATS.get(output.suffix.lower())
        if by_ext is None:
            raise UsageError(f"-o {output}: expected a latent file ending in .latent, .safetensors or .png")
        if fmt == LatentFormat.comfyui and by_ext == "safetensors":
            return "comfyui"
        if fmt is not None and fmt.value != by_ext:
            raise UsageError(f"--format {fmt.value} disagrees with the output name {output}")
        return by_ext
    return fmt.value if fmt else "safetensors"


@app.command()
def encode(
    inputs: Annotated[list[str], typer.Argument(
        help="Images (PNG, JPEG, WebP, BMP, TIFF), folders, globs, manifests (.txt: a path per line; .parquet: a "
        "'path' column), or - to read paths from stdin.")],
    output: OutputOpt = None,
    model: Annotated[ModelName, typer.Option("-m", "--model", help="Registry model (see 'vae models').")]
    = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    fmt: Annotated[Optional[LatentFormat], typer.Option(
        "--format", help="Latent file format (default: from the -o extension, else safetensors); comfyui: a "
        ".latent file ComfyUI's LoadLatent reads (raw latents, vaecli's metadata kept in its header).")] = None,
    space: Annotated[Optional[Space], typer.Option(
        "--latent-space", help="KL models: 'scaled' = (mean - shift) * scale, what the denoiser consumes (default); "
        "'raw' = the posterior itself; 'normalized' = FLUX.2's 2x2-patchified, batch-normed latents.")] = None,
    sample: SampleOpt = False,
    seed: SeedOpt = None,
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
    engine: Annotated[Engine, typer.Option(
        "--engine", help="local: this process; ray: a Ray cluster, the model loaded once per worker "
        "(pip install 'vaecli\\[ray]').")] = Engine.local,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="Ray engine: 'auto' (the cluster this machine joined), HOST:PORT or "
        "ray://HOST:10001 (default: a new Ray instance on this machine).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", help="Ray engine: worker actors (default: as many as the cluster's CPUs/GPUs fit).")] = None,
    cpus_per_worker: Annotated[Optional[float], typer.Option(
        "--cpus-per-worker", help="Ray engine: CPUs (and torch threads) per worker (default: 1).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(
        "--gpus-per-worker", help="Ray engine: GPUs per worker; workers with a GPU compute on CUDA (default: 0)."
    )] = None,
    output_format: Annotated[OutputFormat, typer.Option(
        "--output-format", help="files: a latent file per image, mirroring the inputs; parquet (Ray engine): "
        "shards with path, latent (safetensors bytes), shape, model, source_size, status, error.")]
    = OutputFormat.files,
    shard_size: Annotated[Optional[int], typer.Option(
        "--shard-size", help="Ray engine: inputs per unit of work and per parquet shard (default: 64).")] = None,
) -> None:
    """Encode images into latents (.latent/.safetensors with metadata, or 8-bit .png); --engine ray scales out."""

    from vaecli import batch
    from vaecli.checkpoints import check_outputs_spare_weights
    from vaecli.codec import load_codec
    from vaecli.pipeline import encode_stages

    try:
        ray_opts = {"--ray-address": ray_address, "--workers": workers, "--cpus-per-worker": cpus_per_worker,
                    "--gpus-per-worker": gpus_per_worker, "--shard-size": shard_size,
                    "--output-format parquet": output_format == OutputFormat.parquet or None}
        if engine == Engine.local and any(v is not None for v in ray_opts.values()):
            raise UsageError(f"{next(k for k, v in ray_opts.items() if v is not None)} needs --engine ray")
        check_at_least_one({"--batch-size": batch_size, "--shard-size": shard_size})  # before a Ray cluster starts
        pairs = expand(inputs, output, recursive, batch.IMAGE_EXTS, quiet)
        kind = _latent_format(output, len(pairs), fmt)
        if kind == "comfyui":
            if space is not None and space != Space.raw:
                raise UsageError(f"--format comfyui writes raw latents (ComfyUI's VAE applies scale and shift "
                                 f"itself): drop --latent-space {space.value}")
            space = Space.raw
        ext = ".latent.png" if kind == "png" else ".latent"
        jobs, skip = plan_jobs(pairs, output, namer(name, suffix, ext, model.value), skip_existing,
                               naming_options={"--name": name is not None, "--suffix": bool(suffix)})
        if seed is not None and not sample:
            raise UsageError("--seed only applies with --sample")
        # Ray: the driver loads on CPU only to check the options and verify the weights its workers will load.
        codec = load_codec(model.value, weights, ("encoder",), "cpu" if engine == Engine.ray else device.value,
                           dtype.value, not no_verify,
                           **tiling_kwargs(tile, max_memory, scratch))
        codec.check_encode_options(space.value if space else None, sample)
        check_outputs_spare_weights(codec.spec, codec.sources, [job.dst for job in jobs])
        runner = None
        if engine == Engine.ray:
            runner = _ray_runner(jobs, codec, output, kind, output_format, fmt, skip, ray_opts, device, dtype,
                                 space.value if space else None, sample, seed, alpha.value, batch_size, fail_fast,
                                 quiet or as_json, tiling_kwargs(tile, max_memory))
    except Exception as exc:
        raise fail(exc, debug, as_json) from None
    if runner is not None:
        run_batch(jobs, as_json, quiet, runner=runner, debug=debug)
    run_batch(jobs, as_json, quiet, fail_fast=fail_fast, debug=debug,
              **encode_stages(codec, kind, space.value if space else None, sample, seed, alpha.value, batch_size,
                              skip))


def _ray_runner(jobs, codec, output, kind, output_format, fmt, skip, ray_opts, device, dtype, space, sample, seed,
                alpha, batch_size, fail_fast, quiet, tiling):
    """Check the Ray engine's options; a runner for `run_batch` that encodes `jobs` on the cluster."""
    from vaecli import media, ray_engine
    from vaecli.files import is_folder_target

    ray_engine.require_ray()
    cpus = ray_opts["--cpus-per-worker"] if ray_opts["--cpus-per-worker"] is not None else 1.0
    gpus = ray_opts["--gpus-per-worker"] or 0.0
    shard_size = ray_opts["--shard-size"] or 64
    if fail_fast:
        raise UsageError("--fail-fast applies to the local engine: Ray records failures and goes on")
    check_at_least_one({"--workers": ray_opts["--workers"]})
    if cpus <= 0:
        raise UsageError(f"--cpus-per-worker must be more than 0, got {cpus:g}")
    if gpus < 0:
        raise UsageError(f"--gpus-per-worker must be at least 0, got {gpus:g}")
    if device == Device.cuda and not gpus:
        raise UsageError("--device cuda with --engine ray needs --gpus-per-worker")
    if device == Device.mps:
        raise UsageError("--device mps: Ray workers compute on cpu or cuda")
    if output is None or not is_folder_target(output, 2 if len(jobs) > 1 else 1):
        raise UsageError("--engine ray writes into a folder: give -o FOLDER")
    if output_format == OutputFormat.parquet:
        if fmt is not None:
            raise UsageError("--format applies to --output-format files; parquet holds safetensors bytes")
        kind = "parquet"
        if not skip and (output / ray_engine.DONE_FILE).exists():
            (output / ray_engine.DONE_FILE).unlink()  # --overwrite: redo every shard
    # Absolute, as the inputs are: a worker on another node (or started elsewhere) has another working folder.
    weights = tuple(str(Path(p).absolute()) for p in codec.sources)
    settings = ray_engine.Settings(
        model=codec.spec.name, weights=weights, dtype=dtype.value, device="cuda" if gpus else "cpu",
        threads=max(1, int(cpus)), tile=tiling["tile"], budget=tiling["budget"], fmt=kind, space=space,
        sample=sample, seed=seed, alpha=alpha, batch_size=batch_size, skip_existing=skip,
        out=str(output.absolute()), max_pixels=media.max_pixels())

    def runner(on_done):
        ray_engine.encode(jobs, settings, on_done, address=ray_opts["--ray-address"], workers=ray_opts["--workers"],
                          cpus_per_worker=cpus, gpus_per_worker=gpus, shard_size=shard_size, progress=not quiet)

    return runner
