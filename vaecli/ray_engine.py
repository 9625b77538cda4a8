"""Scale-out encoding on a Ray cluster with Ray Data: the local engine's stages, one loaded model per actor.

Inputs are cut by position into shards of `shard_size`; a shard is one unit of work for an actor, which reads,
encodes and writes its images with `pipeline.encode_stages` (the code `vae encode` runs locally, so the latents are
the same bits at the same thread count) and returns one record per input. Per-file output mirrors the input tree
and skips files that exist; parquet output writes `part-NNNNN.parquet` per shard and lists in `_shards.json` the
shards whose every input was encoded, so a rerun skips them (and redoes a shard with a failed input). Per-input
failures become records; they never stop the job: whatever fails (an input, a worker, the pipeline itself) leaves an
error record for every input it left undone.

Ray talks on the driver's stderr from C++ (the core worker's log) and Python (logging, Ray Data, the raylet's
messages); while Ray runs, file descriptor 2 points at /dev/null and `sys.stderr` at a copy of the real one, so with
--quiet or --json only `vae`'s own lines show, and otherwise also Ray's one-line warnings and raylet messages.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from vaecli.batch import check_at_least_one
from vaecli.errors import UsageError, VaeError, describe

INSTALL = "pip install 'vaecli[ray]'"
DONE_FILE = "_shards.json"
TASK_RETRIES = 2  # a shard whose worker dies (crash, out of memory) is retried this often, then reported failed
CONNECT_TIMEOUT = 10.0  # seconds for a --ray-address to accept a connection: Ray itself retries for many minutes
RECORD = ("index", "status", "error", "output", "model", "shape", "node", "traceback")


def require_ray():
    """The `ray` module with Ray Data, or a UsageError naming the install command."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class Settings:
    """What every actor needs to encode like the driver asked: model, weights (already verified) and options."""

    model: str
    weights: tuple[str, ...]
    dtype: str
    device: str  # cpu or cuda
    threads: int
    tile: int | str | None
    budget: int
    fmt: str  # safetensors | png | parquet
    space: str | None
    sample: bool
    seed: int | None
    alpha: str
    batch_size: int
    skip_existing: bool
    out: str
    max_pixels: int  # the driver's VAE_MAX_PIXELS: a worker on another node does not share its environment


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A VaeError where a `host:port` (or `ray://host:port`) address accepts no TCP connection within `timeout`
    seconds; other addresses ("auto", "local") are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise VaeError(f"cannot reach the Ray cluster at {address}: {why.lower()} (expected a running cluster's "
                       f"address, as 'ray start --head' prints it)") from None


def shard_file(out: Path, shard: int) -> Path:
    """The parquet file of shard number `shard` under the output folder."""
    return Path(out) / f"part-{shard:05d}.parquet"


