"""`vae info`: a latent file's metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vaecli.cli.common import QuietOpt, RecursiveOpt, app, expand, fail, json_line, naming, say, say_failures
from vaecli.errors import describe, one_line


@app.command()
def info(
    inputs: Annotated[list[str], typer.Argument(
        help="Latent files (.latent, .safetensors, .latent.png), folders, globs, manifests, or - for stdin.")],
    recursive: RecursiveOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file on stdout.")] = False,
    quiet: QuietOpt = False,  # noqa: ARG001  (info prints data on stdout only; accepted as every command does)
) -> None:
    """Show a latent file's metadata: model, shape, latent space, source size, format version."""
    from vaecli.batch import LATENT_EXTS
    from vaecli.latents import read_metadata

    try:
        paths = [path for path, _ in expand(inputs, None, recursive, LATENT_EXTS)]
    except Exception as exc:
        raise fail(exc, as_json=as_json) from None
    failures: list[str] = []
    for path in paths:
        try:
            meta = read_metadata(path, need_model=False)
            line = None if as_json else describe_latent(path, meta)
        except Exception as exc:  # a hostile file may fail anywhere: one line and a record, then the next file
            message = naming(path, describe(exc))
            failures.append(message)
            say(f"Error: {message}")
            if as_json:
                typer.echo(json_line({"input": str(path), "output": None, "status": "error", "error": message}))
            continue
        if as_json:  # the command's own fields last: a file's metadata cannot stand in for them
            shape = meta.get("shape") or meta.get("latent_shape")
            record = {"input": str(path), "output": None, "status": "ok", "error": None}
            typer.echo(json_line({**record, **meta, "shape": shape, **record}))
        else:
            typer.echo(one_line(line))
    say_failures(failures, len(paths))
    if failures:
        raise typer.Exit(1)


def describe_latent(path: Path, meta: dict) -> str:
    """One line for a latent file's metadata."""
    shape = meta.get("shape") or meta.get("latent_shape")
    if meta.get("format") == "comfyui" and meta.get("model") is None:
        return (f"{path}: ComfyUI latent {shape} {meta['dtype']}, {meta['kind']}, batch of {meta['batch']}, "
                f"no model recorded (decode with --model NAME)")
    w, h = meta.get("image_size", ["?", "?"])
    padding = f" (padding {meta['padding']})" if "padding" in meta else ""
    fps = meta.get("fps")
    what = (f"video, {shape[0]} frames @ {fps:g} fps" if isinstance(fps, (int, float)) else
            f"video, {shape[0]} frames") if meta.get("kind") == "video" else "image"
    scale = (f" (scale {meta.get('scaling_factor')}, shift {meta.get('shift_factor')})"
             if meta.get("space") == "scaled" else "")
    seed = f", sampled with seed {meta['sample_seed']}" if "sample_seed" in meta else ""
    return (f"{path}: {meta.get('model', '?')} latent {shape} {meta.get('dtype', '?')}, {what}, from {w}x{h}"
            f"{padding}, space {meta.get('space', '?')}{scale}{seed}, "
            f"format {meta.get('format')} v{meta.get('version', '?')}")
