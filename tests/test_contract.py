"""The whole-command contract: any input failing at any stage (read, compute, metrics, write) is one error line and
one JSON record, the batch goes on, the exit code is 1, nothing half-written is left; `-q` is silent on success."""

from __future__ import annotations

import errno
import json
import os
import pathlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from tests.conftest import deny_listing_of, deny_reads_of, deny_search_of
from vaecli.latents import load_latent, save_safetensors
from vaecli.registry import REGISTRY

HINT = "(rerun with --debug for the traceback)"


def _records(result) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}


def _error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


def _no_partials(root: Path) -> None:
    assert [p for p in root.rglob("*") if ".part" in p.name] == []


@pytest.fixture
def photos(tmp_path, small_image) -> Path:
    """photos/a.png and photos/sub/b.png (different sizes)."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.open(small_image).save(root / "a.png")
    Image.open(small_image).crop((0, 0, 40, 32)).save(root / "sub" / "b.png")
    return root


@pytest.fixture
def latents_dir(vae, real_weights, photos, tmp_path) -> Path:
    out = tmp_path / "latents"
    assert vae("encode", photos, "-r", "-o", out, "-q").exit_code == 0
    return out


def _command(cmd: str, photos: Path, latents_dir: Path | None) -> tuple[list, str]:
    """(argument list up to the output option, output extension) for `cmd` over the folder fixtures."""
    if cmd == "decode":
        return ["decode", latents_dir, "-r"], ".png"
    return [cmd, photos, "-r"], ".latent" if cmd == "encode" else ".png"


# --- the output cannot be written -------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["encode", "roundtrip", "decode", "video", "video --format comfyui"])
def test_output_parent_is_a_file_single_input(vae, real_weights, small_image, shared, tmp_path, cmd):
    cmd, *extra = cmd.split()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    src = small_image
    if cmd == "decode":
        src = tmp_path / "s.latent"
        assert vae("encode", small_image, "-o", src).exit_code == 0
    elif cmd == "video":
        src = shared / "video" / "no_time_for_that_tiny.gif"
    out = blocker / ("x.latent" if cmd in ("encode", "video") else "x.png")
    args = [cmd, src, "-o", out, "--json", *extra] + (["--frames", 2] if cmd == "video" else [])
    result = vae(*args)
    assert result.exit_code == 1
    assert _error_lines(result) == [f"Error: {src}: {out}: cannot write: {blocker} is a file, not a folder"]
    record = json.loads(result.stdout)
    # the four fields of every error record, not the results of the compute that preceded the failed write
    assert record == {"input": str(src), "output": None, "status": "error",
                      "error": f"{out}: cannot write: {blocker} is a file, not a folder"}
    assert blocker.read_text() == "a file, not a folder"
    _no_partials(tmp_path)


@pytest.mark.parametrize("cmd", ["encode", "roundtrip", "decode"])
def test_output_parent_is_a_file_in_a_folder_batch(vae, real_weights, photos, latents_dir, tmp_path, cmd):
    args, ext = _command(cmd, photos, latents_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("blocks the mirrored subfolder")
    result = vae(*args, "-o", out, "--json")
    assert result.exit_code == 1
    records = _records(result)
    a, b = sorted(records)  # a.*, b.*
    assert records[a]["status"] == "ok" and (out / f"a{ext}").is_file()
    assert records[b]["status"] == "error"
    assert records[b]["error"] == f"{out / 'sub' / ('b' + ext)}: cannot write: {out / 'sub'} is a file, not a folder"
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].endswith("is a file, not a folder")
    assert result.stderr.strip().splitlines()[-3] == "done: 1 ok, 0 skipped, 1 failed"
    _no_partials(tmp_path)


def _deny_writes_in(folder: Path, monkeypatch) -> None:
    """Make `folder` unwritable: chmod for an ordinary user; as root (who ignores modes) refuse the temp file."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    import vaecli.files

    real = vaecli.files.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(vaecli.files.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("cmd", ["encode", "roundtrip", "decode"])
def test_read_only_output_folder(vae, real_weights, photos, latents_dir, tmp_path, monkeypatch, cmd):
    args, ext = _command(cmd, photos, latents_dir)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    _deny_writes_in(out / "sub", monkeypatch)
    result = vae(*args, "-o", out, "--json")
    (out / "sub").chmod(0o755)
    assert result.exit_code == 1
    records = _records(result)
    assert [r["status"] for _, r in sorted(records.items())] == ["ok", "error"]
    assert records[f"b{'.latent' if cmd == 'decode' else '.png'}"]["error"] == \
        f"{out / 'sub' / ('b' + ext)}: cannot write: permission denied"
    assert list((out / "sub").iterdir()) == []


@pytest.mark.parametrize("cmd", ["encode", "decode"])
def test_an_unreadable_input_says_so(vae, real_weights, photos, latents_dir, tmp_path, monkeypatch, cmd):
    """An input the user may not read: 'permission denied', not a corrupt image or an unexpected PermissionError."""
    args, _ = _command(cmd, photos, latents_dir)
    src = (latents_dir if cmd == "decode" else photos) / "sub" / ("b.latent" if cmd == "decode" else "b.png")
    deny_reads_of(src, monkeypatch)
    result = vae(*args, "-o", tmp_path / "out", "--json")
    src.chmod(0o644)
    assert result.exit_code == 1
    assert _error_lines(result) == [f"Error: {src}: cannot read: permission denied"]
    records = _records(result)
    assert [r["status"] for _, r in sorted(records.items())] == ["ok", "error"]
    assert records[src.name]["error"] == f"{src}: cannot read: permission denied"


@pytest.mark.parametrize("cmd", ["encode", "decode", "info"])
def test_a_subfolder_the_walk_cannot_list_fails(vae, real_weights, photos, latents_dir, tmp_path, monkeypatch, cmd):
    """A folder the user may not list is an input that fails ('permission denied'), not files silently left out;
    named outright it fails the same way."""
    root = latents_dir if cmd != "encode" else photos
    locked = root / "locked"
    locked.mkdir()
    deny_listing_of(locked, monkeypatch)
    output = [] if cmd == "info" else ["-o", tmp_path / "out"]
    result = vae(cmd, root, "-r", *output, "--json")
    named = vae(cmd, locked, *output, "--json")
    locked.chmod(0o755)
    for res, n_ok in [(result, 2), (named, 0)]:
        assert res.exit_code == 1
        assert _error_lines(res) == [f"Error: {locked}: cannot read: permission denied"]
        records = list(map(json.loads, res.stdout.splitlines()))
        assert sorted((r["input"], r["status"]) for r in records if r["status"] == "error") == [(str(locked), "error")]
        assert [r["status"] for r in records].count("ok") == n_ok
    assert not (tmp_path / "out" / "locked.png").exists() and not (tmp_path / "out" / "locked.latent").exists()


@pytest.mark.parametrize("cmd", ["encode", "decode", "roundtrip"])
def test_an_input_in_a_folder_that_may_not_be_searched_fails_alone(vae, real_weights, photos, latents_dir, tmp_path,
                                                                   monkeypatch, cmd):
    """A named input inside a folder without search permission: Path.is_dir() raised PermissionError while the inputs
    were expanded, so the whole run failed ('unexpected PermissionError: [Errno 13] ...', exit 1). It fails alone."""
    args, ext = _command(cmd, photos, latents_dir)
    other = args[1] / ("a.latent" if cmd == "decode" else "a.png")
    closed = tmp_path / "closed"
    closed.mkdir()
    hidden = closed / f"x{other.suffix}"
    hidden.write_bytes(other.read_bytes())
    deny_search_of(closed, monkeypatch)
    result = vae(cmd, hidden, other, "-o", tmp_path / "out", "--json")
    closed.chmod(0o755)
    assert result.exit_code == 1
    assert _error_lines(result) == [f"Error: {hidden}: cannot read: permission denied"]
    assert sorted((r["input"], r["status"]) for r in map(json.loads, result.stdout.splitlines())) == [
        (str(hidden), "error"), (str(other), "ok")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"a{ext}"]


@pytest.mark.parametrize("cmd", ["encode", "decode", "roundtrip"])
def test_an_unlistable_folder_beside_a_file_of_its_name(vae, real_weights, photos, latents_dir, tmp_path, monkeypatch,
                                                        cmd):
    """photos/a/ (unlistable) beside photos/a.png: the folder's planned output, out/a.latent, is the file's, so the run
    was refused up front ('inputs photos/a and photos/a.png would both write ...', exit 2), though the folder writes
    nothing; and on a rerun the folder was 'skipped' (that output exists), exit 0. It fails, the file is done."""
    args, ext = _command(cmd, photos, latents_dir)
    root = args[1]
    locked = root / "a"
    locked.mkdir()
    deny_listing_of(locked, monkeypatch)
    out = tmp_path / "out"
    for run in range(2):
        result = vae(*args, "-o", out, "--json")
        assert result.exit_code == 1
        assert _error_lines(result) == [f"Error: {locked}: cannot read: permission denied"]
        statuses = {r["input"]: r["status"] for r in map(json.loads, result.stdout.splitlines())}
        assert statuses[str(locked)] == "error"
        assert statuses[str(root / f"a{'.latent' if cmd == 'decode' else '.png'}")] == ("ok", "skipped")[run]
        assert (out / f"a{ext}").is_file()


@pytest.mark.parametrize("cmd", ["encode", "roundtrip", "decode"])
def test_a_folder_where_an_output_file_goes_is_no_output_to_skip(vae, real_weights, photos, latents_dir, tmp_path,
                                                                 cmd):
    """A rerun into an -o folder skips outputs that exist: a folder in an output file's place was taken for one,
    'skipped (exists)', exit 0, with no output written. It is that input's write error; the others are written."""
    args, ext = _command(cmd, photos, latents_dir)
    out = tmp_path / "out"
    (out / f"a{ext}").mkdir(parents=True)
    result = vae(*args, "-o", out, "--json")
    assert result.exit_code == 1
    src = photos / "a.png" if cmd != "decode" else latents_dir / "a.latent"
    message = f"{out / f'a{ext}'}: is a folder, expected an output file path"
    assert _error_lines(result) == [f"Error: {src}: {message}"]
    records = _records(result)
    assert records[src.name]["error"] == message
    assert records[f"b{src.suffix}"]["status"] == "ok" and (out / "sub" / f"b{ext}").is_file()
    assert (out / f"a{ext}").is_dir() and not any((out / f"a{ext}").iterdir())


@pytest.mark.parametrize("cmd", ["encode", "roundtrip"])
def test_disk_full_while_writing(vae, real_weights, photos, tmp_path, monkeypatch, cmd):
    """ENOSPC half-way through a file: that input fails, the partial temp file is removed, the others are written."""
    out = tmp_path / "out"
    full = out / "sub"

    def half_then_enospc(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    if cmd == "encode":
        real = pathlib.Path.write_bytes
        monkeypatch.setattr(pathlib.Path, "write_bytes", lambda self, data: half_then_enospc(self, data)
                            if self.parent == full else real(self, data))
    else:
        from vaecli import media

        real = media.save_pillow

        def save(img, path, **params):
            if Path(path).parent == full:
                return half_then_enospc(Path(path), img.tobytes())
            return real(img, path, **params)

        monkeypatch.setattr(media, "save_pillow", save)
    ext = ".latent" if cmd == "encode" else ".png"
    result = vae(cmd, photos, "-r", "-o", out, "--json")
    assert result.exit_code == 1
    records = _records(result)
    assert records["a.png"]["status"] == "ok"
    assert records["b.png"]["error"] == f"{full / ('b' + ext)}: cannot write: no space left on the device"
    assert list(full.iterdir()) == []


def test_an_output_name_too_long_for_the_file_system_is_a_write_error(vae, real_weights, small_image, tmp_path):
    """A 248-character stem plus a suffix passes the 255-byte name limit: the write error, not `unexpected OSError`."""
    photo = tmp_path / f"{'x' * 248}.png"
    photo.write_bytes(small_image.read_bytes())
    result = vae("encode", photo, "--suffix", "_taef2")
    assert result.exit_code == 1
    out = tmp_path / f"{'x' * 248}_taef2.latent"
    assert _error_lines(result) == [f"Error: {photo}: {out}: cannot write: File name too long"]
    for args in (["encode", photo, "--suffix", "_taef2", "--skip-existing"],  # the existence check sees it first
                 ["roundtrip", photo, "-o", tmp_path / "rt", "--suffix", "_taef2", "--skip-existing"]):
        result = vae(*args)
        assert result.exit_code == 1
        assert _error_lines(result) == [f"Error: {photo}: {args[-4] if args[0] == 'roundtrip' else tmp_path}/"
                                        f"{'x' * 248}_taef2{'.png' if args[0] == 'roundtrip' else '.latent'}: "
                                        f"cannot write: File name too long"]
    latent = tmp_path / f"{'x' * 240}.latent"  # 247 bytes: legal, but its own temp name would not be
    assert vae("encode", small_image, "-o", tmp_path / "short.latent", "-q").exit_code == 0
    (tmp_path / "short.latent").rename(latent)
    decoded = tmp_path / f"{'x' * 240}_decoded_by_taef2.png"  # 261 bytes
    for extra in ([], ["--skip-existing"]):  # decode beside its latent checks whether the output exists
        result = vae("decode", latent, "--suffix", "_decoded_by_taef2", *extra)
        assert result.exit_code == 1
        assert _error_lines(result) == [f"Error: {latent}: {decoded}: cannot write: File name too long"]


def _file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored), as a full disk cuts a write short."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("ext", [".jpg", ".tiff", ".gif", ".png", ".webp", ".bmp"])
def test_a_write_cut_short_fails_the_input(real_weights, shared_images, clip_latent, tmp_path, ext):
    """The OS writes only part of a file (disk full, size limit): the command fails, nothing is left. Pillow's JPEG,
    TIFF and GIF encoders, given a descriptor, ignored a short write and the cut file was reported as written."""
    import subprocess
    import sys

    photo = tmp_path / "photo.png"
    Image.open(shared_images / "chelsea.png").convert("RGB").crop((0, 0, 256, 192)).save(photo)
    out = tmp_path / "out" / f"recon{ext}"
    out.parent.mkdir()
    args = ["decode", clip_latent] if ext == ".gif" else ["roundtrip", photo]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc cut short either
    limit = 1024 if ext == ".gif" else 4096  # the 2-frame GIF is 2.4 kB, the others 10 to 150 kB
    proc = subprocess.run([sys.executable, "-m", "vaecli", *map(str, args), "-o", str(out), "-q"], env=env,
                          capture_output=True, text=True, preexec_fn=_file_size_limit(limit), timeout=120)
    assert (proc.returncode, proc.stderr) == (1, f"Error: {args[1]}: {out}: cannot write: File too large\n")
    assert list(out.parent.iterdir()) == []


def test_a_gif_the_disk_refuses_from_the_start_leaves_nothing(vae, real_weights, gif, tmp_path):
    """Not a byte can be written: the GIF's buffered frames (past the 8 kB buffer: 12 frames) fail again when its temp
    file is dropped, which must neither turn the error line into 'unexpected OSError' nor leave the temp file."""
    import subprocess
    import sys

    clip_latent = tmp_path / "clip.latent"
    assert vae("video", gif, "-o", clip_latent, "--frames", 12).exit_code == 0
    out = tmp_path / "out" / "recon.gif"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "vaecli", "decode", str(clip_latent), "-o", str(out), "-q"], env=env,
                          capture_output=True, text=True, preexec_fn=_file_size_limit(0), timeout=120)
    assert (proc.returncode, proc.stderr) == (1, f"Error: {clip_latent}: {out}: cannot write: File too large\n")
    assert list(out.parent.iterdir()) == []


