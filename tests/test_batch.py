"""Batches over folders: input expansion, mirrored outputs, resuming, failures, batching, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import default_sigint
from vaecli.latents import load_latent


@pytest.fixture
def tree(tmp_path, shared_images) -> Path:
    """A folder tree of real photo crops (varied sizes and modes) with broken files mixed in."""
    root = tmp_path / "photos"
    (root / "cats" / "close").mkdir(parents=True)
    (root / "misc").mkdir()
    crops = {"cats/chelsea.png": ("chelsea.png", (150, 40, 214, 88)),
             "cats/close/chelsea2.jpg": ("chelsea.png", (100, 100, 148, 140)),
             "misc/rocket.jpg": ("rocket.jpg", (200, 100, 264, 164)),
             "misc/brick.png": ("brick.png", (0, 0, 40, 40)),
             "misc/logo.png": ("logo.png", (100, 100, 164, 164)),
             "top.png": ("astronaut.png", (200, 100, 264, 164))}
    for rel, (name, box) in crops.items():
        img = Image.open(shared_images / name).crop(box)
        img.save(root / rel, quality=95) if rel.endswith(".jpg") else img.save(root / rel)
    data = (root / "top.png").read_bytes()
    (root / "misc" / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "cats" / "notes.jpg").write_text("not an image")
    (root / "misc" / "readme.txt").write_text("ignored: not an image extension")
    return root


def _records(result) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}


def test_tree_mirrors_reports_failures_and_resumes(vae, real_weights, tree, tmp_path):
    out = tmp_path / "latents"
    result = vae("encode", tree, "-r", "-o", out, "--json")
    assert result.exit_code == 1
    records = _records(result)
    assert len(records) == 8
    assert {n for n, r in records.items() if r["status"] == "error"} == {"truncated.png", "notes.jpg"}
    assert records["notes.jpg"]["error"] == f"{tree / 'cats' / 'notes.jpg'}: not an image file Pillow can read"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["cats/chelsea.latent", "cats/close/chelsea2.latent", "misc/brick.latent",
                       "misc/logo.latent", "misc/rocket.latent", "top.latent"]
    lines = result.stderr.strip().splitlines()
    assert lines[-4] == "done: 6 ok, 0 skipped, 2 failed"
    assert lines[-3] == "2 of 8 inputs failed:"
    listed = sorted(lines[-2:])
    assert listed[0] == f"  {tree / 'cats' / 'notes.jpg'}: not an image file Pillow can read"
    assert listed[1].startswith(f"  {tree / 'misc' / 'truncated.png'}: truncated PNG: its pixel data holds ")
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.latent")}

    again = vae("encode", tree, "-r", "-o", out, "--json")
    assert again.exit_code == 1
    statuses = {n: r["status"] for n, r in _records(again).items()}
    assert [n for n, s in statuses.items() if s == "ok"] == []
    assert sum(s == "skipped" for s in statuses.values()) == 6
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.latent")} == stamps

    forced = vae("encode", tree, "-r", "-o", out, "--overwrite", "--json")
    assert sum(r["status"] == "ok" for r in _records(forced).values()) == 6


def test_stdin_list_and_globs(vae, real_weights, tree, tmp_path):
    paths = [tree / "cats" / "chelsea.png", tree / "misc" / "rocket.jpg"]
    out = tmp_path / "from-stdin"
    result = vae.runner.invoke(__import__("vaecli.cli").cli.app, ["encode", "-", "-o", str(out)],
                               input="\n".join(map(str, paths)) + "\n", catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.latent")) == ["cats/chelsea.latent",
                                                                              "misc/rocket.latent"]
    result = vae("encode", str(tree / "misc" / "*.png"), "-o", tmp_path / "globbed", "--json")
    assert {Path(r["input"]).name for r in map(json.loads, result.stdout.splitlines())} == {
        "brick.png", "logo.png", "truncated.png"}
    result = vae("encode", str(tmp_path / "nothing" / "*.png"), "-o", tmp_path / "g2")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: no files match {tmp_path / 'nothing' / '*.png'}"


def test_latent_pngs_beside_photos_are_not_taken_as_photos(vae, real_weights, small_image, tmp_path):
    """`vae encode . --format png` writes x.latent.png beside x.png: a rerun over the folder or a '*.png' glob sees the
    photos only (it used to fail on a collision, or roundtrip the latent mosaics); named outright, a file is taken."""
    work = tmp_path / "w"
    work.mkdir()
    for name in ("a.png", "b.png"):
        (work / name).write_bytes(small_image.read_bytes())
    assert vae("encode", work, "--format", "png", "-q").exit_code == 0
    assert sorted(p.name for p in work.iterdir()) == ["a.latent.png", "a.png", "b.latent.png", "b.png"]
    for args in ([work, "--format", "png", "--overwrite"], [str(work / "*.png"), "-o", tmp_path / "globbed"]):
        result = vae("encode", *args, "--json")
        assert result.exit_code == 0, result.stderr
        assert sorted(Path(r["input"]).name for r in map(json.loads, result.stdout.splitlines())) == ["a.png", "b.png"]
    result = vae("roundtrip", work, "--json")
    assert sorted(Path(r["input"]).name for r in map(json.loads, result.stdout.splitlines())) == ["a.png", "b.png"]
    result = vae("decode", work, "-o", tmp_path / "dec", "--json")  # decode takes the latent PNGs from a folder
    assert sorted(Path(r["input"]).name for r in map(json.loads, result.stdout.splitlines())) == [
        "a.latent.png", "b.latent.png"]
    result = vae("encode", str(work / "*.latent.png"), "-o", tmp_path / "x")
    assert (result.exit_code, result.stderr) == (2, f"Error: no input files match {work / '*.latent.png'} (2 "
                                                    f"matches: folders or latent PNGs)\n")
    (tmp_path / "list.txt").write_text("\n")
    result = vae("encode", tmp_path / "list.txt", "-o", tmp_path / "x")
    assert (result.exit_code, result.stderr) == (2, f"Error: {tmp_path / 'list.txt'}: the manifest lists no paths\n")
    (tmp_path / "list.txt").write_bytes(b"a.png\n\xff\xfe\n")
    result = vae("encode", tmp_path / "list.txt", "-o", tmp_path / "x")
    assert (result.exit_code, result.stderr) == (2, f"Error: {tmp_path / 'list.txt'}: expected a UTF-8 text manifest, "
                                                    f"found byte 0xff at offset 6\n")


def test_a_link_to_nothing_in_a_folder_is_a_failed_input(vae, real_weights, small_image, tmp_path):
    """A dangling symlink (a dataset's unfetched file) was left out of a folder or glob without a word, exit 0."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "a.png").write_bytes(small_image.read_bytes())
    (work / "b.png").symlink_to(tmp_path / "gone.png")
    for args in ([work], [str(work / "*.png")]):
        result = vae("encode", *args, "-o", tmp_path / "out", "--json", "-q")
        assert result.exit_code == 1
        assert {Path(r["input"]).name: r["status"] for r in map(json.loads, result.stdout.splitlines())} == {
            "a.png": "skipped" if args == [str(work / "*.png")] else "ok", "b.png": "error"}
        assert result.stderr.splitlines()[0] == f"Error: {work / 'b.png'}: no such file"


def test_a_link_loop_named_globbed_or_listed_is_a_failed_input(vae, real_weights, small_image, tmp_path):
    """A link to itself, named, globbed or in a manifest: Path.resolve raised RuntimeError while planning outputs, so
    the whole run failed ('unexpected RuntimeError: Symlink loop ...') and no other input was encoded."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "a.png").write_bytes(small_image.read_bytes())
    (work / "loop.png").symlink_to(work / "loop.png")
    (work / "list.txt").write_text("a.png\nloop.png\n")
    for i, args in enumerate(([work / "a.png", work / "loop.png"], [str(work / "*.png")], [work / "list.txt"])):
        result = vae("encode", *args, "-o", tmp_path / f"out{i}", "--json", "-q")
        assert result.exit_code == 1
        assert {Path(r["input"]).name: r["status"] for r in map(json.loads, result.stdout.splitlines())} == {
            "a.png": "ok", "loop.png": "error"}
        loop = work / "loop.png"
        assert result.stderr.splitlines()[0] == f"Error: {loop}: cannot read: Too many levels of symbolic links"
        assert (tmp_path / f"out{i}" / "a.latent").is_file()


def test_a_link_loop_in_a_walked_folder_fails_alone(vae, real_weights, small_image, tmp_path):
    """A link loop in a folder made the walk take the whole folder for one it may not list: 'w: is a folder, expected
    an image file', and none of its images was encoded."""
    work = tmp_path / "w"
    (work / "sub").mkdir(parents=True)
    (work / "a.png").write_bytes(small_image.read_bytes())
    (work / "sub" / "b.png").write_bytes(small_image.read_bytes())
    for folder in (work, work / "sub"):
        (folder / "loop.png").symlink_to(folder / "loop.png")
    result = vae("encode", work, "-r", "-o", tmp_path / "out", "--json", "-q")
    assert result.exit_code == 1
    assert sorted((r["input"], r["status"]) for r in map(json.loads, result.stdout.splitlines())) == [
        (str(work / "a.png"), "ok"), (str(work / "loop.png"), "error"), (str(work / "sub" / "b.png"), "ok"),
        (str(work / "sub" / "loop.png"), "error")]
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "a.latent", "sub", "sub/b.latent"]