class ShardEncoder:
    """Ray Data callable class: loads the model once per actor, then encodes whole shards.

    `encode` subclasses it with the settings as a class attribute rather than constructor arguments, which would
    go through the object store. (Ray Data puts its own arguments to the actor there anyway, and Ray's core worker
    warns about that for restartable actors: `native_stderr_hidden` keeps that off the terminal.) Nothing raised
    here escapes: a model that does not load, an input, a shard file that cannot be written all become error
    records on the inputs they concern, with the traceback for --debug.
    """

    settings: dict = {}

    def __init__(self):
        import ray

        self.s = Settings(**self.settings)
        os.environ["VAE_MAX_PIXELS"] = str(self.s.max_pixels)  # refuse the inputs the local engine refuses
        self.node = ray.get_runtime_context().get_node_id()
        self.codec, self.load_error, self.load_exc = None, None, None
        try:
            import torch

            from vaecli.codec import load_codec

            torch.set_num_threads(self.s.threads)
            self.codec = load_codec(self.s.model, [Path(p) for p in self.s.weights], ("encoder",), self.s.device,
                                    self.s.dtype, verify=False, tile=self.s.tile, budget=self.s.budget)
        except Exception as exc:  # say it on every input this worker gets, rather than die and be restarted
            self.load_error = f"the Ray worker on node {self.node[:8]} could not load {self.s.model}: {describe(exc)}"
            self.load_exc = exc

    def __call__(self, batch: dict) -> dict:
        rows: dict[str, list] = {k: [] for k in RECORD}
        for shard, items in zip(batch["shard"], batch["items"], strict=True):
            items = json.loads(items)
            try:
                results = self.encode_shard(int(shard), items)
            except Exception as exc:  # a fault in this code, not in an input: still one record per input
                results = []
                for index, src, *_ in items:
                    job = _job(src, None)
                    job.status, job.error, job.exc = "error", f"Ray worker error: {describe(exc)}", exc
                    results.append((index, job))
            for index, job in results:
                exc = getattr(job, "exc", None)
                exc = None if isinstance(exc, VaeError) else exc  # its message says it all
                record = {"index": index, "status": job.status, "error": job.error or "",
                          "output": str(job.dst) if job.dst else "", "model": self.s.model,
                          "shape": json.dumps(job.extra.get("shape")), "node": self.node,
                          "traceback": "".join(traceback.format_exception(exc)) if exc is not None else ""}
                for k in RECORD:
                    rows[k].append(record[k])
        return rows

    def encode_shard(self, shard: int, items: list) -> list:
        """[(index, src, dst, rel)] -> [(index, finished Job)]; parquet mode writes the shard's file.

        In parquet mode a job's `dst` is the shard file only if it was written: the driver counts a shard done
        only then.
        """
        parquet = self.s.fmt == "parquet"
        jobs = [_job(src, None if parquet else dst, rel) for _, src, dst, rel in items]
        if self.load_error:
            for job in jobs:
                job.status, job.error, job.exc = "error", self.load_error, self.load_exc
        else:
            self.run_jobs(jobs)
        if parquet:
            dest = shard_file(Path(self.s.out), shard)
            try:
                write_shard(dest, jobs)
            except Exception as exc:
                msg = describe(exc)
                msg = msg if str(dest) in msg else f"{dest}: cannot write: {msg}"
                for job in jobs:
                    if job.status != "error":
                        job.status, job.error, job.exc = "error", msg, exc
            else:
                for job in jobs:
                    job.dst = dest
        return [(index, job) for (index, *_), job in zip(items, jobs, strict=True)]

    def run_jobs(self, jobs: list) -> None:
        """Encode `jobs` with the local engine's stages; every job ends ok, skipped or error.

        `batch.run` records an input's failure on its job. Should it stop anyway, the jobs it left undone are
        run one at a time, so that only the inputs that fail again are marked.
        """
        from vaecli import batch
        from vaecli.pipeline import encode_stages

        stages = encode_stages(self.codec, "bytes" if self.s.fmt == "parquet" else self.s.fmt, self.s.space,
                               self.s.sample, self.s.seed, self.s.alpha, self.s.batch_size, self.s.skip_existing)
        try:
            batch.run(jobs, on_done=_ignore, **stages)
        except Exception:
            for job in jobs:
                if job.status not in DONE_STATES:
                    job.status, job.error, job.payload = "pending", None, None
                    try:
                        batch.run([job], on_done=_ignore, **stages)
                    except Exception as exc:
                        job.status, job.error, job.exc = "error", describe(exc), exc
        for job in jobs:
            job.payload = None
            if job.status not in DONE_STATES:
                job.status, job.error = "error", "the Ray worker did not finish this input"


DONE_STATES = ("ok", "skipped", "error")


def _ignore(job) -> None:
    pass


def _job(src: str, dst: str | None, rel: str | None = None):
    from vaecli.batch import Job

    return Job(Path(src), Path(dst) if dst else None, rel=Path(rel) if rel else None)