def test_frames_the_disk_refuses_name_the_output_folder(clip_latent, tmp_path):
    """--as-frames on a full disk: the error names the frames folder asked for, not a hidden temp file inside the
    temp folder (gone with it)."""
    import subprocess
    import sys

    out = tmp_path / "out" / "frames"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "vaecli", "decode", str(clip_latent), "-o", str(out), "--as-frames",
                           "-q"], env=env, capture_output=True, text=True, preexec_fn=_file_size_limit(0), timeout=120)
    assert (proc.returncode, proc.stderr) == (1, f"Error: {clip_latent}: {out / 'clip'}: cannot write: File too "
                                                 f"large\n")
    assert list(out.iterdir()) == []


# --- hostile or damaged latents -----------------------------------------------------------------------------

def _png_latent_with_text(vae, small_image, path: Path, text) -> Path:
    assert vae("encode", small_image, "-o", path).exit_code == 0
    with Image.open(path) as img:
        img.load()
        info = PngImagePlugin.PngInfo()
        info.add_text("vaecli", text if isinstance(text, str) else json.dumps(text))
        img.save(path, pnginfo=info)
    return path


def _meta_of(vae, small_image, tmp_path) -> dict:
    assert vae("encode", small_image, "-o", tmp_path / "ref.latent.png").exit_code == 0
    with Image.open(tmp_path / "ref.latent.png") as img:
        return json.loads(img.info["vaecli"])