def test_a_walk_leaves_out_hidden_files_and_folders(vae, real_weights, small_image, tmp_path):
    """Hidden files were left out of a walk, hidden folders walked: .cache/x.png, or the frames in the hidden temp
    folder a killed `decode --as-frames` leaves, were encoded. Neither is taken now, as `**` globs take neither."""
    work = tmp_path / "w"
    for rel in ("a.png", ".b.png", "sub/c.png", ".cache/d.png", "sub/.e.frames.part/f.png"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(small_image.read_bytes())
    result = vae("encode", work, "-r", "-o", tmp_path / "out", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert sorted(r["input"] for r in map(json.loads, result.stdout.splitlines())) == [
        str(work / "a.png"), str(work / "sub" / "c.png")]
    hidden = tmp_path / ".h"  # named itself, a hidden folder is walked
    (hidden / "g.png").parent.mkdir()
    (hidden / "g.png").write_bytes(small_image.read_bytes())
    assert vae("encode", hidden, "-o", tmp_path / "out2", "-q").exit_code == 0
    assert (tmp_path / "out2" / "g.latent").is_file()


def test_a_file_named_twice_is_one_input(vae, real_weights, small_image, tmp_path, monkeypatch):
    """The same file named twice (by name and by a glob, or twice in a list) was refused as two inputs: 'inputs a.png
    and a.png would both write out/a.latent', exit 2. It is one input, and a note says so."""
    work = tmp_path / "w"
    work.mkdir()
    a = work / "a.png"
    a.write_bytes(small_image.read_bytes())
    monkeypatch.chdir(work)
    result = vae("encode", "a.png", a, str(work / "*.png"), "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert [r["input"] for r in map(json.loads, result.stdout.splitlines())] == ["a.png"]
    assert result.stderr.splitlines()[0] == f"note: 2 inputs named again ({a}, {a}): each file is taken once"
    assert vae("encode", "a.png", "a.png", "-o", tmp_path / "out2", "-q").stderr == ""
    assert (tmp_path / "out2" / "a.latent").is_file()


def test_name_template_and_suffix(vae, real_weights, tree, tmp_path):
    result = vae("encode", tree / "top.png", tree / "misc" / "brick.png", "-o", tmp_path / "n",
                 "--name", "{stem}.{model}{ext}")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["brick.taef2.latent", "top.taef2.latent"]
    result = vae("encode", tree / "top.png", "-o", tmp_path / "s/", "--suffix", "_v1", "--format", "png")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "s" / "top_v1.latent.png").is_file()
    result = vae("encode", tree / "top.png", "-o", tmp_path / "b/", "--name", "{nope}")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: --name {nope}: use only {stem}, {ext}, {model} and {suffix}"


def test_name_template_stays_inside_the_output_folder(vae, real_weights, tree, tmp_path):
    result = vae("encode", tree / "top.png", "-o", tmp_path / "m/", "--name", "{model}/{stem}{ext}")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "m" / "taef2" / "top.latent").is_file()
    absolute = f"{tmp_path}/{{stem}}{{ext}}"
    for template, out in [("../{stem}{ext}", "../top.latent"), (absolute, f"{tmp_path}/top.latent"),
                          ("{suffix}", ""), ("{stem}/", "top/")]:
        for where in (["-o", tmp_path / "o/"], []):  # into a folder, and beside the input
            result = vae("encode", tree / "top.png", *where, "--name", template)
            assert result.exit_code == 2
            assert result.stderr.strip() == f"Error: --name {template}: expected a file name inside the output " \
                                            f"folder, got {out!r}"
    assert not (tmp_path / "top.latent").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, given, option", [
    (["encode", "top.png", "-o", "x.latent"], ["--name", "{stem}.v1{ext}"], "--name"),
    (["encode", "top.png", "-o", "x.latent"], ["--suffix", "_v1"], "--suffix"),
    (["roundtrip", "top.png", "-o", "x.png"], ["--suffix", "_v1"], "--suffix"),
    (["decode", "top.latent", "-o", "x.png"], ["--ext", "jpg"], "--ext"),
    (["decode", "top.latent", "-o", "x.png"], ["--suffix", "_v1"], "--suffix")])