def write_shard(dest: Path, jobs: list) -> None:
    """One parquet shard: path, latent (safetensors bytes), shape, model, source_size (W, H), status, error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vaecli.files import atomic_write

    table = pa.table({
        "path": pa.array([str(j.src) for j in jobs], pa.string()),
        "latent": pa.array([j.extra.get("latent_bytes") for j in jobs], pa.binary()),
        "shape": pa.array([j.extra.get("shape") for j in jobs], pa.list_(pa.int32())),
        "model": pa.array([j.extra.get("model") for j in jobs], pa.string()),
        "source_size": pa.array([j.extra.get("image_size") for j in jobs], pa.list_(pa.int32())),
        "status": pa.array([j.status for j in jobs], pa.string()),
        "error": pa.array([j.error for j in jobs], pa.string()),
    })
    atomic_write(dest, lambda tmp: pq.write_table(table, str(tmp)))


def pool_size(resources: dict, workers: int | None, cpus: float, gpus: float) -> int:
    """Actors that fit the cluster's CPUs and GPUs (all of them unless `workers` asks for fewer).

    The pipeline has no separate read stage (actors read their own shards; the shard list is a driver-made
    dataset), so a pool may take every CPU without starving a read task: the deadlock seen with Ray 2.60 when
    2 one-CPU actors and a read task shared 2 CPUs.
    """
    total_cpu, total_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    fit = int(total_cpu // cpus) if cpus > 0 else 1 << 30
    if gpus > 0:
        fit = min(fit, int(total_gpu // gpus))
    if fit < 1:
        raise UsageError(f"the Ray cluster has {total_cpu:g} CPUs and {total_gpu:g} GPUs: a worker needing "
                         f"{cpus:g} CPUs and {gpus:g} GPUs does not fit")
    if workers is not None and workers > fit:
        raise UsageError(f"--workers {workers}: the Ray cluster ({total_cpu:g} CPUs, {total_gpu:g} GPUs) fits "
                         f"{fit} workers of {cpus:g} CPUs and {gpus:g} GPUs")
    return workers or fit


def load_done(out: Path, shard_size: int, n_inputs: int) -> set[int]:
    """Shards a previous parquet run finished; a UsageError if it cut the inputs differently."""
    path = Path(out) / DONE_FILE
    if not path.exists():
        return set()
    state = json.loads(path.read_text())
    if (state.get("shard_size"), state.get("inputs")) != (shard_size, n_inputs):
        raise UsageError(f"{out} holds a run of {state.get('inputs')} inputs in shards of {state.get('shard_size')}, "
                         f"not {n_inputs} in shards of {shard_size}: rerun with the same inputs and --shard-size, "
                         f"or write to a new folder")
    return {int(i) for i in state.get("done", [])}


def save_done(out: Path, shard_size: int, n_inputs: int, done: set[int]) -> None:
    """Record the finished shards (atomically)."""
    from vaecli.files import atomic_write

    state = {"shard_size": shard_size, "inputs": n_inputs, "done": sorted(done)}
    atomic_write(Path(out) / DONE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(state)))


def encode(jobs: list, settings: Settings, on_done: Callable, *, address: str | None, workers: int | None,
           cpus_per_worker: float, gpus_per_worker: float, shard_size: int, progress: bool = True) -> None:
    """Encode every job (src -> dst) on Ray, calling `on_done(job)` once for each as its record comes back.

    Every job is reported, whatever fails: inputs the workers never answered for (a dead worker, a failed
    pipeline) are reported as errors at the end. `progress` False (--quiet, --json) silences Ray's own warnings too.
    """
    ray = require_ray()
    check_at_least_one({"--shard-size": shard_size})
    out = Path(settings.out)
    parquet = settings.fmt == "parquet"
    shards = [list(range(i, min(i + shard_size, len(jobs)))) for i in range(0, len(jobs), shard_size)]
    done = load_done(out, shard_size, len(jobs)) if parquet else set()
    for shard in sorted(done):
        for i in shards[shard]:
            jobs[i].status, jobs[i].dst = "skipped", shard_file(out, shard)
            on_done(jobs[i])
    todo = [s for s in range(len(shards)) if s not in done]
    if not todo:
        return
    with ExitStack() as quiet:
        quiet.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # Ray's deprecation and future warnings are not the user's business
        # Without --quiet, what Ray says while it connects stays visible (e.g. "Failed to connect to GCS at ...").
        if not progress:
            quiet.enter_context(native_stderr_hidden())
        # No --ray-address: a new local instance, not whatever cluster `ray start` last left on this machine (which
        # Ray's default would join), unless RAY_ADDRESS names one, as it does inside a Ray job.
        target = address or (None if os.environ.get("RAY_ADDRESS") else "local")
        if address:  # a wrong address would keep Ray retrying for minutes before it gives up
            check_reachable(address)
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            # Its warnings while starting are chatter ("Token authentication is enabled for this Ray cluster").
            ray.init(address=target, include_dashboard=False, log_to_driver=False, configure_logging=True,
                     logging_level=logging.ERROR if progress else logging.CRITICAL + 1)
        except Exception as exc:
            where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
            # Ray's own message says it; the causes under it hold tracebacks ("Failed to connect to GCS. Last
            # connection error: Traceback (most recent call last):" where something else answers at the address).
            hint = " (expected a running cluster's address, as 'ray start --head' prints it)" if address else ""
            raise VaeError(f"cannot reach the Ray cluster at {where}: "
                           f"{one_line(exc, causes=False)}{hint}") from None
        finally:
            # ray.init makes SIGTERM a bare sys.exit; the caller's handler (the CLI's: stop like Ctrl-C, every
            # input reported) comes back.
            if sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)
        if progress:
            quiet.enter_context(native_stderr_hidden())
        try:
            quiet.callback(_quiet_ray_python(progress))
            pool = pool_size(ray.cluster_resources(), workers, cpus_per_worker, gpus_per_worker)
            _run(ray, jobs, settings, on_done, shards, shard_size, todo, done, pool, cpus_per_worker,
                 gpus_per_worker)
        finally:
            with suppress(Exception):
                ray.shutdown()


def _run(ray, jobs, settings, on_done, shards, shard_size, todo, done, pool, cpus_per_worker,
         gpus_per_worker) -> None:
    out, parquet = Path(settings.out), settings.fmt == "parquet"
    # Workers run in other folders (and on other machines): they get absolute paths, and each input's relative
    # path, which seeds its --sample noise as in a local run.
    items = [{"shard": s, "items": json.dumps([(i, str(jobs[i].src.absolute()),
                                                 str(jobs[i].dst.absolute()) if jobs[i].dst else "",
                                                 str(jobs[i].rel or jobs[i].src.name))
                                                for i in shards[s]])} for s in todo]
    # Records come back a whole shard at a time, some while after the shard ends (Ray Data's hand-over): an output
    # written before an interruption may have no record yet. What the workers wrote is told by the folders then.
    before = _inodes(_outputs(jobs, shards, todo, out, parquet))
    try:
        _collect(ray, jobs, items, settings, on_done, shards, shard_size, todo, done, pool, cpus_per_worker,
                 gpus_per_worker)
    except KeyboardInterrupt:
        with suppress(Exception):
            ray.shutdown()  # the workers stop: nothing is written after the look below
        _report_written(jobs, settings, on_done, shards, shard_size, todo, done, before)
        raise


def _outputs(jobs, shards, todo, out: Path, parquet: bool) -> list[Path]:
    """The files the workers write for shards `todo`: their parquet files, or their inputs' outputs."""
    if parquet:
        return [shard_file(out, s) for s in todo]
    return [jobs[i].dst for s in todo for i in shards[s] if jobs[i].dst is not None]