def test_malformed_png_latent_metadata(vae, real_weights, small_image, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = json.loads(json.dumps(_meta_of(vae, small_image, tmp_path)))
    cases = {
        "json.latent.png": ("{not json", "unreadable vaecli metadata (expected a JSON object)"),
        "grid.latent.png": ({**good, "grid": "2x4"}, "metadata 'grid' must be [rows, columns] of positive integers"),
        "shape.latent.png": ({**good, "latent_shape": [32, -1]},
                             "metadata 'latent_shape' must be [C, h, w] of positive integers"),
        "size.latent.png": ({**good, "image_size": ["a", 3]},
                            "metadata 'image_size' must be [W, H] of positive integers, got \"['a', 3]\""),
    }
    for name, (text, _) in cases.items():
        _png_latent_with_text(vae, small_image, folder / name, text)
    assert vae("encode", small_image, "-o", folder / "fine.latent.png").exit_code == 0
    single = folder / "json.latent.png"
    result = vae("decode", single, "-o", tmp_path / "single.png")
    assert result.exit_code == 1
    assert _error_lines(result) == [f"Error: {single}: unreadable vaecli metadata (expected a JSON object)"]
    result = vae("decode", folder, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    records = _records(result)
    assert records.pop("fine.latent.png")["status"] == "ok"
    assert {n: r["error"] for n, r in records.items()} == {n: f"{folder / n}: {msg}" for n, (_, msg) in cases.items()}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fine.png"]


@pytest.mark.parametrize("version, shown", [("abc", "'abc'"), (1.5, "'1.5'"), (True, "'True'")])
def test_non_integer_format_version(vae, real_weights, small_image, tmp_path, version, shown):
    good = tmp_path / "in" / "good.latent"
    assert vae("encode", small_image, "-o", good).exit_code == 0
    latent, meta = load_latent(good)
    bad = tmp_path / "in" / "bad.latent"
    save_safetensors(bad, latent, {**meta, "version": version})
    message = f"{bad}: expected an integer latent format version, got {shown}"
    result = vae("decode", bad, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert _error_lines(result) == [f"Error: {message}"]
    result = vae("decode", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    records = _records(result)
    assert (records["good.latent"]["status"], records["bad.latent"]["error"]) == ("ok", message)


# --- unexpected exceptions at each stage ----------------------------------------------------------------------

def _raise_for_sub(real, exc):
    """Wrap `real(self, x, ...)` so that it raises `exc` when the (B, C, H, W) tensor is b.png's (32 rows)."""
    def wrapped(self, x, *args, **kwargs):
        if x.shape[-2] in (32, 4):  # b.png's pixels, or its latent
            raise exc
        return real(self, x, *args, **kwargs)
    return wrapped


@pytest.mark.parametrize("cmd", ["encode", "roundtrip", "decode"])
def test_exception_inside_compute(vae, real_weights, photos, latents_dir, tmp_path, monkeypatch, cmd):
    from vaecli.codec import Codec

    if cmd == "encode":
        monkeypatch.setattr(Codec, "encode_batch", _raise_for_sub(Codec.encode_batch, RuntimeError("boom\nsecond")))
    else:
        monkeypatch.setattr(Codec, "decode_latent", _raise_for_sub(Codec.decode_latent, RuntimeError("boom\nsecond")))
    args, ext = _command(cmd, photos, latents_dir)
    out = tmp_path / "out"
    result = vae(*args, "-o", out, "--json")
    assert result.exit_code == 1
    records = _records(result)
    b = next(n for n in records if n.startswith("b."))
    assert records[b]["error"] == f"unexpected RuntimeError: boom second {HINT}"
    assert [r["status"] for _, r in sorted(records.items())] == ["ok", "error"]
    assert _error_lines(result)[0] == f"Error: {records[b]['input']}: unexpected RuntimeError: boom second {HINT}"
    assert not (out / "sub").exists()

    debug = vae(*args, "-o", tmp_path / "out2", "--debug")
    assert debug.exit_code == 1
    assert "Traceback (most recent call last)" in debug.stderr and "RuntimeError: boom" in debug.stderr


def test_exception_in_the_metrics(vae, real_weights, photos, tmp_path, monkeypatch):
    from vaecli import metrics

    def broken(a, b):
        if a.shape[-2] == 32:
            raise FloatingPointError("metrics failed")
        return real(a, b)

    real = metrics.psnr_ssim
    monkeypatch.setattr(metrics, "psnr_ssim", broken)
    result = vae("roundtrip", photos, "-r", "--json")
    assert result.exit_code == 1
    assert [r["error"] for _, r in sorted(_records(result).items())] == [
        None, f"unexpected FloatingPointError: metrics failed {HINT}"]


@pytest.mark.parametrize("stage", ["read", "write"])
def test_unexpected_exception_in_the_reader_or_writer_thread(vae, real_weights, photos, tmp_path, monkeypatch,
                                                             stage):
    """The threads that read and write must not die on a non-vaecli exception (that hung or exited 0)."""
    from vaecli import latents, media, pipeline

    if stage == "read":
        real = media.read_image
        monkeypatch.setattr(media, "read_image", lambda p, a="white": (_ for _ in ()).throw(KeyError("exif"))
                            if p.name == "b.png" else real(p, a))
    else:
        real = latents.save_safetensors
        monkeypatch.setitem(pipeline.SAVERS, "safetensors", lambda p, lat, meta: (_ for _ in ()).throw(
            UnicodeEncodeError("utf-8", "x", 0, 1, "bad")) if p.name == "b.latent" else real(p, lat, meta))
    result = vae("encode", photos, "-r", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    errors = [r["error"] for _, r in sorted(_records(result).items())]
    assert errors[0] is None
    assert errors[1].startswith("unexpected KeyError: 'exif'" if stage == "read" else "unexpected UnicodeEncodeError")
    assert errors[1].endswith(HINT)


@pytest.mark.parametrize("exc, message", [
    (RuntimeError("no\x1b[2J room\x07"), f"unexpected RuntimeError: no\\x1b[2J room\\x07 {HINT}"),
    (MemoryError(), "out of memory (free some, lower --max-memory, or refuse such inputs up front with "
                    "VAE_MAX_PIXELS)")])
def test_unexpected_error_outside_the_batch(vae, real_weights, small_image, tmp_path, monkeypatch, exc, message):
    """One line, its control characters escaped (no terminal escape reaches the screen); running out of memory is
    said in words (a MemoryError has no message)."""
    import vaecli.codec

    monkeypatch.setattr(vaecli.codec, "load_codec", lambda *a, **k: (_ for _ in ()).throw(exc))
    result = vae("encode", small_image, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {message}"


def test_fail_fast_stops_with_exit_1(vae, real_weights, photos, tmp_path, monkeypatch):
    from vaecli.codec import Codec

    monkeypatch.setattr(Codec, "encode_batch", _raise_for_sub(Codec.encode_batch, RuntimeError("boom")))
    (photos / "sub" / "c.png").write_bytes((photos / "a.png").read_bytes())
    result = vae("encode", photos, "-r", "-o", tmp_path / "out", "--fail-fast", "--batch-size", "1", "--json")
    assert result.exit_code == 1
    records = _records(result)
    assert records["b.png"]["status"] == "error"
    # the run stopped at b: c was not run, and its record says so
    assert records["c.png"]["status"] == "cancelled" and not (tmp_path / "out" / "sub" / "c.latent").exists()


def test_video_exception_inside_compute(vae, real_weights, shared, tmp_path, monkeypatch):
    from vaecli.codec import Codec

    monkeypatch.setattr(Codec, "encode_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("codec died")))
    out = tmp_path / "v.latent"
    result = vae("video", shared / "video" / "no_time_for_that_tiny.gif", "-o", out, "--json")
    assert result.exit_code == 1
    clip = shared / "video" / "no_time_for_that_tiny.gif"
    assert _error_lines(result) == [f"Error: {clip}: unexpected RuntimeError: codec died {HINT}"]
    assert json.loads(result.stdout)["status"] == "error"
    assert list(tmp_path.iterdir()) == []


# --- decoding with a model of another latent space -----------------------------------------------------------

@pytest.mark.parametrize("maker, decoder, ok", [
    ("sd15", "taesdxl", False), ("sd15", "sdxl", False), ("flux1", "sd3", False), ("taef2", "taef1", False),
    ("sd15", "taesd", True), ("sd21", "taesd", True), ("sdxl", "taesdxl", True), ("sd3", "taesd3", True),
    ("flux1", "taef1", True), ("taef2", "flux2", True), ("svd", "sd15", True),
])
def test_decode_only_within_a_latent_space(maker, decoder, ok):
    import torch

    from vaecli.codec import check_latent_fits
    from vaecli.errors import LatentFormatError
    from vaecli.latents import make_metadata

    spec, other = REGISTRY[maker], REGISTRY[decoder]
    meta = make_metadata(spec, (64, 64), (0, 0, 0, 0), "fp32")
    latent = torch.zeros(spec.latent_channels, 8, 8)
    if ok:
        check_latent_fits(other, latent.shape, meta)
        return
    with pytest.raises(LatentFormatError) as err:
        check_latent_fits(other, latent.shape, meta)
    assert str(err.value).startswith(f"a {maker} latent ({spec.latent_family} latent space) cannot be decoded with "
                                     f"{decoder} ({other.latent_family} latent space): decode with ")


def test_tiny_raw_latents_record_what_they_hold(vae, random_taesd, kl_files, small_image, tmp_path):
    """taesd --latent-space raw writes the unscaled posterior-mean estimate and says so; both decode the same."""
    weights = ["--weights", random_taesd / "diffusers"]
    scaled, raw = tmp_path / "s.latent", tmp_path / "r.latent"
    assert vae("encode", small_image, "-m", "taesd", *weights, "-o", scaled).exit_code == 0
    assert vae("encode", small_image, "-m", "taesd", *weights, "-o", raw, "--latent-space", "raw").exit_code == 0
    s, s_meta = load_latent(scaled)
    r, r_meta = load_latent(raw)
    assert (r_meta["space"], r_meta["scaling_factor"], r_meta["shift_factor"]) == ("raw", 1.0, 0.0)
    assert (s_meta["space"], s_meta["scaling_factor"]) == ("scaled", 0.18215)
    assert (r * 0.18215 - s).abs().max().item() <= 1e-5
    for lat, name in ((scaled, "s.png"), (raw, "r.png")):
        assert vae("decode", lat, *weights, "-o", tmp_path / name).exit_code == 0
    import numpy as np

    a = np.asarray(Image.open(tmp_path / "s.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "r.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


# --- quiet means quiet -----------------------------------------------------------------------------------------

def test_quiet_is_silent_for_every_writing_command(vae, real_weights, photos, shared, tmp_path):
    gif = shared / "video" / "no_time_for_that_tiny.gif"
    runs = [
        ("encode", photos, "-r", "-o", tmp_path / "lat"),
        ("encode", photos / "a.png", "-o", tmp_path / "one.latent"),
        ("decode", tmp_path / "lat", "-r", "-o", tmp_path / "dec"),
        ("roundtrip", photos, "-r", "-o", tmp_path / "rt"),
        ("roundtrip", photos / "a.png"),
        ("video", gif, "--frames", 3, "-o", tmp_path / "v.latent", "--roundtrip"),
        ("decode", tmp_path / "v.latent", "-o", tmp_path / "v.mp4"),
        ("video", gif, "--frames", 30, "-o", tmp_path / "w.latent"),  # the clip is shorter: the note is not printed
    ]
    for args in runs:
        result = vae(*args, "-q")
        assert result.exit_code == 0, (args, result.stderr)
        assert (result.stdout, result.stderr) == ("", ""), args


def test_video_output_options(vae, real_weights, shared, tmp_path):
    gif = shared / "video" / "no_time_for_that_tiny.gif"
    out = tmp_path / "v.latent"
    assert vae("video", gif, "--frames", 2, "-o", out, "-q").exit_code == 0
    stamp = out.stat().st_mtime_ns
    skipped = vae("video", gif, "--frames", 2, "-o", out, "--skip-existing", "--json")
    assert skipped.exit_code == 0
    assert json.loads(skipped.stdout)["status"] == "skipped" and out.stat().st_mtime_ns == stamp
    redone = vae("video", gif, "--frames", 3, "-o", out, "--overwrite", "--json")
    assert redone.exit_code == 0
    assert json.loads(redone.stdout)["status"] == "ok" and load_latent(out)[0].shape[0] == 3


def test_a_file_name_holding_a_line_break_stays_one_line(vae, real_weights, small_image, tmp_path):
    """Every message is one line, even for a name with a line break in it (escaped as \\n); JSON keeps the name."""
    good = tmp_path / "new\nline.png"
    good.write_bytes(small_image.read_bytes())
    bad = tmp_path / "bad\nname.png"
    bad.write_text("not an image")
    result = vae("encode", good, bad, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 1
    shown = str(bad).replace("\n", "\\n")
    lines = result.stderr.splitlines()
    assert len(lines) == 5  # the error, the encoded input, the summary and the failure listed again
    assert lines[0] == lines[-1].replace("  ", "Error: ", 1) == f"Error: {shown}: not an image file Pillow can read"
    assert lines[1].startswith(str(good).replace("\n", "\\n") + " -> ")
    records = {r["input"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert records[str(bad)]["error"] == f"{shown}: not an image file Pillow can read"
    assert records[str(good)]["status"] == "ok"
