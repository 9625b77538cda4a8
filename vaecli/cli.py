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


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _fail(exc: VaeError) -> typer.Exit:
    _say(f"Error: {exc}")
    return typer.Exit(exc.exit_code)


def _each(inputs: list[Path], outputs: list[Optional[Path]], as_json: bool,
          work: Callable[[Path, Optional[Path]], tuple[str, dict]]) -> None:
    """Run `work` per input, reporting each; exit 1 if any input failed, 0 otherwise."""
    failed = 0
    for src, dst in zip(inputs, outputs, strict=True):
        record: dict = {"input": str(src), "output": str(dst) if dst else None, "status": "ok", "error": None}
        try:
            line, extra = work(src, dst)
            record.update(extra)
            _say(line)
        except VaeError as exc:
            failed += 1
            msg = str(exc)
            msg = msg if msg.startswith(str(src)) else f"{src}: {msg}"
            record.update(status="error", error=msg, output=None)
            _say(f"Error: {msg}")
        if as_json:
            typer.echo(json.dumps(record))
    if failed:
        if len(inputs) > 1:
            _say(f"{failed} of {len(inputs)} inputs failed")
        raise typer.Exit(1)


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
    inputs: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, WebP, BMP, TIFF).")],
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
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    no_verify: NoVerifyOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Encode images into latents (.latent/.safetensors with metadata, or 8-bit .png)."""
    from vaecli import latents, media
    from vaecli.codec import load_codec
    from vaecli.files import plan_outputs

    try:
        kind = _latent_format(output, len(inputs), fmt)
        ext = ".latent.png" if kind == "png" else ".latent"
        outputs = plan_outputs(inputs, output, lambda p: p.stem + ext)
        if seed is not None and not sample:
            raise UsageError("--seed only applies with --sample")
        codec = load_codec(model.value, weights, ("encoder",), device.value, dtype.value, not no_verify)
        codec.check_encode_options(space.value if space else None, sample)
    except VaeError as exc:
        raise _fail(exc) from None
    save = latents.save_png if kind == "png" else latents.save_safetensors

    def work(src: Path, dst: Path) -> tuple[str, dict]:
        pixels, info = media.read_image(src, alpha.value)
        latent, meta = codec.encode_image(pixels, info.size, space.value if space else None, sample, seed)
        save(dst, latent, meta)
        shape = list(latent.shape)
        return f"{src} -> {dst}  {codec.spec.name} latent {shape}", {"model": codec.spec.name, "shape": shape}

    _each(inputs, outputs, as_json, work)


@app.command()
def decode(
    inputs: Annotated[list[Path], typer.Argument(help="Latent files written by 'vae encode'.")],
    output: OutputOpt = None,
    model: Annotated[Optional[ModelName], typer.Option(
        "-m", "--model", help="Decode with this model instead of the one named in the latent's metadata.")] = None,
    weights: WeightsOpt = None,
    chunk: Annotated[int, typer.Option("--chunk", help="Latent videos: frames decoded at a time (SVD mixes "
                                                     "frames within a chunk).")] = 8,
    as_frames: Annotated[bool, typer.Option(
        "--as-frames", help="Latent videos: write a folder of PNG frames (frame_000000.png, ...).")] = False,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    no_verify: NoVerifyOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Decode latent files back to images (PNG, JPEG, WebP, BMP, TIFF) or latent videos to clips (by -o extension)."""
    from vaecli import clips, latents, media, video
    from vaecli.codec import Codec, check_latent_fits, get_spec, load_codec
    from vaecli.errors import InputError
    from vaecli.files import plan_outputs, strip_suffixes

    def default_name(p: Path) -> str:
        try:
            is_video = latents.read_metadata(p).get("kind") == "video"
        except VaeError:
            is_video = False  # reported when the input itself is processed
        return strip_suffixes(p, ".latent") + ("" if as_frames else ".mp4" if is_video else ".png")

    try:
        outputs = plan_outputs(inputs, output, default_name)
        for out in outputs:
            if out.suffix.lower() not in media.OUTPUT_FORMATS:
                video.check_video_output(out, as_frames)
    except VaeError as exc:
        raise _fail(exc) from None
    codecs: dict[str, Codec] = {}

    def codec_for(name: str) -> Codec:
        if name not in codecs:
            codecs[name] = load_codec(name, weights, ("decoder",), device.value, dtype.value, not no_verify)
        return codecs[name]

    def work(src: Path, dst: Path) -> tuple[str, dict]:
        meta = latents.read_metadata(src)
        name = model.value if model else str(meta.get("model"))
        if name not in REGISTRY:
            raise InputError(f"{src}: made by model '{name}', which this vaecli does not know; pass --model")
        if meta.get("kind") == "video":
            if dst.suffix.lower() in media.OUTPUT_FORMATS and not as_frames:
                raise InputError(f"{src}: a latent video; write it as .mp4, .mov, .mkv, .webm, .gif "
                                 f"or use --as-frames")
            info = clips.decode_clip(codec_for(name), src, dst, chunk, as_frames)
            return (f"{src} -> {dst}  {name} {info['frames']} frames {info['size'][0]}x{info['size'][1]} "
                    f"@ {info['fps']:g} fps", {"model": name, **info})
        if dst.suffix.lower() not in media.OUTPUT_FORMATS or as_frames:
            raise InputError(f"{src}: an image latent; write it as {', '.join(media.OUTPUT_FORMATS)}")
        latent, meta = latents.load_latent(src)
        check_latent_fits(get_spec(name), latent, meta)
        pixels = codec_for(name).decode_latent(latent, meta)
        media.write_image(dst, pixels)
        size = [pixels.shape[-1], pixels.shape[-2]]
        return f"{src} -> {dst}  {name} {size[0]}x{size[1]}", {"model": name, "size": size}

    _each(inputs, outputs, as_json, work)