def test_naming_options_with_an_output_file_are_refused(vae, real_weights, tree, tmp_path, monkeypatch,
                                                        command, given, option):
    """-o FILE names the one output: --name, --suffix and --ext did nothing there, without a word."""
    monkeypatch.chdir(tree)
    assert vae("encode", "top.png", "-o", "top.latent").exit_code == 0
    result = vae(*command, *given)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: {option} only applies to outputs vaecli names; -o {command[-1]} names " \
                                    f"the output itself (drop {option}, or give a folder: -o x/)"
    assert not (tree / command[-1]).exists()


def test_fail_fast_stops_at_first_failure(vae, real_weights, tree, tmp_path):
    (tree / "aaa_broken.png").write_text("broken")
    result = vae("encode", tree, "-r", "-o", tmp_path / "ff", "--fail-fast", "--batch-size", "1", "--json")
    assert result.exit_code == 1
    records = list(map(json.loads, result.stdout.splitlines()))
    statuses = [r["status"] for r in records]
    assert statuses[0] == "error" and statuses.count("ok") < 2
    # every input has its record: those the stop left undone are 'cancelled', and the summary counts them
    inputs = {str(p) for p in tree.rglob("*") if p.suffix in (".png", ".jpg")}
    assert len(records) == len(inputs) == 9 and {r["input"] for r in records} == inputs
    cancelled = statuses.count("cancelled")
    assert cancelled >= 6 and all(r == {"input": r["input"], "output": None, "status": "cancelled", "error": None}
                                  for r in records if r["status"] == "cancelled")
    assert f"done: {statuses.count('ok')} ok, 0 skipped, 1 failed, {cancelled} not run (--fail-fast)" in result.stderr


