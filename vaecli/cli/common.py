"""What every `vae` command shares: the Typer app, option types, reporting, batch running and naming.

torch is imported only inside commands that compute, so `vae --help` and `vae models` start fast.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from contextlib import suppress
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from vaecli import __version__
from vaecli.errors import UsageError, VaeError, describe, one_line
from vaecli.registry import REGISTRY

app = typer.Typer(
    name="vae",
    help="Move images and video into diffusion-model latents and back: encode, decode, roundtrip, video, compare.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelName = Enum("ModelName", {name: name for name in REGISTRY}, type=str)


def json_line(record: dict) -> str:
    """One `--json` record as strict JSON: infinite or undefined figures (the PSNR of identical images) are null,
    not the `Infinity` that jq and other strict parsers refuse."""
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(record), allow_nan=False)


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


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class OutputFormat(str, Enum):
    files = "files"
    parquet = "parquet"


class LatentFormat(str, Enum):
    safetensors = "safetensors"
    png = "png"
    comfyui = "comfyui"  # a .latent file ComfyUI's LoadLatent reads: raw latent_tensor + version marker


class VideoLatentFormat(str, Enum):
    safetensors = "safetensors"
    comfyui = "comfyui"


MAX_CHUNK = 100_000  # frames a pass; a larger --chunk runs whole clips the same way

def output_path(text: str) -> Path:
    """An -o value: a Path, which would drop a trailing slash, or a FolderPath where there is one (`-o out.v1/`)."""
    from vaecli.files import FolderPath

    return FolderPath.parse(text)


OutputOpt = Annotated[Optional[Path], typer.Option(
    "-o", "--output", parser=output_path, metavar="PATH",
    help="Output file, or a folder for several inputs or with a trailing slash (default: beside each input).")]
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


RecursiveOpt = Annotated[bool, typer.Option("-r", "--recursive", help="Walk folders recursively.")]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", help="Same-sized images computed together (split further to stay within memory).")]
SkipOpt = Annotated[Optional[bool], typer.Option(
    "--skip-existing/--overwrite", help="Skip inputs whose output exists, or recompute and replace it. Default: "
    "skip when writing into an -o FOLDER (an interrupted batch resumes), else replace; but 'vae decode' without -o "
    "refuses to replace a file beside its latent (it may be the original).", show_default=False)]
FailFastOpt = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first input that fails.")]
QuietOpt = Annotated[bool, typer.Option(
    "-q", "--quiet", help="Nothing on stderr but errors (no progress or per-file lines); data goes to stdout as ever.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Print the traceback of unexpected errors.")]
SampleOpt = Annotated[bool, typer.Option(
    "--sample", help="KL and Wan-family models: draw from the posterior instead of taking its mean.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for --sample (reproducible draws).")]
TileOpt = Annotated[str, typer.Option(
    "--tile", help="Tiny models: 'auto' tiles when the image would not fit --max-memory; 'off'; or a tile size in "
    "pixels. Tiles overlap by the receptive field and keep only exact centres: no seams.")]
MaxMemOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", help="Memory budget for activations, e.g. 2GB (default: 1GiB, or half the free RAM if "
    "less; on CUDA half the free GPU memory).")]
ChunkOpt = Annotated[str, typer.Option(
    "--chunk", help="Video: frames encoded/decoded at a time: 'auto' = as many as fit --max-memory (one when a frame "
    "alone is large), or a number. Changes memory and speed, never the frames (SVD decodes the whole clip as one, "
    "whatever the chunk).")]
ScratchOpt = Annotated[Optional[Path], typer.Option(
    "--scratch", help="Folder for whole layers that do not fit --max-memory (KL models past the budget, SVD clips), "
    "as temporary files removed on exit; its free space is checked first (default: the system's temporary folder).",
    file_okay=False)]
NameOpt = Annotated[Optional[str], typer.Option(
    "--name", help="Output file name template with {stem}, {ext}, {model}, {suffix}, e.g. '{stem}.{model}{ext}' "
                   "or '{model}/{stem}{ext}' (inside the output folder).")]
SuffixOpt = Annotated[str, typer.Option("--suffix", help="Added to each output's stem, e.g. '_taef2'.")]


def reflow_help(typer_app: typer.Typer) -> None:
    """Join the lines of each paragraph of the commands' docstrings: Typer's rich help keeps a docstring's line
    breaks, which would cut every wrapped paragraph at the source's line length. Options get plain value names."""
    import inspect

    main = typer_app.registered_callback
    for info in [*typer_app.registered_commands, *([main] if main else [])]:
        if info.callback is None:
            continue
        if info.help is None and info.callback.__doc__ and info is not main:
            paragraphs = inspect.cleandoc(info.callback.__doc__).split("\n\n")
            info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        # Evaluated once and kept: string annotations (PEP 563) would give Typer fresh, unchanged options.
        hints = typing.get_type_hints(info.callback, include_extras=True)
        for hint in hints.values():
            _plain_metavar(hint)
        info.callback.__annotations__ = hints
    for group in typer_app.registered_groups:
        reflow_help(group.typer_instance)


