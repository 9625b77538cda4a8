"""`vae encode --engine ray`: a real two-node local Ray cluster, outputs equal to the local engine, resume, parquet."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.conftest import default_sigint
from vaecli import latents
from vaecli.errors import UsageError
from vaecli.ray_engine import pool_size

RAY = Path(sys.executable).parent / "ray"
README = Path(__file__).resolve().parents[1] / "README.md"
WIDTHS = (64, 96, 120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node on 127.0.0.1, one CPU each, started out of process and stopped at the end."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    start = [str(RAY), "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
    try:
        subprocess.run(start + ["--head", "--port", str(port), "--include-dashboard", "false",
                                "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(start + ["--address", address], env=env, check=True, capture_output=True, timeout=120)
        deadline = time.time() + 90
        while True:  # the second node registers asynchronously
            status = subprocess.run([str(RAY), "status", "--address", address], env=env, capture_output=True,
                                    text=True).stdout
            active = status.split("Active:")[-1].split("Pending:")[0] if "Active:" in status else ""
            if active.count("node_") >= 2:
                break
            if time.time() > deadline:
                pytest.fail(f"the second Ray node did not join:\n{status}")
            time.sleep(1)
        yield {"address": address, "env": env}
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shared_images) -> Path:
    """24 resized variants of the shared photos in two subfolders, plus one broken file: 25 inputs."""
    root = tmp_path_factory.mktemp("dataset")
    photos = sorted(p for p in shared_images.iterdir() if p.suffix in (".png", ".jpg"))
    for n, path in enumerate(photos):
        img = Image.open(path)
        img.load()
        for w in WIDTHS:
            h = max(8, round(img.height * w / img.width))
            sub = root / ("a" if n % 2 else "b")
            sub.mkdir(exist_ok=True)
            img.resize((w, h)).save(sub / f"{path.stem}_{w}.png")
    (root / "a" / "broken.png").write_bytes(b"not a png")
    assert len(list(root.rglob("*.png"))) >= 21
    return root


def vae(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaecli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def local_run(dataset, shared_weights, tmp_path_factory) -> Path:
    """The local engine's outputs, at one torch thread like each Ray worker (oneDNN's sums follow the threads)."""
    out = tmp_path_factory.mktemp("local") / "out"
    env = {**os.environ, "VAE_WEIGHTS_DIR": str(shared_weights), "OMP_NUM_THREADS": "1"}
    proc = vae("encode", dataset, "-r", "-o", out, "--quiet", env=env)
    assert proc.returncode == 1, proc.stderr
    return out


def records(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_ray_files_equal_local_across_two_nodes_and_resume(cluster, dataset, local_run, shared_weights, tmp_path):
    manifest = tmp_path / "inputs.txt"  # a manifest: the driver never walks the tree
    manifest.write_text("\n".join(str(p) for p in sorted(dataset.rglob("*.png"))) + "\n")
    out = tmp_path / "out"
    env = {**cluster["env"], "VAE_WEIGHTS_DIR": str(shared_weights)}
    cmd = ["encode", manifest, "-o", out, "--engine", "ray", "--ray-address", cluster["address"],
           "--shard-size", "3", "--json"]
    proc = vae(*cmd, env=env)
    assert proc.returncode == 1, proc.stderr
    recs = records(proc)
    assert len(recs) == 25
    assert {r["status"] for r in recs if "broken" not in r["input"]} == {"ok"}
    broken = next(r for r in recs if "broken" in r["input"])
    assert broken["status"] == "error"
    assert broken["error"] == f"{dataset / 'a' / 'broken.png'}: not an image file Pillow can read"
    assert f"Error: {dataset / 'a' / 'broken.png'}: not an image file Pillow can read" in proc.stderr.splitlines()
    assert len({r["node"] for r in recs}) == 2, "both nodes should have encoded shards"

    ours = sorted(p.relative_to(out) for p in out.rglob("*.latent"))
    theirs = sorted(p.relative_to(local_run) for p in local_run.rglob("*.latent"))
    assert ours == theirs and len(ours) == 24  # mirrored a/ and b/ as the local engine did
    for rel in ours:
        assert (out / rel).read_bytes() == (local_run / rel).read_bytes(), rel
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.latent")}

    again = vae(*cmd, env=env)
    assert again.returncode == 1
    assert sorted(r["status"] for r in records(again)) == ["error"] + ["skipped"] * 24
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.latent")} == mtimes


def readme_unpack_command() -> str:
    """The documented parquet -> .latent files one-liner from the README."""
    text = README.read_text()
    m = re.search(r"<!-- unpack-parquet -->\n```sh\n(.+?)\n```", text, re.S)
    assert m, "README lost its unpack-parquet example"
    return m.group(1).splitlines()[0]


def test_ray_parquet_shards_decode_like_local(cluster, dataset, local_run, shared_weights, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "shards"
    env = {**cluster["env"], "VAE_WEIGHTS_DIR": str(shared_weights)}
    cmd = ["encode", dataset, "-r", "-o", out, "--engine", "ray", "--ray-address", cluster["address"],
           "--output-format", "parquet", "--shard-size", "5", "--quiet"]
    proc = vae(*cmd, env=env)
    assert proc.returncode == 1, proc.stderr
    parts = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(5)]
    rows = [row for p in parts for row in pq.read_table(p).to_pylist()]
    assert len(rows) == 25
    broken = next(n for n, r in enumerate(rows) if Path(r["path"]).name == "broken.png") // 5
    # the shard with the broken input is redone by a rerun, as a files run retries an input without output
    assert json.loads((out / "_shards.json").read_text()) == {
        "shard_size": 5, "inputs": 25, "done": [s for s in range(5) if s != broken]}
    bad = [r for r in rows if r["status"] != "ok"]
    assert [(Path(r["path"]).name, r["error"], r["latent"]) for r in bad] == [
        ("broken.png", f"{dataset / 'a' / 'broken.png'}: not an image file Pillow can read", None)]
    for row in rows:
        if row["status"] == "ok":
            rel = Path(row["path"]).relative_to(dataset).with_suffix(".latent")
            assert row["latent"] == (local_run / rel).read_bytes(), rel
            latent, meta = latents.load_latent(local_run / rel)
            assert row["shape"] == list(latent.shape) and row["model"] == "taef2"
            assert row["source_size"] == meta["image_size"]

    # The README's one-liner unpacks a shard; `vae decode` gives the images the local latents give.
    unpacked = tmp_path / "unpacked"
    line = readme_unpack_command().replace("part-00000.parquet", str(parts[0])).replace("latents/", f"{unpacked}/")
    subprocess.run(line.replace("python ", f"{sys.executable} ", 1), shell=True, check=True)
    names = sorted(p.name for p in unpacked.iterdir())
    shard0 = pq.read_table(parts[0]).to_pylist()
    assert names == sorted(Path(r["path"]).stem + ".latent" for r in shard0 if r["status"] == "ok")
    decoded = tmp_path / "decoded"
    denv = {**os.environ, "VAE_WEIGHTS_DIR": str(shared_weights)}
    assert vae("decode", unpacked, "-o", decoded, "--quiet", env=denv).returncode == 0
    for name in names:
        rel = next(local_run.rglob(name)).relative_to(local_run)
        ref = tmp_path / "ref.png"
        assert vae("decode", local_run / rel, "-o", ref, "--overwrite", "--quiet", env=denv).returncode == 0
        assert (decoded / name.replace(".latent", ".png")).read_bytes() == ref.read_bytes()

    again = vae(*cmd[:-1], "--json", env=env)
    assert again.returncode == 1, again.stderr
    statuses = {Path(r["input"]).name: r["status"] for r in records(again)}
    assert statuses == {Path(r["path"]).name: "error" if Path(r["path"]).name == "broken.png" else
                        "ok" if n // 5 == broken else "skipped" for n, r in enumerate(rows)}
    assert all(r["output"].endswith(".parquet") for r in records(again) if r["status"] != "error")


# A fault injected into the Ray workers: every Python process started with this folder on PYTHONPATH imports it,
# and once `vaecli.codec` is imported, `Codec.encode_batch` raises for images VAE_TEST_RAISE_WIDTH wide, kills
# its process outright (a crash, as a segfault or the OOM killer would) for VAE_TEST_CRASH_WIDTH and never returns
# for VAE_TEST_HANG_WIDTH; `ray_engine.write_shard` never returns once it wrote the shard file named
# VAE_TEST_HANG_AFTER_SHARD. A new local Ray instance's workers inherit the driver's environment.
FAULTS = '''
import importlib.abc
import importlib.util
import os
import sys
import time

RAISE, CRASH, HANG = (int(os.environ.get(k) or 0) for k in (
    "VAE_TEST_RAISE_WIDTH", "VAE_TEST_CRASH_WIDTH", "VAE_TEST_HANG_WIDTH"))
HANG_AFTER_SHARD = os.environ.get("VAE_TEST_HANG_AFTER_SHARD")


def patch_codec(module):
    encode_batch = module.Codec.encode_batch

    def faulty(self, pixels, *args, **kwargs):
        if pixels.shape[-1] == CRASH:
            os._exit(3)
        if pixels.shape[-1] == RAISE:
            raise RuntimeError(f"injected fault at width {RAISE}")
        if pixels.shape[-1] == HANG:
            time.sleep(3600)
        return encode_batch(self, pixels, *args, **kwargs)

    module.Codec.encode_batch = faulty


def patch_ray_engine(module):
    write_shard = module.write_shard

    def hanging(dest, jobs):
        write_shard(dest, jobs)
        if dest.name == HANG_AFTER_SHARD:
            time.sleep(3600)

    module.write_shard = hanging


class Hook(importlib.abc.MetaPathFinder):
    patches = {"vaecli.codec": patch_codec, "vaecli.ray_engine": patch_ray_engine}

    def find_spec(self, name, path, target=None):
        patch = self.patches.pop(name, None)
        if patch is None:
            return None
        sys.meta_path.remove(self)  # find the module itself, not this hook again
        spec = importlib.util.find_spec(name)
        if self.patches:
            sys.meta_path.insert(0, self)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if RAISE or CRASH or HANG or HANG_AFTER_SHARD:
    sys.meta_path.insert(0, Hook())
'''


def _image(path: Path, width: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, 32), (width, 90, 200)).save(path)
    return path


@pytest.fixture
def local_env(shared_weights, tmp_path) -> dict:
    """For a new local Ray instance started by `vae` itself, with the fault injector on its workers' path."""
    hook = tmp_path / "faults"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULTS)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "VAE_WEIGHTS_DIR": str(shared_weights), "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # not the `cluster` fixture's nor anyone else's: vae starts its own
    return env


