"""`vae models`: the registry and whether weights are found."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from vaecli.cli.common import QuietOpt, app, fail
from vaecli.errors import InputError, UsageError, VaeError
from vaecli.registry import DEFAULT_MODEL, REGISTRY


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per model on stdout.")] = False,
    manifest: Annotated[bool, typer.Option(
        "--manifest", help="Print the manifest of known weights files (weights/manifest.tsv).")] = False,
    quiet: QuietOpt = False,  # noqa: ARG001  (models prints data on stdout only; accepted as every command does)
) -> None:
    """List the models vaecli knows, their latent shape rule, and whether their weights are found."""
    from vaecli.registry import manifest_lines
    from vaecli.weights import find_on_search_path

    if manifest:
        if as_json:  # the manifest is TSV: under --json a script would parse it as JSON
            raise fail(UsageError("--json does not apply to --manifest, which prints the TSV of "
                                  "weights/manifest.tsv"), as_json=True)
        typer.echo("\n".join(manifest_lines()))
        return
    width = max(len(name) for name in REGISTRY)
    for spec in REGISTRY.values():
        status = {}
        for wf in spec.weights:
            try:
                status[wf.role] = str(find_on_search_path(spec, wf))
            except InputError:  # the file, or a folder of the search path, may not be read
                status[wf.role] = "unreadable"
            except VaeError as exc:
                status[wf.role] = None if "not found" in str(exc) else "checksum mismatch"
        f = spec.spatial_factor
        rule = f"{spec.latent_channels} x H/{f} x W/{f}"
        if spec.temporal_factor > 1:
            rule = f"{spec.latent_channels} x (1+(T-1)/{spec.temporal_factor}) x H/{f} x W/{f}"
        if as_json:
            typer.echo(json.dumps({"name": spec.name, "family": spec.family, "channels": spec.latent_channels,
                                   "spatial_factor": f, "temporal_factor": spec.temporal_factor,
                                   "latent_shape": rule, "weights": status,
                                   "default": spec.name == DEFAULT_MODEL, "description": spec.description}))
            continue
        found = [r for r, s in status.items() if s and s not in ("checksum mismatch", "unreadable")]
        state = "found" if len(found) == len(status) else "missing" if not found else "partial"
        for problem in ("unreadable", "checksum mismatch"):
            if problem in status.values():
                state = problem
        if not spec.has_decoder and found:
            state += " (encoder only)"
        default = " (default)" if spec.name == DEFAULT_MODEL else ""
        typer.echo(f"{spec.name:<{width}} {rule:<30} {state:<24} {spec.description}{default}")