def test_batched_equals_one_by_one(vae, real_weights, tmp_path, shared_images):
    src = tmp_path / "same"
    src.mkdir()
    for i in range(5):
        Image.open(shared_images / "coffee.png").crop((i * 40, 50, i * 40 + 64, 98)).save(src / f"c{i}.png")
    assert vae("encode", src, "-o", tmp_path / "b8", "--batch-size", "8").exit_code == 0
    assert vae("encode", src, "-o", tmp_path / "b1", "--batch-size", "1").exit_code == 0
    for i in range(5):
        a, _ = load_latent(tmp_path / "b8" / f"c{i}.latent")
        b, _ = load_latent(tmp_path / "b1" / f"c{i}.latent")
        assert torch.allclose(a, b, atol=1e-5)


def test_decode_and_roundtrip_take_folders(vae, real_weights, tree, tmp_path):
    vae("encode", tree, "-r", "-o", tmp_path / "lat")
    result = vae("decode", tmp_path / "lat", "-r", "-o", tmp_path / "dec", "--ext", "jpg")
    assert result.exit_code == 0, result.stderr
    assert sorted(str(p.relative_to(tmp_path / "dec")) for p in (tmp_path / "dec").rglob("*.jpg")) == [
        "cats/chelsea.jpg", "cats/close/chelsea2.jpg", "misc/brick.jpg", "misc/logo.jpg", "misc/rocket.jpg",
        "top.jpg"]
    result = vae("roundtrip", tree / "misc", "--json")
    assert result.exit_code == 1
    assert {Path(r["input"]).name: r["status"] for r in map(json.loads, result.stdout.splitlines())} == {
        "brick.png": "ok", "logo.png": "ok", "rocket.jpg": "ok", "truncated.png": "error"}