def _inodes(paths: list[Path]) -> dict[Path, int | None]:
    """The inode of each of `paths` (None: none there), listing each folder once rather than a stat per file. An
    output written since has another: it is renamed into place over the old one (or into an empty name)."""
    folders: dict[Path, dict[str, int]] = {}
    found = {}
    for path in paths:
        if path.parent not in folders:
            try:
                with os.scandir(path.parent) as entries:
                    folders[path.parent] = {e.name: e.inode() for e in entries}
            except OSError:
                folders[path.parent] = {}
        found[path] = folders[path.parent].get(path.name)
    return found


def _report_written(jobs, settings, on_done, shards, shard_size, todo, done, before) -> None:
    """After an interruption, with the workers stopped: report `ok` each input whose output (parquet: its shard's
    file, whose rows hold every input's record) was written since `before`, rather than leave it `cancelled`."""
    out, parquet = Path(settings.out), settings.fmt == "parquet"
    after = _inodes(_outputs(jobs, shards, todo, out, parquet))
    written = {path for path, inode in after.items() if inode is not None and inode != before.get(path)}
    for s in todo:
        pending = [i for i in shards[s] if jobs[i].status == "pending"]
        if not pending:
            continue
        if parquet:
            if shard_file(out, s) not in written:
                continue
            try:
                import pyarrow.parquet as pq

                rows = pq.read_table(shard_file(out, s), columns=["status", "error", "shape", "model"]).to_pylist()
            except Exception:  # not as this run wrote it: the rerun redoes the shard
                continue
            if len(rows) != len(shards[s]):
                continue
            for i, row in zip(shards[s], rows, strict=True):
                if i in pending:
                    _take_record(jobs[i], {**row, "error": row["error"] or "", "shape": json.dumps(row["shape"])},
                                 out, s)
                    on_done(jobs[i])
            if any(jobs[i].status == "error" for i in shards[s]):
                continue  # a rerun redoes it
            done.add(s)
            with suppress(Exception):  # else a rerun redoes it
                save_done(out, shard_size, len(jobs), done)
            continue
        from vaecli.latents import read_metadata

        for i in pending:
            if jobs[i].dst not in written:
                continue
            try:
                meta = read_metadata(jobs[i].dst, need_model=False)
            except Exception:
                continue
            _take_record(jobs[i], {"status": "ok", "error": "", "model": meta.get("model") or settings.model,
                                   "shape": json.dumps(meta["shape"])}, out, None)
            on_done(jobs[i])


