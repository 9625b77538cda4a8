"""Scale-out encoding on a Ray cluster with Ray Data: the local engine's stages, one loaded model per actor.

Inputs are cut by position into shards of `shard_size`; a shard is one unit of work for an actor, which reads,
encodes and writes its images with `pipeline.encode_stages` (the code `vae encode` runs locally, so the latents are
the same bits at the same thread count) and returns one record per input. Per-file output mirrors the input tree
and skips files that exist; parquet output writes `part-NNNNN.parquet` per shard and lists finished shards in
`_shards.json`, so a rerun skips them. Per-input failures become records; they never stop the job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from vaecli.errors import UsageError, VaeError

INSTALL = "pip install 'vaecli[ray]'"
DONE_FILE = "_shards.json"
RECORD = ("index", "status", "error", "output", "model", "shape", "node")


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


def shard_file(out: Path, shard: int) -> Path:
    """The parquet file of shard number `shard` under the output folder."""
    return Path(out) / f"part-{shard:05d}.parquet"


class ShardEncoder:
    """Ray Data callable class: loads the model once per actor, then encodes whole shards.

    `encode` subclasses it with the settings as a class attribute: constructor arguments would go through the
    object store, which Ray warns about for restartable actors.
    """

    settings: dict = {}

    def __init__(self):
        import ray
        import torch

        from vaecli.codec import load_codec

        self.s = Settings(**self.settings)
        torch.set_num_threads(self.s.threads)
        self.codec = load_codec(self.s.model, [Path(p) for p in self.s.weights], ("encoder",), self.s.device,
                                self.s.dtype, verify=False, tile=self.s.tile, budget=self.s.budget)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        rows: dict[str, list] = {k: [] for k in RECORD}
        for shard, items in zip(batch["shard"], batch["items"], strict=True):
            for index, job in self.encode_shard(int(shard), json.loads(items)):
                record = {"index": index, "status": job.status, "error": job.error or "",
                          "output": str(job.dst) if job.dst else "", "model": self.codec.spec.name,
                          "shape": json.dumps(job.extra.get("shape")), "node": self.node}
                for k in RECORD:
                    rows[k].append(record[k])
        return rows

    def encode_shard(self, shard: int, items: list) -> list:
        """[(index, src, dst)] -> [(index, finished Job)]; parquet mode writes the shard's file."""
        from vaecli import batch
        from vaecli.pipeline import encode_stages

        parquet = self.s.fmt == "parquet"
        jobs = [batch.Job(Path(src), None if parquet else Path(dst)) for _, src, dst in items]
        stages = encode_stages(self.codec, "bytes" if parquet else self.s.fmt, self.s.space, self.s.sample,
                               self.s.seed, self.s.alpha, self.s.batch_size, self.s.skip_existing)
        try:
            batch.run(jobs, on_done=lambda job: None, **stages)
        except Exception as exc:  # a worker fault (not a bad input): record it on the inputs it left undone
            for job in jobs:
                if job.status == "pending":
                    job.status, job.error = "error", f"worker error: {type(exc).__name__}: {exc}"
        if parquet:
            dest = shard_file(Path(self.s.out), shard)
            write_shard(dest, jobs)
            for job in jobs:
                job.dst = dest
        return [(index, job) for (index, _, _), job in zip(items, jobs, strict=True)]


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
    """Encode every job (src -> dst) on Ray, calling `on_done(job)` for each as its record comes back."""
    ray = require_ray()
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
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
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise VaeError(f"cannot reach the Ray cluster at {address or 'a new local instance'}: {exc}") from None
    try:
        if not progress:
            for name in ("ray", "ray.data"):
                logging.getLogger(name).setLevel(logging.ERROR)
            ray.data.DataContext.get_current().enable_progress_bars = False
        pool = pool_size(ray.cluster_resources(), workers, cpus_per_worker, gpus_per_worker)
        # Workers run in other folders (and on other machines): they get absolute paths.
        items = [{"shard": s, "items": json.dumps([(i, str(jobs[i].src.absolute()),
                                                     str(jobs[i].dst.absolute()) if jobs[i].dst else "")
                                                    for i in shards[s]])} for s in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            type("ConfiguredShardEncoder", (ShardEncoder,), {"settings": asdict(settings)}), batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(pool, len(items))), num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None)
        left = {s: len(shards[s]) for s in todo}
        shard_of = {i: s for s in todo for i in shards[s]}
        for row in ds.iter_rows():
            job, shard = jobs[int(row["index"])], shard_of[int(row["index"])]
            job.status, job.error = row["status"], row["error"] or None
            if job.error:  # say the input as the user gave it, not the absolute path the worker saw
                job.error = job.error.replace(str(job.src.absolute()), str(job.src), 1)
            if parquet:
                job.dst = shard_file(out, shard)
            shape = json.loads(row["shape"])
            job.extra = {"model": row["model"], "node": row["node"]}
            if job.status == "ok":
                job.extra["shape"] = shape
                where = f" -> {job.dst}" if job.dst else ""
                job.extra["line"] = f"{job.src}{where}  {row['model']} latent {shape}"
            on_done(job)
            left[shard] -= 1
            if parquet and left[shard] == 0:
                done.add(shard)
                save_done(out, shard_size, len(jobs), done)
    finally:
        ray.shutdown()