@app.command()
def roundtrip(
    inputs: Annotated[list[Path], typer.Argument(help="Image files to pass through the autoencoder.")],
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
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.fp32,
    no_verify: NoVerifyOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Encode and decode images, reporting PSNR and SSIM of the reconstruction against the input."""
    import torch

    from vaecli import latents, media, metrics
    from vaecli.codec import load_codec
    from vaecli.files import plan_outputs

    try:
        outputs: list = plan_outputs(inputs, output, lambda p: p.stem + ".png") if output else [None] * len(inputs)
        for out in outputs:
            if out is not None:
                media.check_output_extension(out)
        codec = load_codec(model.value, weights, ("encoder", "decoder"), device.value, dtype.value, not no_verify)
    except VaeError as exc:
        raise _fail(exc) from None

    def work(src: Path, dst: Optional[Path]) -> tuple[str, dict]:
        pixels, info = media.read_image(src, alpha.value)
        latent, meta = codec.encode_image(pixels, info.size)
        if via == LatentFormat.png:
            latent = latents.quantize_png(latent)
        recon = codec.decode_latent(latent, meta)
        recon = torch.from_numpy(media.to_uint8(recon)).permute(2, 0, 1)[None].float() / 255
        p, s = metrics.psnr(recon, pixels), metrics.ssim(recon, pixels)
        if dst is not None:
            media.write_image(dst, recon)
        where = f" -> {dst}" if dst else ""
        return (f"{src}{where}  PSNR {p:.2f} dB  SSIM {s:.4f}",
                {"model": codec.spec.name, "psnr": round(p, 4), "ssim": round(s, 5)})

    _each(inputs, outputs, as_json, work)


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
        codec = load_codec(model.value, weights, roles, device.value, dtype.value, not no_verify)
    except VaeError as exc:
        raise _fail(exc) from None

    def work(src: Path, dst: Path) -> tuple[str, dict]:
        report = clips.encode_clip(codec, src, dst, start=start, frames=frames, stride=stride, fps=fps,
                                   chunk=chunk, recon=recon if roundtrip else None)
        if frames is not None and report.frames < frames:
            _say(f"note: {src} has only {report.frames} frames to select from frame {start}; "
                 f"encoded {report.frames} of --frames {frames}")
        extra = {"model": codec.spec.name, "frames": report.frames, "shape": report.shape, "fps": report.fps,
                 "size": list(report.size)}
        line = f"{src} -> {dst}  {codec.spec.name} latent {report.shape} @ {report.fps:g} fps"
        if roundtrip:
            extra.update(recon=str(recon), written_size=list(report.written_size),
                         psnr=[round(p, 4) for p in report.psnr], mean_psnr=round(report.mean_psnr, 4))
            line += f"; recon -> {recon}  mean PSNR {report.mean_psnr:.2f} dB"
        return line, extra

    _each([source], [out], as_json, work)


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