def _collect(ray, jobs, items, settings, on_done, shards, shard_size, todo, done, pool, cpus_per_worker,
             gpus_per_worker) -> None:
    """Run the shards `todo` on the pool and report each record as it comes back; the unanswered ones at the end."""
    out, parquet = Path(settings.out), settings.fmt == "parquet"
    left = {s: len(shards[s]) for s in todo}
    # Parquet shards a rerun redoes: their file could not be written, or an input failed (it is retried, as the local
    # engine retries an input that has no output).
    undone: set[int] = set()
    shard_of = {i: s for s in todo for i in shards[s]}
    failure, save_error = None, None
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        encoder = type("ConfiguredShardEncoder", (ShardEncoder,), {"settings": asdict(settings)})
        options = dict(batch_size=1, batch_format="numpy", num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
                       compute=ray.data.ActorPoolStrategy(size=min(pool, len(items)),
                                                          max_tasks_in_flight_per_actor=1))
        # One shard in flight per actor: an actor that dies takes down only the shard it was encoding, not shards
        # queued behind it (they would burn their retries on a crash that is not theirs).
        # Ray Data restarts a dead actor and retries its task forever: a shard that kills its worker every time (a
        # crash, memory) would hang the run. Retry it a few times, then report its inputs and go on. Ray 2.60
        # deprecates the keyword and has no other; without it (a later Ray), the default.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            try:
                ds = ds.map_batches(encoder, max_task_retries=TASK_RETRIES, **options)
            except TypeError:
                ds = ds.map_batches(encoder, **options)
        rows = iter(ds.iter_rows())
    except Exception as exc:
        failure, rows = exc, iter(())
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except Exception as exc:  # the pipeline failed: the inputs still unanswered are reported below
            failure = exc
            break
        index = int(row["index"])
        if index not in shard_of or jobs[index].status != "pending":
            continue  # not ours, or already reported (a retried task)
        job, shard = jobs[index], shard_of[index]
        _take_record(job, row, out, shard if parquet else None)
        if parquet and (not row["output"] or job.status == "error"):
            undone.add(shard)
        on_done(job)
        left[shard] -= 1
        if parquet and left[shard] == 0 and shard not in undone:
            done.add(shard)
            try:
                save_done(out, shard_size, len(jobs), done)
            except Exception as exc:  # the shards are written; only the record of them is not
                save_error = exc
    why = (f"the Ray pipeline failed before this input was encoded: {one_line(failure)}" if failure is not None
           else f"no result: the Ray worker encoding its shard died on {TASK_RETRIES + 1} tries (a crash, or killed, "
                f"e.g. out of memory; see Ray's worker logs)")
    for s in todo:
        for i in shards[s]:
            if jobs[i].status == "pending":
                jobs[i].status, jobs[i].error, jobs[i].extra = "error", why, {}
                on_done(jobs[i])
    if save_error is not None:
        raise VaeError(f"{out / DONE_FILE}: cannot record the finished shards ({describe(save_error)}); "
                       f"a rerun redoes them")


class WorkerError(Exception):
    """An input's failure on a Ray worker, carried to the driver as the text of its traceback."""


def _take_record(job, row: dict, out: Path, shard: int | None) -> None:
    """Fill `job` from the worker's record (`shard`: its parquet shard)."""
    status, error = str(row["status"]), str(row["error"] or "")
    if status not in DONE_STATES or (status == "error" and not error):
        status, error = "error", error or f"the Ray worker answered {status!r}"
    job.status, job.error = status, error or None
    if job.error:  # say the paths as the user gave them, not as the absolute ones the worker saw
        job.error = _as_given(job.error, job.src, job.dst)
    if shard is not None:
        job.dst = shard_file(out, shard)
    job.extra = {"model": row["model"]}
    if row.get("node"):  # not for a record read back from the output after an interruption
        job.extra["node"] = row["node"]
    if row.get("traceback"):  # --debug shows it
        job.exc = WorkerError(f"the Ray worker's traceback:\n{str(row['traceback']).rstrip()}")
    if job.status == "ok":
        shape = json.loads(row["shape"])
        job.extra["shape"] = shape
        where = f" -> {job.dst}" if job.dst else ""
        job.extra["line"] = f"{job.src}{where}  {row['model']} latent {shape}"