# Typer 0.29 shows an option's Python type ('<bool>' beside every flag, '<list[Path]>', '<str>') and every model
# name in a narrow column: the names click always showed read better.
_METAVARS = {bool: "", str: "TEXT", int: "INTEGER", float: "FLOAT", Path: "PATH", ModelName: "MODEL"}


def _plain_metavar(hint) -> None:
    if typing.get_origin(hint) is not Annotated:
        return
    base, *extras = typing.get_args(hint)
    info = next((e for e in extras if isinstance(e, typer.models.ParameterInfo)), None)
    if info is None or info.metavar is not None:
        return
    if typing.get_origin(base) in (typing.Union, types.UnionType):  # Optional[X]
        base = next(arg for arg in typing.get_args(base) if arg is not type(None))
    if typing.get_origin(base) is list:
        (base,) = typing.get_args(base)
    if isinstance(info, typer.models.ArgumentInfo):  # an argument's type column ignores its metavar
        if base is ModelName:
            info.show_choices = False
    elif base in _METAVARS:
        info.metavar = _METAVARS[base]


def say(message: str) -> None:
    typer.echo(message, err=True)


def fail(exc: BaseException, debug: bool = False, as_json: bool = False,
         input: Optional[Path] = None) -> typer.Exit:
    """Print `exc` as one `Error:` line (and, for unexpected errors with `debug`, its traceback; with `as_json`, a
    JSON error record on stdout, naming the `input` it stopped at, if any); the exit."""
    if debug and not isinstance(exc, VaeError):
        import traceback

        say("".join(traceback.format_exception(exc)).rstrip())
    say(f"Error: {describe(exc)}")
    if as_json:
        failure_record(describe(exc), input)
    return typer.Exit(exc.exit_code if isinstance(exc, VaeError) else 1)


class Interrupt:
    """Whether a batch already said it was interrupted: Typer turns any other KeyboardInterrupt into a silent 130."""

    reported = False


def failure_record(message: str, input: Optional[Path] = None) -> None:
    """The `--json` record of a failure of the whole command (before or beside any input's own record)."""
    typer.echo(json_line({"input": str(input) if input is not None else None, "output": None, "status": "error",
                          "error": message}))


def job_record(job, status: str | None = None) -> dict:
    """An input's `--json` record: input, output, status, error, and its results when it succeeded (an input that
    failed while writing has none); an item of a batched ComfyUI file also says which (`item`)."""
    status = status or job.status
    done = status in ("ok", "skipped")
    record = {"input": str(job.src), "output": str(job.dst) if job.dst and done else None, "status": status,
              "error": job.error if status == "error" else None}
    if getattr(job.src, "batch", 1) > 1:  # several records share the file's path
        record["item"] = job.src.index
    if status != "ok":  # where it ran (the Ray node) still helps find out why it failed
        return {**record, **{k: v for k, v in job.extra.items() if k == "node"}}
    return {**record, **job.extra}


def cancelled_records(jobs) -> None:
    """The `--json` record of each of `jobs` (or input paths) left undone by --fail-fast, an interruption or a
    failure of the run: `cancelled`, so that every input has one."""
    from vaecli.batch import Job

    for job in jobs:
        typer.echo(json_line(job_record(job if isinstance(job, Job) else Job(job, None), "cancelled")))


