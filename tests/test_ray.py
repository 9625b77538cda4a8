"""`vae encode --engine ray`: a real two-node local Ray cluster, outputs equal to the local engine, resume, parquet."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

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
    assert json.loads((out / "_shards.json").read_text()) == {"shard_size": 5, "inputs": 25, "done": [0, 1, 2, 3, 4]}
    rows = [row for p in parts for row in pq.read_table(p).to_pylist()]
    assert len(rows) == 25
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
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in records(again)] == ["skipped"] * 25
    assert all(r["output"].endswith(".parquet") for r in records(again))


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