def test_sigint_leaves_only_complete_files_and_rerun_finishes(real_weights, tmp_path, shared_images):
    src = tmp_path / "many"
    src.mkdir()
    base = Image.open(shared_images / "astronaut.png")
    for i in range(40):
        base.crop((i * 8, i * 4, i * 8 + 192, i * 4 + 192)).save(src / f"img{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vaecli", "encode", str(src), "-o", str(out), "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy(),
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.latent"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert "Interrupted: finished outputs are complete; rerun to do the rest" in err.decode()
    done = sorted(out.glob("*.latent"))
    assert 3 <= len(done) < 40
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    for p in done:
        latent, meta = load_latent(p)
        assert list(latent.shape) == [32, 24, 24]
    rerun = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=os.environ.copy())
    assert rerun.returncode == 0, rerun.stderr
    statuses = [json.loads(line)["status"] for line in rerun.stdout.splitlines()]
    assert statuses.count("skipped") == len(done) and statuses.count("ok") == 40 - len(done)
    assert len(list(out.glob("*.latent"))) == 40


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_an_interrupt_before_the_batch_says_so(real_weights, small_image, tmp_path, monkeypatch, capsys, how):
    """Typer turned a Ctrl-C while the model loaded into a silent exit 130: no line, no --json record; SIGTERM there
    was a plain kill (exit 143)."""
    from vaecli import cli, codec

    def interrupted(*args, **kwargs):
        if how == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at once
        raise KeyboardInterrupt

    monkeypatch.setattr(codec, "load_codec", interrupted)
    monkeypatch.setattr(sys, "argv", ["vae", "encode", str(small_image), "-o", str(tmp_path / "x.latent"), "--json"])
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    out, err = capsys.readouterr()
    assert (exit_.value.code, err) == (130, "Interrupted\n")
    assert [json.loads(line) for line in out.splitlines()] == [
        {"input": None, "output": None, "status": "error", "error": "interrupted"}]
    assert not list(tmp_path.glob("*.latent")) and not list(tmp_path.glob(".*"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # pytest's own again


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_an_interrupt_while_the_command_line_loads_says_so(small_image, tmp_path, how):
    """A shell loop's Ctrl-C often lands while `vae` still imports: that printed a traceback (exit -2)."""
    code = (f"import os, signal, sys\nfrom vaecli import console\nheld = console.hold()\n"
            f"os.kill(os.getpid(), signal.{how})  # pending until the command line has loaded\n"
            f"sys.argv = ['vae', 'encode', sys.argv[1], '-o', sys.argv[2], '--json']\n"
            f"from vaecli.cli import run\nrun(held)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(small_image), str(tmp_path / "x.latent")],
                          capture_output=True, text=True, preexec_fn=default_sigint)
    assert (proc.returncode, proc.stderr) == (130, "Interrupted\n")
    assert json.loads(proc.stdout) == {"input": None, "output": None, "status": "error", "error": "interrupted"}
    assert [p.name for p in tmp_path.iterdir()] == [small_image.name]


def test_an_interrupt_while_torch_loads_lands_after_the_import(tmp_path, monkeypatch):
    """Inside torch's C++ start-up a KeyboardInterrupt aborted the process ('terminate called ...') or left torch
    half-imported: its import runs whole, and the interrupt is raised once it is done."""
    from vaecli import console

    finished = tmp_path / "finished"
    # To the main thread: this test process has other threads, which would take a signal sent to the process (the
    # `vae` process has none when torch loads).
    (tmp_path / "slow_ext.py").write_text(
        f"import signal, threading\nsignal.pthread_kill(threading.main_thread().ident, signal.SIGINT)\n"
        f"open({str(finished)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finders = list(sys.meta_path)
    console.hold_whole_imports(("slow_ext",))
    # Python's own handler, as a `vae` started from a terminal has: run as a background job (a CI script's `&`),
    # this test process inherits SIGINT ignored.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            import slow_ext  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, handler)
    assert finished.exists()  # the module's code ran to its end before the interrupt
    assert sys.meta_path == finders and signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_sigterm_is_handled_like_sigint(real_weights, tmp_path, shared_images):
    src = tmp_path / "many"
    src.mkdir()
    base = Image.open(shared_images / "astronaut.png")
    for i in range(30):
        base.crop((i * 8, 0, i * 8 + 160, 160)).save(src / f"img{i:02d}.png")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vaecli", "encode", str(src), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.latent")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    for p in out.glob("*.latent"):
        assert list(load_latent(p)[0].shape) == [32, 20, 20]


def test_json_into_a_closed_pipe_stops_the_run(real_weights, tmp_path, shared_images):
    """`vae encode photos/ --json | head -1`: the write of a record to the closed pipe raised BrokenPipeError in the
    writer thread, which died with a traceback, and the run waited on it for ever. Now it stops as an interrupted run
    does (every output present complete) with one Error line, exit 1; under `2>&1` too, silently."""
    src = tmp_path / "many"
    src.mkdir()
    base = Image.open(shared_images / "astronaut.png")
    for i in range(12):
        base.crop((i * 8, 0, i * 8 + 64, 64)).save(src / f"img{i:02d}.png")
    for both in (False, True):
        out = tmp_path / f"out{both}"
        proc = subprocess.Popen([sys.executable, "-m", "vaecli", "encode", str(src), "-o", str(out), "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT if both else subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before the first record
        try:
            stderr = b"" if both else proc.stderr.read()
            proc.wait(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 1
        assert stderr.decode().splitlines()[-1:] == ([] if both else [
            "Error: output closed (broken pipe): stopped; finished outputs are complete, rerun to do the rest"])
        assert "Traceback" not in stderr.decode()
        assert len(list(out.iterdir())) >= 1
        for p in out.iterdir():
            assert list(load_latent(p)[0].shape) == [32, 8, 8]


def test_progress_bar_on_a_terminal(real_weights, tree, tmp_path):
    """With stderr a terminal, a rich progress bar (count, files/s, ETA) replaces the per-file lines."""
    import pty

    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vaecli", "encode", str(tree / "misc"), "-o", str(tmp_path / "p")],
                            stdout=subprocess.PIPE, stderr=child, env={**os.environ, "COLUMNS": "100"})
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(main)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 1  # truncated.png
    assert "/4" in text and "━" in text  # the bar and its "n/4" count were drawn
    assert "done: 3 ok, 0 skipped, 1 failed" in text
    assert f"{tree / 'misc' / 'brick.png'} -> " not in text  # no per-file lines under a progress bar


def test_quiet_prints_errors_only(vae, real_weights, tree, tmp_path):
    result = vae("encode", tree / "misc", "-o", tmp_path / "q", "--quiet")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"Error: {tree / 'misc' / 'truncated.png'}: truncated PNG: its pixel data holds")
    assert lines[1:] == ["1 of 4 inputs failed:", lines[0].replace("Error: ", "  ", 1)]
    ok = vae("encode", tree / "top.png", "-o", tmp_path / "q1.latent", "--quiet")
    assert ok.exit_code == 0 and ok.stderr == ""


def test_latent_bytes_do_not_depend_on_batch_mates(vae, real_weights, tmp_path, shared_images):
    """Same-sized images in one run give the same file bytes as each encoded alone (CPU: one image per pass)."""
    src = tmp_path / "same"
    src.mkdir()
    for i, name in enumerate(["astronaut.png", "chelsea.png", "coffee.png"]):
        Image.open(shared_images / name).convert("RGB").crop((0, 0, 96, 64)).save(src / f"{i}.png")
    assert vae("encode", src, "-o", tmp_path / "together", "--batch-size", "3").exit_code == 0
    for path in sorted(src.iterdir()):
        alone = tmp_path / "alone" / (path.stem + ".latent")
        assert vae("encode", path, "-o", alone).exit_code == 0
        assert alone.read_bytes() == (tmp_path / "together" / alone.name).read_bytes()


def test_interrupt_joins_the_reader_thread(tmp_path):
    # A reader thread still inside PIL or torch while the interpreter exits aborts the process (SIGABRT, not 130).
    import threading

    from vaecli import batch

    jobs = [batch.Job(src=tmp_path / f"{i}.png", dst=None) for i in range(12)]

    def read(job):
        time.sleep(0.2)
        return job.src

    def compute(group):
        raise KeyboardInterrupt

    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        batch.run(jobs, read=read, compute=compute, write=lambda job: None, on_done=lambda job: None)
    assert set(threading.enumerate()) == before


def test_output_folder_spellings(vae, real_weights, small_image, shared, tmp_path, monkeypatch):
    """A trailing slash makes -o a folder whatever its name (a Path drops it: -o x.latent/ wrote a file); a glob
    of several images into a dotted folder name is a folder, as the same files named one by one are."""
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(small_image.read_bytes())
    for cmd, out, expect in (("encode", "lat.latent/", "lat.latent/a.latent"), ("encode", "lat.v1/", "lat.v1/a.latent"),
                             ("roundtrip", "rec.d/", "rec.d/a.png")):
        result = vae(cmd, "a.png", "-o", out)
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / expect).is_file()
    assert vae("decode", "lat.v1/a.latent", "-o", "prev.v2/").exit_code == 0
    assert (tmp_path / "prev.v2" / "a.png").is_file()
    result = vae("encode", "*.png", "-o", "out.v1", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out.v1").iterdir()) == ["a.latent", "b.latent"]
    result = vae("encode", "a.png", "b.png", "-o", "two.latent/")  # several inputs: the slash still says folder
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "two.latent").iterdir()) == ["a.latent", "b.latent"]
    gif = shared / "video" / "no_time_for_that_tiny.gif"
    assert vae("video", gif, "--frames", 2, "-o", "clips/").exit_code == 0
    assert (tmp_path / "clips" / "no_time_for_that_tiny.latent").is_file()
    result = vae("video", gif, "--frames", 2, "-o", "v.latent", "--roundtrip", "--recon", "r.mp4/")
    assert (result.exit_code, result.stderr) == (2, "Error: --recon r.mp4/: expected a video file, not a folder\n")
    result = vae("compare", "a.png", "-m", "taef2", "-o", "sheet.png/")
    assert (result.exit_code, result.stderr) == (2, "Error: -o sheet.png/: expected the contact sheet's file name, "
                                                    "not a folder\n")
    assert not (tmp_path / "sheet.png").exists() and not (tmp_path / "r.mp4").exists()


def test_an_output_name_too_long_is_one_line_for_every_command(vae, real_weights, small_image, shared, tmp_path):
    long = tmp_path / ("y" * 300)
    gif = shared / "video" / "no_time_for_that_tiny.gif"
    assert vae("encode", small_image, "-o", tmp_path / "s.latent").exit_code == 0
    for args, out in ((["encode", small_image], f"{long}.latent"), (["roundtrip", small_image], f"{long}.png"),
                      (["decode", tmp_path / "s.latent"], f"{long}.png"),
                      (["video", gif, "--frames", 2], f"{long}.latent")):
        result = vae(*args, "-o", out, "--json")
        assert result.exit_code == 1
        assert result.stderr == f"Error: {out}: cannot write: File name too long\n"
        assert json.loads(result.stdout)["error"] == f"{out}: cannot write: File name too long"
    for out in (f"{long}.latent", f"{long}/"):  # several inputs; a folder
        result = vae("encode", small_image, tmp_path / "s.latent", "-o", out)
        assert result.stderr == f"Error: {out.rstrip('/')}: cannot write: File name too long\n"
    # ComfyUI output: its intermediate file's name is cut to fit as temp names are
    near = tmp_path / ("c" * 245 + ".latent")
    result = vae("video", gif, "--frames", 2, "--format", "comfyui", "-o", near)
    assert result.exit_code == 0, result.stderr
    assert near.is_file()


def test_a_rerun_into_an_output_folder_inside_the_inputs_resumes(vae, real_weights, small_image, tmp_path):
    """The walk leaves out an -o folder inside the walked folder: a rerun's earlier outputs are not inputs (they
    were, and the rerun failed 'refusing to overwrite input imgs/a.png', naming the wrong file)."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a.png", "b.png"):
        (imgs / name).write_bytes(small_image.read_bytes())
    recon = imgs / "recon"
    assert vae("roundtrip", imgs, "-r", "-o", recon).exit_code == 0
    result = vae("roundtrip", imgs, "-r", "-o", recon, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == (f"note: 2 files in the output folder {recon} left out of the inputs "
                                             f"(name them to include them)")
    assert [(r["input"], r["status"]) for r in map(json.loads, result.stdout.splitlines())] == [
        (str(imgs / "a.png"), "skipped"), (str(imgs / "b.png"), "skipped")]
    # named outright, an earlier output is an input, and the message names it and whose output it would be
    result = vae("roundtrip", imgs / "a.png", recon / "a.png", "-o", recon)
    assert result.exit_code == 1
    assert result.stderr == (f"Error: refusing to overwrite input {recon / 'a.png'} (the output of "
                             f"{imgs / 'a.png'}) (choose another -o)\n")


def test_manifests_and_stdin_lists_with_a_byte_order_mark(vae, real_weights, small_image, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + small_image.name.encode() + b"\r\n")
    result = vae("roundtrip", listing, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["input"] == str(small_image)
    result = vae("roundtrip", "-", "--json", input=f"\ufeff{small_image}\n")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["input"] == str(small_image)