def _as_given(text: str, *paths: Path | None) -> str:
    """`text` with the absolute forms of `paths` (and of their folders) written as the user gave them."""
    for path in paths:
        if path is None or path.is_absolute():
            continue
        for p in (path, *path.parents[:-1]):  # longest first; parents[-1] is "."
            text = re.sub(re.escape(str(p.absolute())) + r"(?=$|[/:\s,;)'\"])", lambda _, p=p: str(p), text)
    return text


def one_line(exc: BaseException, causes: bool = True) -> str:
    """`Type: first line of the message` for an error from Ray, looking through its wrappers to the cause (unless
    not `causes`)."""
    seen: set[int] = set()
    while causes and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # RayTaskError and friends
        nxt = cause if isinstance(cause, BaseException) else exc.__cause__
        if nxt is None:
            break
        exc = nxt
    if isinstance(exc, VaeError):
        return str(exc)
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _quiet_ray_python(show_warnings: bool) -> Callable[[], None]:
    """Ray's Python-level output after `ray.init`, until the returned undo function is called: no progress bars
    (`vae` shows its own), no INFO lines or tracebacks on the terminal; with `show_warnings` Ray's one-line
    warnings (e.g. resources the cluster lacks) and the raylet's messages (e.g. a worker that died) on stderr, else
    nothing. (Ray prints the raylet's messages on stdout, where --json wants only records.)"""
    import ray.data

    undo: list[Callable[[], None]] = []
    ray_log = logging.getLogger("ray")
    undo.append(lambda level=ray_log.level: ray_log.setLevel(level))
    ray_log.setLevel(logging.WARNING if show_warnings else logging.CRITICAL + 1)
    keep = _warnings_only if show_warnings else _nothing
    for name in ("ray", "ray.data"):  # Ray Data's own log file (in the session folder) keeps everything
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):  # Ray Data logs failed tasks at ERROR with a traceback
                handler.addFilter(keep)
                undo.append(lambda handler=handler: handler.removeFilter(keep))
    ctx = ray.data.DataContext.get_current()
    # max_errored_blocks: a shard whose worker died TASK_RETRIES + 1 times is reported by the driver; go on.
    settings = {"enable_progress_bars": False, "print_on_execution_start": False, "verbose_stats_logs": False,
                "max_errored_blocks": -1}
    for key, value in settings.items():
        if hasattr(ctx, key):
            undo.append(lambda key=key, old=getattr(ctx, key): setattr(ctx, key, old))
            setattr(ctx, key, value)
    try:
        import ray._private.worker as ray_worker

        printer = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):  # another Ray version: its messages go where it sends them
        pass
    else:
        def raylet_message(data: dict, ignore_prefix: bool) -> None:
            if show_warnings:
                printer({**data, "is_err": True}, ignore_prefix)

        ray_worker.print_to_stdstream = raylet_message
        undo.append(lambda: setattr(ray_worker, "print_to_stdstream", printer))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno == logging.WARNING and not record.exc_info


def _nothing(record: logging.LogRecord) -> bool:
    return False


@contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """File descriptor 2 to /dev/null, `sys.stderr` to a copy of the real stderr, until the block ends.

    Ray's C++ core worker in this process logs straight to descriptor 2 (e.g. "core_worker.cc: Actor with class
    name ... has constructor arguments in the object store and max_restarts > 0", a false alarm for Ray Data's
    actor pools); `vae`'s lines and Ray's Python loggers go through `sys.stderr` and still show (the latter as
    `_quiet_ray_python` allows). Processes Ray starts meanwhile inherit the /dev/null stderr. Does nothing when
    `sys.stderr` is not descriptor 2 (e.g. under Click's CliRunner).
    """
    previous = sys.stderr
    try:
        previous.flush()
        real = previous.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    if not real:
        yield
        return
    saved = os.dup(2)
    stream = open(saved, "w", buffering=1, encoding=getattr(previous, "encoding", None) or "utf-8",  # noqa: SIM115
                  errors=getattr(previous, "errors", None) or "backslashreplace")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    sys.stderr = stream
    try:
        yield
    finally:
        with suppress(Exception):
            stream.flush()
        sys.stderr = previous
        os.dup2(saved, 2)
        stream.close()