def test_ray_quiet_prints_nothing(local_env, tmp_path):
    """Ray's own lines (the C++ core worker's "Actor with class name ..." warning, Ray Data's log and progress)
    never reach the terminal: -q prints nothing; --json -q prints only records."""
    src = tmp_path / "in"
    for n, width in enumerate((40, 48, 56)):
        _image(src / f"img{n}.png", width)
    out = tmp_path / "out"
    proc = vae("encode", src, "-o", out, "--engine", "ray", "-q", env=local_env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert sorted(p.name for p in out.iterdir()) == ["img0.latent", "img1.latent", "img2.latent"]

    shards = tmp_path / "shards"
    proc = vae("encode", src, "-o", shards, "--engine", "ray", "--output-format", "parquet", "--json", "-q",
               env=local_env)
    assert (proc.returncode, proc.stderr) == (0, "")
    recs = records(proc)  # every stdout line is a record
    assert [(r["input"], r["status"], r["output"]) for r in recs] == [
        (str(src / f"img{n}.png"), "ok", str(shards / "part-00000.parquet")) for n in range(3)]
    assert json.loads((shards / "_shards.json").read_text())["done"] == [0]


def test_ray_failures_are_records_and_the_run_goes_on(local_env, tmp_path):
    """An output that cannot be written, a corrupt input and an exception in a worker's compute each become their
    input's error record, one line; the others are written; exit 1; on stderr only vae's own lines."""
    src = tmp_path / "in"
    _image(src / "a" / "x.png", 40)  # its output folder out/a is a file
    _image(src / "b" / "y.png", 48)
    (src / "broken.png").write_bytes(b"not a png")
    _image(src / "c.png", 57)  # compute raises
    _image(src / "d.png", 64)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a file, not a folder")
    env = {**local_env, "VAE_TEST_RAISE_WIDTH": "57"}
    proc = vae("encode", src, "-r", "-o", out, "--engine", "ray", "--shard-size", "2", "--json", "-q", env=env)
    assert proc.returncode == 1, proc.stderr
    recs = {Path(r["input"]).relative_to(src).as_posix(): r for r in records(proc)}
    assert sorted(recs) == ["a/x.png", "b/y.png", "broken.png", "c.png", "d.png"]
    assert {k: r["status"] for k, r in recs.items()} == {
        "a/x.png": "error", "b/y.png": "ok", "broken.png": "error", "c.png": "error", "d.png": "ok"}
    errors = {k: r["error"] for k, r in recs.items() if r["error"]}
    assert str(out / "a") in errors["a/x.png"] and "not a folder" in errors["a/x.png"]
    assert errors["broken.png"] == f"{src / 'broken.png'}: not an image file Pillow can read"
    assert "RuntimeError" in errors["c.png"] and "injected fault at width 57" in errors["c.png"]
    assert all("\n" not in e for e in errors.values())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.latent")) == ["b/y.latent", "d.latent"]
    assert (out / "a").read_text() == "a file, not a folder"
    ours = [f"Error: {src / k}: {e}" if not e.startswith(str(src / k)) else f"Error: {e}"
            for k, e in sorted(errors.items())]
    lines = proc.stderr.splitlines()
    assert sorted(lines[:3]) == ours  # nothing of Ray's in between
    assert lines[3:] == ["3 of 5 inputs failed:", *(f"  {line.removeprefix('Error: ')}" for line in lines[:3])]


def test_ray_parquet_failures_and_a_crashing_worker(local_env, tmp_path):
    """Parquet: a shard file that cannot be written fails its inputs and stays undone; error rows are written;
    a worker that dies on every try of its shard does not hang the run: that shard's inputs are reported failed,
    the other shards are written. --debug shows a worker's traceback."""
    src = tmp_path / "in"
    _image(src / "a.png", 40)  # shard 0: its file's name is taken by a folder
    _image(src / "b.png", 48)
    (src / "c.png").write_bytes(b"not a png")
    _image(src / "d.png", 57)  # compute raises
    _image(src / "e.png", 72)  # the worker dies, every time
    out = tmp_path / "shards"
    (out / "part-00000.parquet" / "taken").mkdir(parents=True)
    env = {**local_env, "VAE_TEST_RAISE_WIDTH": "57", "VAE_TEST_CRASH_WIDTH": "72"}
    proc = vae("encode", src, "-o", out, "--engine", "ray", "--output-format", "parquet", "--shard-size", "1",
               "--json", "-q", "--debug", env=env)
    assert proc.returncode == 1, proc.stderr
    recs = {Path(r["input"]).name: r for r in records(proc)}
    assert {k: r["status"] for k, r in recs.items()} == {
        "a.png": "error", "b.png": "ok", "c.png": "error", "d.png": "error", "e.png": "error"}
    assert str(out / "part-00000.parquet") in recs["a.png"]["error"]
    assert recs["c.png"]["error"] == f"{src / 'c.png'}: not an image file Pillow can read"
    assert "RuntimeError: injected fault at width 57" in recs["d.png"]["error"]
    assert "died" in recs["e.png"]["error"]
    assert all("\n" not in r["error"] for r in recs.values() if r["error"])
    # a's shard (no file), c's and d's (a failed input, retried) and e's (no file) are redone
    assert json.loads((out / "_shards.json").read_text())["done"] == [1]
    assert sorted(p.name for p in out.glob("part-*.parquet") if p.is_file()) == [
        "part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    # --debug: the traceback from the worker, then vae's line
    assert "Traceback (most recent call last)" in proc.stderr and "sitecustomize.py" in proc.stderr
    assert f"Error: {src / 'd.png'}: {recs['d.png']['error']}" in proc.stderr.splitlines()


def _interrupted(args, env, written: list[Path], signum) -> subprocess.CompletedProcess:
    """Run `vae args`, and send it `signum` once every file of `written` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "vaecli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    deadline = time.time() + 300
    while not all(p.exists() for p in written):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"{written} were not all written: {proc.communicate()}")
        time.sleep(0.1)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_ray_interrupted_reports_what_the_workers_wrote(local_env, tmp_path):
    """Interrupted while a shard is under way, or after its file was written but before its records came back:
    every output written before the stop is reported as written (it was `cancelled`); only the rest is cancelled."""
    src = tmp_path / "in"
    a, b = _image(src / "a.png", 40), _image(src / "b.png", 48)
    c = _image(src / "c.png", 56)  # never finishes
    out = tmp_path / "out"
    env = {**local_env, "VAE_TEST_HANG_WIDTH": "56"}
    proc = _interrupted(["encode", src, "-o", out, "--engine", "ray", "--workers", "1", "--json", "-q"], env,
                        [out / "a.latent", out / "b.latent"], signal.SIGINT)
    assert (proc.returncode, proc.stderr) == (130, "Interrupted: finished outputs are complete; rerun to do the rest\n")
    assert records(proc) == [
        {"input": str(a), "output": str(out / "a.latent"), "status": "ok", "error": None, "model": "taef2",
         "shape": [32, 4, 5]},
        {"input": str(b), "output": str(out / "b.latent"), "status": "ok", "error": None, "model": "taef2",
         "shape": [32, 4, 6]},
        {"input": str(c), "output": None, "status": "cancelled", "error": None}]
    assert sorted(p.name for p in out.iterdir()) == ["a.latent", "b.latent"]

    (src / "b.png").write_bytes(b"not a png")
    d, e = _image(src / "d.png", 64), _image(src / "e.png", 72)
    shards = tmp_path / "shards"
    env = {**local_env, "VAE_TEST_HANG_AFTER_SHARD": "part-00001.parquet"}
    proc = _interrupted(["encode", src, "-o", shards, "--engine", "ray", "--workers", "1", "--shard-size", "2",
                         "--output-format", "parquet", "--json", "-q"], env, [shards / "part-00001.parquet"],
                        signal.SIGTERM)
    assert (proc.returncode, proc.stderr) == (130, "\n".join([
        f"Error: {b}: not an image file Pillow can read", "1 of 5 inputs failed:",
        f"  {b}: not an image file Pillow can read",
        "Interrupted: finished outputs are complete; rerun to do the rest", ""]))
    # shard 0's records came back or were read back, shard 1's were read back; shard 0 is redone (b failed)
    recs = [{k: v for k, v in r.items() if k != "node"} for r in records(proc)]
    part0, part1 = str(shards / "part-00000.parquet"), str(shards / "part-00001.parquet")
    assert recs == [
        {"input": str(a), "output": part0, "status": "ok", "error": None, "model": "taef2", "shape": [32, 4, 5]},
        {"input": str(b), "output": None, "status": "error", "error": f"{b}: not an image file Pillow can read"},
        {"input": str(c), "output": part1, "status": "ok", "error": None, "model": "taef2", "shape": [32, 4, 7]},
        {"input": str(d), "output": part1, "status": "ok", "error": None, "model": "taef2", "shape": [32, 4, 8]},
        {"input": str(e), "output": None, "status": "cancelled", "error": None}]
    assert "node" not in records(proc)[2]
    assert json.loads((shards / "_shards.json").read_text()) == {"shard_size": 2, "inputs": 5, "done": [1]}


class _FakeRay:
    """Just enough of `ray` for the driver loop: a dataset whose rows come from `rows`, a generator."""

    def __init__(self, rows):
        self.rows = rows
        self.data = self

    def ActorPoolStrategy(self, size, max_tasks_in_flight_per_actor=None):  # noqa: N802  (Ray's name)
        assert max_tasks_in_flight_per_actor == 1  # a dying actor must take only its own shard down
        return size

    def from_items(self, items, override_num_blocks):
        self.items = items
        return self

    def map_batches(self, fn, **options):
        return self

    def iter_rows(self):
        return self.rows(self.items)


@pytest.mark.parametrize("fault", ["raises", "ends"])
def test_driver_reports_every_input_whatever_the_pipeline_does(tmp_path, fault):
    """Rows that never come back (a failed pipeline, a shard whose worker kept dying) still become error records,
    each input reported once; a row Ray delivers twice is reported once."""
    from vaecli.batch import Job
    from vaecli.ray_engine import Settings, _run

    def rows(items):
        first = json.loads(items[0]["items"])[0]
        row = {"index": first[0], "status": "ok", "error": "", "output": first[2], "model": "taef2",
               "shape": "[32, 4, 5]", "node": "n1", "traceback": ""}
        yield row
        yield row  # a retried task's duplicate
        if fault == "raises":
            raise RuntimeError("the pipeline broke\nwith a long Ray traceback")

    jobs = [Job(tmp_path / f"{n}.png", tmp_path / "out" / f"{n}.latent") for n in range(5)]
    settings = Settings(model="taef2", weights=(), dtype="fp32", device="cpu", threads=1, tile=None, budget=0,
                        fmt="safetensors", space=None, sample=False, seed=None, alpha="white", batch_size=8,
                        skip_existing=True, out=str(tmp_path / "out"), max_pixels=1 << 28)
    seen = []
    shards = [[0, 1], [2, 3], [4]]
    _run(_FakeRay(rows), jobs, settings, seen.append, shards, 2, [0, 1, 2], set(), 2, 1.0, 0.0)
    assert [j.src.name for j in seen] == [f"{n}.png" for n in range(5)]
    assert [j.status for j in seen] == ["ok"] + ["error"] * 4
    why = {j.error for j in seen[1:]}
    assert len(why) == 1 and "\n" not in why.pop()
    if fault == "raises":
        assert seen[1].error == ("the Ray pipeline failed before this input was encoded: "
                                 "RuntimeError: the pipeline broke")
    else:
        assert "died" in seen[1].error


def test_shards_carry_each_inputs_relative_path(tmp_path):
    """Workers seed each input's --sample noise by its relative path, as the local engine does: the driver sends it."""
    from vaecli.batch import Job
    from vaecli.ray_engine import Settings, _run

    sent = []

    def rows(items):
        sent.extend(json.loads(items[0]["items"]))
        return iter(())

    jobs = [Job(tmp_path / "in" / "a" / "x.png", tmp_path / "out" / "a" / "x.latent", rel=Path("a/x.png")),
            Job(tmp_path / "y.png", tmp_path / "out" / "y.latent")]
    settings = Settings(model="flux1", weights=(), dtype="fp32", device="cpu", threads=1, tile=None, budget=0,
                        fmt="safetensors", space=None, sample=True, seed=3, alpha="white", batch_size=8,
                        skip_existing=True, out=str(tmp_path / "out"), max_pixels=1 << 28)
    _run(_FakeRay(rows), jobs, settings, lambda job: None, [[0, 1]], 2, [0], set(), 1, 1.0, 0.0)
    assert [(Path(src).name, rel) for _, src, _, rel in sent] == [("x.png", "a/x.png"), ("y.png", "y.png")]


def test_engine_ray_without_ray_is_one_line(vae, small_image, tmp_path, monkeypatch, real_weights):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = vae("encode", small_image, "-o", tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 2
    assert result.stderr == "Error: --engine ray needs Ray, which is not installed: pip install 'vaecli[ray]'\n"


@pytest.mark.parametrize("args, message", [
    (["--workers", "2"], "--workers needs --engine ray"),
    (["--output-format", "parquet"], "--output-format parquet needs --engine ray"),
    (["--engine", "ray", "--fail-fast"], "--fail-fast applies to the local engine: Ray records failures and goes on"),
    (["--engine", "ray", "--device", "cuda"], "--device cuda with --engine ray needs --gpus-per-worker"),
    (["--engine", "ray", "--output-format", "parquet", "--format", "png"],
     "--format applies to --output-format files; parquet holds safetensors bytes"),
    # usage errors before a cluster starts, as locally: not one error record per input from the workers
    (["--engine", "ray", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--engine", "ray", "--shard-size", "-1"], "--shard-size must be at least 1, got -1"),
    (["--engine", "ray", "--workers", "0"], "--workers must be at least 1, got 0"),
    (["--engine", "ray", "--cpus-per-worker", "0"], "--cpus-per-worker must be more than 0, got 0"),
    (["--engine", "ray", "--gpus-per-worker", "-0.5"], "--gpus-per-worker must be at least 0, got -0.5"),
])
def test_engine_option_errors(vae, small_image, tmp_path, real_weights, args, message):
    result = vae("encode", small_image, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_pool_takes_what_fits_and_says_what_does_not():
    assert pool_size({"CPU": 2.0}, None, 1, 0) == 2  # no read stage competes for the CPUs
    assert pool_size({"CPU": 16.0, "GPU": 2.0}, None, 1, 1) == 2
    assert pool_size({"CPU": 8.0}, 3, 2, 0) == 3
    with pytest.raises(UsageError, match=r"^--workers 3: the Ray cluster \(2 CPUs, 0 GPUs\) fits 2 workers"):
        pool_size({"CPU": 2.0}, 3, 1, 0)
    with pytest.raises(UsageError, match="a worker needing 1 CPUs and 1 GPUs does not fit"):
        pool_size({"CPU": 2.0}, None, 1, 1)


def test_parquet_manifest_lists_inputs(tmp_path, vae, small_image, real_weights):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(small_image)]}), tmp_path / "list.parquet")
    result = vae("encode", tmp_path / "list.parquet", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == str(tmp_path / "out" / "small.latent")
    assert torch.isfinite(latents.load_latent(tmp_path / "out" / "small.latent")[0]).all()


def test_an_address_nobody_answers_fails_at_once(vae, small_image, tmp_path, real_weights):
    """Ray retried a wrong --ray-address for many minutes, its log lines scrolling, before giving up."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = vae("encode", small_image, "-o", tmp_path / "out", "--engine", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (f"Error: cannot reach the Ray cluster at 127.0.0.1:{port}: connection "
                                             f"refused (expected a running cluster's address, as 'ray start --head' "
                                             f"prints it)")
    assert not (tmp_path / "out").exists()


def test_ray_init_leaves_the_callers_sigterm_handler(vae, small_image, tmp_path, real_weights, monkeypatch):
    """ray.init makes SIGTERM a bare sys.exit(15): a scheduler's stop then left no summary and no records."""
    import ray

    def init(*args, **kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        raise ConnectionError("no cluster here")

    def callers(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", init)
    previous = signal.signal(signal.SIGTERM, callers)
    try:
        result = vae("encode", small_image, "-o", tmp_path / "out", "--engine", "ray")
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == ("Error: cannot reach the Ray cluster at a new local instance: "
                                             "ConnectionError: no cluster here")


def test_an_address_where_something_else_answers(vae, small_image, tmp_path, real_weights, monkeypatch):
    """Something that is not a Ray cluster answers at the address (a proxy, the dashboard's port): Ray's error has a
    cause whose first line ends in `Traceback (most recent call last):`, which was all the message said of it."""
    import ray

    def init(*args, **kwargs):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                               "  File \"node.py\", line 996, in _init_gcs_client")
        except RuntimeError as exc:
            raise ConnectionError("Failed to connect to Ray cluster at 10.1.2.3:8265") from exc

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr("vaecli.ray_engine.check_reachable", lambda address: None)
    result = vae("encode", small_image, "-o", tmp_path / "out", "--engine", "ray", "--ray-address", "10.1.2.3:8265")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        "Error: cannot reach the Ray cluster at 10.1.2.3:8265: ConnectionError: Failed to connect to Ray cluster at "
        "10.1.2.3:8265 (expected a running cluster's address, as 'ray start --head' prints it)")


def test_workers_get_absolute_weight_paths(vae, small_image, shared_weights, tmp_path, monkeypatch):
    """`-w` relative to the driver's folder: a worker started elsewhere (another node) loads the same files."""
    from vaecli import ray_engine

    sent = []

    def encode(jobs, settings, on_done, **kw):
        sent.append(settings)
        for job in jobs:
            job.status = "skipped"
            on_done(job)

    monkeypatch.setattr(ray_engine, "encode", encode)
    monkeypatch.setenv("VAE_MAX_PIXELS", "123456")
    monkeypatch.chdir(shared_weights)
    result = vae("encode", small_image, "-o", tmp_path / "out", "--engine", "ray", "-w", "taef2_encoder.pth")
    assert result.exit_code == 0, result.stderr
    assert sent[0].weights == (str(shared_weights / "taef2_encoder.pth"),)
    assert sent[0].max_pixels == 123456  # the driver's pixel limit goes with the settings


def test_workers_refuse_what_the_driver_refuses(shared_weights, tmp_path, monkeypatch):
    """A worker on another node does not have the driver's VAE_MAX_PIXELS: it applies the one sent to it."""
    from dataclasses import asdict

    from vaecli import ray_engine

    context = SimpleNamespace(get_node_id=lambda: "node0001")
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(get_runtime_context=lambda: context))
    monkeypatch.setenv("VAE_MAX_PIXELS", str(1 << 28))  # the worker's own environment, restored afterwards
    settings = ray_engine.Settings(model="taef2", weights=(str(shared_weights / "taef2_encoder.pth"),), dtype="fp32",
                                   device="cpu", threads=1, tile=None, budget=1 << 30, fmt="safetensors",
                                   space=None, sample=False, seed=None, alpha="white", batch_size=8,
                                   skip_existing=True, out=str(tmp_path / "out"), max_pixels=1000)
    monkeypatch.setattr(ray_engine.ShardEncoder, "settings", asdict(settings))
    src = _image(tmp_path / "in" / "x.png", 40)
    ((index, job),) = ray_engine.ShardEncoder().encode_shard(0, [(0, str(src), str(tmp_path / "out" / "x.latent"),
                                                                  "x.png")])
    assert (index, job.status) == (0, "error")
    assert job.error == (f"{src}: image has 1280 pixels, over the limit of 1000 pixels (set VAE_MAX_PIXELS to "
                         f"allow larger images)")
