"""`vae compare`: several autoencoders on the same images, as a contact sheet and a table of PSNR/SSIM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli.cli.common import (
    Alpha,
    AlphaOpt,
    DebugOpt,
    Device,
    DeviceOpt,
    DType,
    DTypeOpt,
    Interrupt,
    JsonOpt,
    MaxMemOpt,
    NoVerifyOpt,
    QuietOpt,
    RecursiveOpt,
    ScratchOpt,
    TileOpt,
    app,
    cancelled_records,
    expand,
    fail,
    json_line,
    output_path,
    say,
    tiling_kwargs,
)


def parse_weights(values: list[str], models: list[str]) -> dict[str, list[Path]]:
    """`-w` values -> weights paths per model: `MODEL=PATH` (repeatable, e.g. encoder and decoder files), or a bare
    PATH when a single model is compared."""
    from vaecli.errors import UsageError
    from vaecli.registry import REGISTRY

    out: dict[str, list[Path]] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name in REGISTRY:
            if name not in models:
                raise UsageError(f"-w {value}: {name} is not one of the compared models ({', '.join(models)})")
            out.setdefault(name, []).append(Path(path))
        elif len(models) == 1:
            out.setdefault(models[0], []).append(Path(value))
        else:
            raise UsageError(f"-w {value}: with several models, say whose weights these are: -w MODEL=PATH")
    return out


def summary_table(names: list[str], records: list[dict]) -> str:
    """A Markdown table: per model, mean and worst PSNR/SSIM over the images, and the image with the worst PSNR."""
    lines = ["| model | mean PSNR (dB) | worst PSNR (dB) | mean SSIM | worst SSIM | lowest-PSNR image |",
             "|---|---:|---:|---:|---:|---|"]
    for name in names:
        rows = [(r["models"][name], r["input"]) for r in records]
        psnrs = [m["psnr"] for m, _ in rows]
        ssims = [m["ssim"] for m, _ in rows]
        worst = min(rows, key=lambda mr: mr[0]["psnr"])[1]
        lines.append(f"| {name} | {sum(psnrs) / len(psnrs):.2f} | {min(psnrs):.2f} | {sum(ssims) / len(ssims):.4f} "
                     f"| {min(ssims):.4f} | {worst} |")
    return "\n".join(lines)


@app.command()
def compare(
    inputs: Annotated[list[str], typer.Argument(
        metavar="IMAGE", help="Images to compare the models on: files, folders, globs, or - for a list on stdin.")],
    models: Annotated[Optional[list[str]], typer.Option(
        "-m", "--model", metavar="MODEL", show_default=False,
        help="A registry model to compare (see 'vae models'); repeat for each, e.g. -m taef2 -m sd15.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", metavar="SHEET", show_default=False, parser=output_path,
        help="The contact sheet to write (.png, .jpg, .webp, ...): required.")] = None,
    weights: Annotated[Optional[list[str]], typer.Option(
        "-w", "--weights", metavar="MODEL=PATH", show_default=False,
        help="Weights for one model as MODEL=PATH (file or folder; repeat for encoder and decoder files); a bare "
        "PATH only when comparing a single model. Default: each model's weights from VAE_WEIGHTS_DIR, weights/, "
        "~/.cache/vaecli.")] = None,
    rows: Annotated[int, typer.Option(
        "--rows", min=1, help="Most images shown on the sheet: past it, the ones with the lowest PSNR (any model) "
        "are shown. The table and --json cover every image.")] = 16,
    alpha: AlphaOpt = Alpha.white,
    recursive: RecursiveOpt = False,
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
    """Compare autoencoders side by side: write a contact sheet of each image's reconstructions and print PSNR/SSIM.

    Each row of the sheet holds the original, then per model its reconstruction with the worst region outlined (the
    64x64 window with the largest mean absolute error), that region zoomed 4x beside the original's, and a heat map
    of the error. Metrics are those of 'vae roundtrip', at full resolution. Without --json a Markdown table of the
    mean and worst PSNR/SSIM per model is printed on stdout. Any failure stops the command: no sheet is written
    (with --json the image it stopped at gets its error record, every other image a cancelled one).
    """
    from vaecli import batch, media, metrics
    from vaecli.codec import load_codec
    from vaecli.errors import OutputError, UsageError
    from vaecli.files import FolderPath, writing
    from vaecli.media import write_pillow
    from vaecli.sheet import ContactSheet

    try:
        if output is None:
            raise UsageError("missing -o/--output: the contact sheet to write, e.g. -o sheet.png")
        if isinstance(output, FolderPath):
            raise UsageError(f"-o {output}/: expected the contact sheet's file name, not a folder")
        with writing(output):  # found now, not once every image has gone through every model
            if output.is_dir():
                raise UsageError(f"-o {output}: is a folder, expected the contact sheet's file name (e.g. "
                                 f"{output / 'sheet.png'})")
        fmt = media.check_output_extension(output)
        if not models:
            raise UsageError("missing -m/--model: name the models to compare, e.g. -m taef2 -m sd15")
        names = list(dict.fromkeys(models))
        paths = parse_weights(weights or [], names)
        # a walked folder's earlier sheet (-o photos/sheet.png) is left out, as roundtrip leaves out its outputs
        srcs = [src for src, _ in expand(inputs, output, recursive, batch.IMAGE_EXTS, quiet)]
        if any(src.resolve() == output.resolve() for src in srcs):
            raise OutputError(f"{output}: would overwrite an input")
        codecs = [load_codec(name, paths.get(name), ("encoder", "decoder"), device.value, dtype.value,
                             not no_verify, **tiling_kwargs(tile, max_memory, scratch)) for name in names]
    except Exception as exc:
        raise fail(exc, debug, as_json) from None

    current = None  # the image a failure stopped at, named in its --json record
    try:
        sheet = ContactSheet(max_rows=rows)
        records = []
        for src in srcs:
            current = src
            pixels, info = media.read_image(src, alpha.value)
            sheet.start(pixels, str(src))
            record = {"input": str(src), "output": str(output), "status": "ok", "error": None,
                      "size": list(info.size), "models": {}}
            for name, codec in zip(names, codecs, strict=True):
                latent, meta = codec.encode_batch(pixels, info.size)
                recon = media.quantize8(media.check_finite(codec.decode_latent(latent[0], meta), f"{src} ({name})"))
                del latent
                p, s = metrics.psnr_ssim(recon, pixels)
                region = sheet.add(name, recon, p, s)
                del recon
                record["models"][name] = {"psnr": round(p, 4), "ssim": round(s, 5), "worst": region.box(),
                                          "worst_error": round(region.error, 5)}
            records.append(record)
            if not quiet and not as_json:
                say(f"{src}  " + "  ".join(f"{n} {m['psnr']:.2f} dB / {m['ssim']:.4f}"
                                          for n, m in record["models"].items()))
            del pixels
        current = None

        image = sheet.render()
        options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        write_pillow(output, image, format=fmt, **options)
    except KeyboardInterrupt:
        if as_json:  # every image has its record: none is on a sheet
            cancelled_records(srcs)
        say("Interrupted: no sheet was written")
        Interrupt.reported = True
        raise typer.Exit(130) from None
    except Exception as exc:
        if as_json:  # every image has its record: the one it stopped at its error, the others are on no sheet
            cancelled_records([src for src in srcs if src is not current])
        raise fail(exc, debug, as_json, current) from None

    if as_json:  # only now: every record describes a row of a sheet that exists
        for record in records:
            typer.echo(json_line(record))
    if not quiet:
        shown = len(sheet.rows)
        more = f" ({shown} of {len(srcs)} images: the lowest PSNR)" if shown < len(srcs) else ""
        rows, cols = (f"{n} {word}{'s' if n != 1 else ''}" for n, word in ((shown, "row"), (len(names), "model")))
        say(f"wrote {output}: {image.width}x{image.height}, {rows} x {cols}{more}")
    if not as_json:  # the table is the command's data, on stdout: -q silences stderr only
        typer.echo(summary_table(names, records))