class Reporter:
    """Reports finished inputs: JSON lines on stdout; a rich progress bar on a terminal, else plain lines."""

    def __init__(self, total: int, as_json: bool, quiet: bool, debug: bool = False):
        self.total, self.as_json, self.quiet, self.debug = total, as_json, quiet, debug
        self.counts = {"ok": 0, "skipped": 0, "error": 0}
        self.failures: list[str] = []
        self.progress = None
        if sys.stderr.isatty() and not quiet and total > 1:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class Rate(ProgressColumn):
                def render(self, task) -> Text:
                    speed = task.finished_speed or task.speed
                    return Text(f"{speed:.2f} files/s" if speed else "")

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.progress.add_task("vae", total=total)
            self.progress.start()

    def __call__(self, job) -> None:
        self.counts[job.status] += 1
        if job.status == "error":
            msg = naming(job.src, job.error)
            exc = getattr(job, "exc", None)
            if self.debug and exc is not None and not isinstance(exc, VaeError):
                import traceback

                self._line("".join(traceback.format_exception(exc)).rstrip(), always=True)
            self.failures.append(msg)
            self._line(f"Error: {msg}", always=True)
        elif job.status == "skipped":
            self._line(one_line(f"{job.src} -> {job.dst}  skipped (exists; --overwrite to redo)"))
        else:
            self._line(one_line(job.extra.pop("line")))
        if self.as_json:
            typer.echo(json_line(job_record(job)))
        if self.progress is not None:
            self.progress.advance(self.task)

    def _line(self, text: str, always: bool = False) -> None:
        if self.progress is not None:
            if always:
                self.progress.console.print(text, markup=False, highlight=False)
        elif always or not self.quiet:
            say(text)

    def finish(self, not_run: list | None = None, why: str = "") -> int:
        """Print the summary, and under --json a `cancelled` record for each input of `not_run` (left undone by
        --fail-fast, an interruption or a failure of the run: `why`); the exit code: 0 all done, 1 some failed."""
        if self.progress is not None:
            self.progress.stop()
        not_run = not_run or []
        if self.as_json:
            cancelled_records(not_run)
        if self.total > 1 and not self.quiet:
            undone = f", {len(not_run)} not run ({why})" if not_run else ""
            say(f"done: {self.counts['ok']} ok, {self.counts['skipped']} skipped, {self.counts['error']} failed"
                f"{undone}")
        say_failures(self.failures, self.total)
        return 1 if self.failures else 0


def naming(src, message: str) -> str:
    """An input's error message as its `Error:` line gives it: starting with the input's name."""
    name = one_line(str(src))
    return message if message.startswith(name) else f"{name}: {message}"


def say_failures(failures: list[str], total: int) -> None:
    """The closing summary of a run over several inputs where some failed: how many, then each one's message."""
    if total > 1 and failures:
        say(f"{len(failures)} of {total} inputs failed:")
        for message in failures:
            say(f"  {message}")


def run_batch(jobs, as_json: bool, quiet: bool, runner: Optional[Callable] = None, debug: bool = False,
              **stages) -> None:
    """Run jobs through `runner(on_done)` (default: `vaecli.batch.run` with `stages`), report them, and exit with
    0 when every input was done, 1 when any failed (or a failure stopped the run), or 130 when interrupted."""
    from vaecli import batch

    if runner is None:
        def runner(on_done):
            batch.run(jobs, on_done=on_done, **stages)

    reporter = Reporter(len(jobs), as_json, quiet, debug)

    def pending() -> list:
        return [job for job in jobs if job.status == "pending"]

    try:
        runner(reporter)
    except KeyboardInterrupt:
        reporter.finish(pending(), "interrupted")
        say("Interrupted: finished outputs are complete; rerun to do the rest")
        Interrupt.reported = True
        raise typer.Exit(130) from None
    except BrokenPipeError:  # the reader of stdout (or stderr) went away: `vae encode ... --json | head -1`
        to_devnull(sys.stdout)  # which one the error does not say: stdout, unless stderr fails too
        try:
            reporter.finish(pending(), "output closed")
            say("Error: output closed (broken pipe): stopped; finished outputs are complete, rerun to do the rest")
        except BrokenPipeError:
            to_devnull(sys.stderr)
        raise typer.Exit(1) from None
    except Exception as exc:  # a failure of the run itself, not of one input: reported, never a traceback
        reporter.finish(pending(), "the run failed")
        raise fail(exc, debug, as_json) from None
    not_run = pending()
    code = reporter.finish(not_run, "--fail-fast")
    if not_run:  # --fail-fast stopped the run: not everything was written
        code = 1
    raise typer.Exit(code)


def to_devnull(stream) -> None:
    """Point `stream` (stdout or stderr), whose reader went away, at /dev/null: nothing more can be shown there, and
    what is still written (Python's flush at exit too) must not fail again."""
    with suppress(OSError, ValueError):  # a stream without a descriptor (a test's): left as it is
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def expand(inputs: list[str], output: Optional[Path], recursive: bool, exts: tuple[str, ...],
           quiet: bool = False) -> list:
    """The inputs' (path, relative path) pairs (`vaecli.batch.expand_inputs`), at least one; a note on stderr
    names the files of a walked folder left out because they lie in the output folder, and the inputs found twice."""
    from vaecli.batch import expand_inputs
    from vaecli.files import resolved

    left_out: list[Path] = []
    repeated: list[Path] = []
    pairs = expand_inputs(inputs, recursive, exts, output=output, left_out=left_out, repeated=repeated)
    if repeated and not quiet:
        shown = ", ".join(map(str, repeated[:3])) + (f" and {len(repeated) - 3} more" if len(repeated) > 3 else "")
        say(f"note: {len(repeated)} input{'s' if len(repeated) > 1 else ''} named again ({shown}): each file is taken "
            f"once")
    if left_out and not quiet:
        if [resolved(p) for p in left_out] == [resolved(output)]:  # the output file itself, an earlier run's
            say(f"note: {output} left out of the inputs: it is the output")
        else:
            say(f"note: {len(left_out)} file{'s' if len(left_out) > 1 else ''} in the output folder {output} left "
                f"out of the inputs (name them to include them)")
    if not pairs:
        raise UsageError("no inputs (stdin was empty)")
    return pairs


