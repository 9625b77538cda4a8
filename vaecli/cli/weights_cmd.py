"""`vae weights list` and `vae weights pull`: what weights are found where, and fetching them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli.cli.common import DebugOpt, JsonOpt, ModelName, QuietOpt, app, say
from vaecli.errors import VaeError, describe
from vaecli.registry import REGISTRY

weights_app = typer.Typer(
    name="weights", no_args_is_help=True,
    help="Weights files: list what is found where (and whether it verifies), or pull them from where they are "
    "published.")
app.add_typer(weights_app)

ModelsArg = Annotated[Optional[list[ModelName]], typer.Argument(
    help="Registry models (see 'vae models') (default: all).", show_default=False)]


def _names(models: Optional[list[ModelName]]) -> list[str]:
    return list(dict.fromkeys(m.value for m in models)) if models else list(REGISTRY)


@weights_app.command("list")
def list_weights(
    models: ModelsArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per weights file on stdout.")] = False,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Do not hash the files found (large files take a while): their state is 'found'.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """List each model's weights files, where they are found, and whether their checksums verify.

    A file verifies against the registry's SHA-256, else the one recorded beside it when `vae weights pull` fetched
    it; "unverified" means no checksum is known for it, "missing" that it is on no folder of the search path,
    "unreadable" that the file or a folder of the search path may not be read (an Error line says which; exit 1).
    """
    from vaecli import hub
    from vaecli.weights import check_file, expected_sha256, locate, search_path

    if not as_json and not quiet:
        say("search path: " + ", ".join(str(d) for d in search_path()))
    rows, failed = [], False
    for name in _names(models):
        spec = REGISTRY[name]
        for wf in spec.weights:
            copies, path, origin, error = [], None, "", None
            try:
                copies = locate(wf)
                path = copies[0] if copies else None
                if path is None:
                    state = "missing"
                elif no_verify:
                    state = "found"
                else:
                    state = check_file(wf, path)
                    origin = expected_sha256(wf, path)[1]
            except VaeError as exc:  # a file or folder it may not read: an Error line, and the listing goes on
                state, error, failed = "unreadable", describe(exc), True
                say(f"Error: {error}")
            if as_json:
                typer.echo(json.dumps({
                    "model": spec.name, "role": wf.role, "name": wf.name, "state": state,
                    "path": str(path) if path else None, "copies": [str(p) for p in copies],
                    "checksum": origin or None, "repo": wf.repo or None, "path_in_repo": wf.path_in_repo or None,
                    "url": hub.source_url(wf), **({"error": error} if error else {})}))
            else:
                where = str(path) if path else error if error else f"(vae weights pull {spec.name})"
                rows.append((spec.name, wf.role, state, where))
    if rows:
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            typer.echo("  ".join(f"{c:<{w}}" for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    if failed:
        raise typer.Exit(1)


@weights_app.command("pull")
def pull(
    models: Annotated[list[ModelName], typer.Argument(help="Registry models whose weights to fetch.",
                                                      show_default=False)],
    revision: Annotated[Optional[str], typer.Option(
        "--revision", help="Branch, tag or commit of the repositories (default: main).")] = None,
    to: Annotated[Optional[Path], typer.Option(
        "--to", help="Folder to save into (default: the weights cache, ~/.cache/vaecli).", file_okay=False)] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Download the models' weights files into the weights cache, checked and ready to use.

    Files come from where they are published (the Hugging Face hub, needing `pip install 'vaecli\\[hub]'`; GitHub for
    the tiny autoencoders), are saved under the names vaecli searches for, checked against the SHA-256 the hub
    reports (and the registry's, when known) and recorded beside them as NAME.sha256. Set HF_TOKEN for gated
    repositories. Exit code 0 when every file is there, 1 when any failed.
    """
    from vaecli import hub
    from vaecli.weights import cache_dir

    dest = to if to is not None else cache_dir()
    files = [(REGISTRY[name], wf) for name in _names(models) for wf in REGISTRY[name].weights]
    failures = 0
    for spec, wf in files:
        record = {"model": spec.name, "role": wf.role, "name": wf.name, "status": "error", "path": None,
                  "sha256": None, "checked": [], "url": hub.source_url(wf, revision), "error": None}
        try:
            done = hub.pull(spec, wf, dest, revision=revision, progress=not (quiet or as_json))
        except Exception as exc:  # one line per failed file; the others still run
            if debug and not isinstance(exc, VaeError):
                import traceback

                say("".join(traceback.format_exception(exc)).rstrip())
            failures += 1
            record["error"] = describe(exc)
            say(f"Error: {record['error']}")
        else:
            record.update(status=done.status, path=str(done.path), sha256=done.sha256, checked=done.checked)
            if not quiet:
                against = " and ".join(done.checked) if done.checked else "nothing: no published checksum"
                verb = "downloaded" if done.status == "downloaded" else "already present:"
                say(f"{spec.name} {wf.role}: {verb} {done.path} (sha256 {done.sha256[:12]}..., checked against "
                    f"{against})")
        if as_json:
            typer.echo(json.dumps(record))
    if len(files) > 1 and not quiet:
        say(f"done: {len(files) - failures} ok, {failures} failed")
    raise typer.Exit(1 if failures else 0)
