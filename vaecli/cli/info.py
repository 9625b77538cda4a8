"""`vae info`: a latent file's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vaecli.cli.common import app, say
from vaecli.errors import VaeError


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
            say(f"Error: {exc}")
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