def plan_jobs(pairs: list[tuple[Path, Path]], output: Optional[Path], name: Callable[[Path], str],
              skip_existing: Optional[bool], beside: bool = True, naming_options: dict[str, bool] | None = None):
    """Jobs for the inputs `expand` gave, their outputs planned (none without -o unless `beside`), and whether
    existing outputs are skipped; `naming_options` tells which options that name outputs were given (refused with -o
    FILE)."""
    from vaecli import batch, media, video
    from vaecli.batch import Job
    from vaecli.files import FolderPath, is_folder_target, output_exists, plan_outputs

    srcs, rels = [p for p, _ in pairs], [r for _, r in pairs]
    # Several inputs into `-o out.latent` (a name vaecli writes files as): a slip, not a new folder's name, unless
    # a trailing slash said it is one.
    file_exts = {*media.OUTPUT_FORMATS, *video.VIDEO_EXTS, *batch.LATENT_EXTS}
    if (output is not None and len(srcs) > 1 and not isinstance(output, FolderPath)
            and output.suffix.lower() in file_exts and not output_exists(output)):
        raise UsageError(f"-o {output}: names a file, but there are {len(srcs)} inputs (give a folder, e.g. "
                         f"-o {output.with_suffix('')}/, or make {output} one first)")
    outs = plan_outputs(srcs, output, name, rels) if output is not None or beside else [None] * len(srcs)
    folder = output is not None and is_folder_target(output, len(srcs))
    given = [option for option, on in (naming_options or {}).items() if on]
    if given and output is not None and not folder:  # they would be ignored without a word
        raise UsageError(f"{given[0]} only applies to outputs vaecli names; -o {output} names the output itself "
                         f"(drop {given[0]}, or give a folder: -o {output.parent / output.stem}/)")
    skip = folder if skip_existing is None else skip_existing
    return [Job(src, dst, rel=rel) for src, dst, rel in zip(srcs, outs, rels, strict=True)], skip


def tiling_kwargs(tile: str, max_memory: Optional[str], scratch: Optional[Path] = None) -> dict:
    """`load_codec` keyword arguments for --tile, --max-memory and --scratch."""
    from vaecli import tiling

    return {"tile": tiling.resolve_tile(tile), "budget": tiling.parse_size(max_memory) if max_memory is not None else 0,
            "scratch": str(scratch) if scratch else None}


def parse_chunk(option: str) -> int | None:
    """`--chunk` as given: None for "auto", else a positive frame count."""
    if option == "auto":
        return None
    # isdigit() takes '²'; a value of more digits than int() converts is past MAX_CHUNK too
    if not (option.isascii() and option.isdigit()) or len(option.lstrip("0")) > len(str(MAX_CHUNK)) \
            or not 1 <= int(option) <= MAX_CHUNK:
        raise UsageError(f"--chunk {option[:40]}: expected auto or a number of frames from 1 to {MAX_CHUNK}")
    return int(option)


def namer(template: Optional[str], suffix: str, ext: str, model: str = "") -> Callable[[Path], str]:
    from vaecli.files import strip_suffixes

    template = template or "{stem}{suffix}{ext}"

    def name(p: Path) -> str:
        stem = strip_suffixes(p, ".latent")
        try:
            out = template.format(stem=stem, ext=ext, model=model, suffix=suffix)
        except (KeyError, IndexError, ValueError):
            raise UsageError(f"--name {template}: use only {{stem}}, {{ext}}, {{model}} and {{suffix}}") from None
        parts = Path(out).parts
        # A subfolder below the output folder is a layout (`{model}/{stem}{ext}`); a way out of it, a slip that
        # would write where nobody looks (or over something).
        if not parts or Path(out).is_absolute() or Path(out).drive or ".." in parts or out.endswith(("/", os.sep)):
            raise UsageError(f"--name {template}: expected a file name inside the output folder, got {out!r}")
        return out

    return name


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
