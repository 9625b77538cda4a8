"""`vae weights list` and `vae weights pull` against a local fake of the Hugging Face hub and of GitHub: never the
network. The fake replaces the two huggingface_hub calls vaecli makes (`HfApi.get_paths_info`, `hf_hub_download`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError

from vaecli import hub, weights
from vaecli.errors import InputError, WeightsError
from vaecli.files import output_file_mode
from vaecli.registry import REGISTRY

SD15 = REGISTRY["sd15"].weights[0]
QWEN = REGISTRY["qwen-image"].weights[0]


def _error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


class FakeHub:
    """Files by (repo, path): what `get_paths_info` reports (LFS sha256 of `reported` or of the content) and what
    `hf_hub_download` writes; calls are recorded, failures injected per repo."""

    def __init__(self, monkeypatch):
        self.files: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.downloads: list[dict] = []
        self.errors: dict[str, Exception] = {}
        self.bars_disabled: list[bool] = []
        fake = self

        def get_paths_info(api, repo_id, paths, *, revision=None, **kwargs):
            if repo_id in fake.errors:
                raise fake.errors[repo_id]
            out = []
            for path in [paths] if isinstance(paths, str) else paths:
                if (repo_id, path) in fake.files:
                    data, sha = fake.files[repo_id, path]
                    out.append(RepoFile(path=path, size=len(data), oid="0" * 40,
                                        lfs={"size": len(data), "oid": sha, "pointerSize": 134}))
            return out

        def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, **kwargs):
            from huggingface_hub.utils import are_progress_bars_disabled

            fake.downloads.append({"repo": repo_id, "filename": filename, "revision": revision,
                                   "local_dir": local_dir})
            fake.bars_disabled.append(are_progress_bars_disabled())
            out = Path(local_dir) / filename
            out.parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / ".cache").mkdir(exist_ok=True)  # as huggingface_hub's own metadata folder
            out.write_bytes(fake.files[repo_id, filename][0])
            return str(out)

        monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", get_paths_info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    def publish(self, wf, data: bytes, reported: str | None = None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.files[wf.repo, wf.path_in_repo] = (data, reported or sha)
        return sha


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    return FakeHub(monkeypatch)


@pytest.fixture
def fake_github(monkeypatch):
    """GitHub raw URLs served from a dict; a missing URL is a connection failure."""
    served: dict[str, bytes] = {}

    class Response(io.BytesIO):
        def __init__(self, data):
            super().__init__(data)
            self.headers = {"Content-Length": str(len(data))}

    def fake_open(url):
        if url not in served:
            import urllib.error

            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return Response(served[url])

    monkeypatch.setattr(hub, "_open", fake_open)
    return served


def test_registry_points_at_the_published_files():
    assert (SD15.repo, SD15.path_in_repo) == ("stabilityai/sd-vae-ft-mse-original",
                                              "vae-ft-mse-840000-ema-pruned.safetensors")
    assert (QWEN.name, QWEN.repo, QWEN.path_in_repo) == (
        "qwen_image_vae.safetensors", "Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors")
    flux2 = REGISTRY["flux2"].weights[0]
    assert (flux2.name, flux2.repo, flux2.path_in_repo) == ("flux2_ae.safetensors", "black-forest-labs/FLUX.2-dev",
                                                            "ae.safetensors")
    assert REGISTRY["wan2.2"].weights[0].path_in_repo == "Wan2.2_VAE.pth"
    assert hub.source_url(QWEN) == "https://huggingface.co/Qwen/Qwen-Image/resolve/main/vae/diffusion_pytorch_model" \
                                   ".safetensors"
    assert hub.source_url(QWEN, "abc123").startswith("https://huggingface.co/Qwen/Qwen-Image/resolve/abc123/")
    for spec in REGISTRY.values():
        for wf in spec.weights:
            assert bool(wf.repo) == bool(wf.path_in_repo)
            assert wf.url.startswith("https://huggingface.co/" if wf.repo else "https://github.com/madebyollin/")


def test_pull_writes_the_file_under_its_search_name_and_records_its_checksum(vae, fake_hub):
    sha = fake_hub.publish(QWEN, b"qwen vae bytes")
    result = vae("weights", "pull", "qwen-image", "--json")
    assert result.exit_code == 0, result.stderr
    cache = weights.cache_dir()
    target = cache / "qwen_image_vae.safetensors"
    assert target.read_bytes() == b"qwen vae bytes"
    assert (cache / "qwen_image_vae.safetensors.sha256").read_text() == f"{sha}  qwen_image_vae.safetensors\n"
    assert sorted(p.name for p in cache.iterdir()) == ["qwen_image_vae.safetensors",
                                                       "qwen_image_vae.safetensors.sha256"]  # no temporaries
    (record,) = map(json.loads, result.stdout.splitlines())
    assert record == {"model": "qwen-image", "role": "vae", "name": "qwen_image_vae.safetensors",
                      "status": "downloaded", "path": str(target), "sha256": sha, "checked": ["hub"],
                      "url": "https://huggingface.co/Qwen/Qwen-Image/resolve/main/vae/diffusion_pytorch_model"
                             ".safetensors", "error": None}
    (call,) = fake_hub.downloads
    assert (call["repo"], call["filename"], call["revision"]) == (
        "Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors", None)
    assert Path(call["local_dir"]).parent == cache  # downloaded beside the target, then renamed into place
    assert fake_hub.bars_disabled == [True]  # --json: no progress bar
    assert weights.find_on_search_path(REGISTRY["qwen-image"], QWEN) == target


def test_pull_again_keeps_the_verified_file(vae, fake_hub):
    fake_hub.publish(SD15, b"sd15 bytes")
    assert vae("weights", "pull", "sd15", "-q").exit_code == 0
    result = vae("weights", "pull", "sd15")
    assert result.exit_code == 0
    assert len(fake_hub.downloads) == 1
    assert "sd15 vae: already present: " in result.stderr


def test_pull_revision_and_folder(vae, fake_hub, tmp_path):
    fake_hub.publish(SD15, b"sd15 bytes")
    result = vae("weights", "pull", "sd15", "--revision", "v1.0", "--to", tmp_path / "w", "-q")
    assert result.exit_code == 0
    assert result.stderr == ""
    assert (tmp_path / "w" / SD15.name).read_bytes() == b"sd15 bytes"
    assert fake_hub.downloads[0]["revision"] == "v1.0"
    assert not weights.cache_dir().exists()


def test_checksum_mismatch_is_refused_and_nothing_is_left(vae, fake_hub):
    fake_hub.publish(SD15, b"tampered bytes", reported="ab" * 32)
    got = hashlib.sha256(b"tampered bytes").hexdigest()
    result = vae("weights", "pull", "sd15")
    assert result.exit_code == 1
    assert _error_lines(result) == [
        "Error: checksum mismatch for vae-ft-mse-840000-ema-pruned.safetensors (sd15 vae) from "
        "https://huggingface.co/stabilityai/sd-vae-ft-mse-original (vae-ft-mse-840000-ema-pruned.safetensors): the hub "
        f"reports sha256 {'ab' * 32}, the download has {got}; nothing was written"]
    assert list(weights.cache_dir().iterdir()) == []


def test_offline_error_says_what_to_download_and_where(vae, fake_hub):
    fake_hub.errors[SD15.repo] = LocalEntryNotFoundError("cannot reach the hub")
    result = vae("weights", "pull", "sd15")
    assert result.exit_code == 1
    assert _error_lines(result) == [
        "Error: cannot download vae-ft-mse-840000-ema-pruned.safetensors (sd15 vae): the Hugging Face hub cannot be "
        "reached (offline); download https://huggingface.co/stabilityai/sd-vae-ft-mse-original/resolve/main/"
        f"vae-ft-mse-840000-ema-pruned.safetensors by hand and save it as {weights.cache_dir() / SD15.name} "
        "(or into a folder on $VAE_WEIGHTS_DIR)"]


def test_http_error_is_one_line_with_the_manual_way(vae, fake_hub):
    fake_hub.errors[SD15.repo] = ConnectionError("Connection reset by peer")
    result = vae("weights", "pull", "sd15", "--revision", "r2")
    assert _error_lines(result) == [
        "Error: cannot download vae-ft-mse-840000-ema-pruned.safetensors (sd15 vae) from the Hugging Face hub "
        "(Connection reset by peer); download https://huggingface.co/stabilityai/sd-vae-ft-mse-original/resolve/r2/"
        f"vae-ft-mse-840000-ema-pruned.safetensors by hand and save it as {weights.cache_dir() / SD15.name} "
        "(or into a folder on $VAE_WEIGHTS_DIR)"]


def test_one_failure_fails_the_run_and_each_file_has_a_record(vae, fake_hub):
    fake_hub.publish(SD15, b"sd15 bytes")
    gated = GatedRepoError.__new__(GatedRepoError)
    Exception.__init__(gated, "403 Client Error: access to model black-forest-labs/FLUX.2-dev is restricted")
    fake_hub.errors["black-forest-labs/FLUX.2-dev"] = gated
    result = vae("weights", "pull", "flux2", "sd15", "--json")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["model"], r["status"]) for r in records] == [("flux2", "error"), ("sd15", "downloaded")]
    assert records[0]["error"] == (
        "cannot download flux2_ae.safetensors (flux2 vae): black-forest-labs/FLUX.2-dev is gated: accept its terms at "
        "https://huggingface.co/black-forest-labs/FLUX.2-dev and set HF_TOKEN (or run `hf auth login`); or download "
        "https://huggingface.co/black-forest-labs/FLUX.2-dev/resolve/main/ae.safetensors by hand and save it as "
        f"{weights.cache_dir() / 'flux2_ae.safetensors'} (or into a folder on $VAE_WEIGHTS_DIR)")
    assert _error_lines(result) == ["Error: " + records[0]["error"]]
    assert "done: 1 ok, 1 failed" in result.stderr


def test_missing_hub_extra(vae, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    result = vae("weights", "pull", "sd15")
    assert result.exit_code == 1
    assert _error_lines(result) == [
        "Error: pulling vae-ft-mse-840000-ema-pruned.safetensors needs huggingface_hub: pip install 'vaecli[hub]'; "
        "or download https://huggingface.co/stabilityai/sd-vae-ft-mse-original/resolve/main/"
        f"vae-ft-mse-840000-ema-pruned.safetensors by hand and save it as {weights.cache_dir() / SD15.name} "
        "(or into a folder on $VAE_WEIGHTS_DIR)"]


def test_github_files_are_checked_against_the_registry(vae, fake_github, shared_weights):
    spec = REGISTRY["taef2"]
    for wf in spec.weights:
        fake_github[wf.url] = (shared_weights / wf.name).read_bytes()
    result = vae("weights", "pull", "taef2", "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["role"], r["status"], r["checked"]) for r in records] == [
        ("encoder", "downloaded", ["registry"]), ("decoder", "downloaded", ["registry"])]
    for wf in spec.weights:
        assert weights.sha256_of(weights.cache_dir() / wf.name) == wf.sha256
        # as an ordinary write would make it (the temp file it came from was private)
        assert (weights.cache_dir() / wf.name).stat().st_mode & 0o777 == output_file_mode()


def test_github_file_with_wrong_bytes_is_refused(vae, fake_github):
    wf = REGISTRY["taesana"].weights[0]
    fake_github[wf.url] = b"not taesana"
    result = vae("weights", "pull", "taesana")
    assert result.exit_code == 1
    got = hashlib.sha256(b"not taesana").hexdigest()
    assert _error_lines(result) == [
        f"Error: checksum mismatch for taesana_encoder.pth (taesana encoder) from {wf.url}: the registry expects "
        f"sha256 {wf.sha256}, the download has {got}; nothing was written"]
    assert list(weights.cache_dir().iterdir()) == []


def _taesd_by_hand() -> str:
    """The end of a failed pull's message: how to do it by hand."""
    return ("download https://github.com/madebyollin/taesd/raw/main/taesd_encoder.pth by hand and save it as "
            f"{weights.cache_dir() / 'taesd_encoder.pth'} (or into a folder on $VAE_WEIGHTS_DIR)")


def test_github_transfer_cut_short_is_refused_and_nothing_is_left(vae, monkeypatch):
    class Short(io.BytesIO):  # a dropped connection: read() ends early, without an error
        headers = {"Content-Length": "1000000"}

    monkeypatch.setattr(hub, "_open", lambda url: Short(b"PK" + b"x" * 4998))
    result = vae("weights", "pull", "taesd")
    assert result.exit_code == 1
    assert _error_lines(result)[0] == (
        "Error: cannot download taesd_encoder.pth (taesd encoder): the transfer ended after 5000 of 1000000 bytes; "
        f"nothing was written; {_taesd_by_hand()}")
    assert list(weights.cache_dir().iterdir()) == []
    assert "missing" in vae("weights", "list", "taesd").stdout


def test_github_offline(vae, fake_github):
    result = vae("weights", "pull", "taesd")
    assert result.exit_code == 1
    assert _error_lines(result)[0] == (
        "Error: cannot download taesd_encoder.pth (taesd encoder) (<urlopen error [Errno -3] Temporary failure in "
        f"name resolution>); {_taesd_by_hand()}")
    assert len(_error_lines(result)) == 2


def test_list_shows_where_and_whether_verified(vae, fake_hub, real_weights, tmp_path, monkeypatch):
    fake_hub.publish(SD15, b"sd15 bytes")
    assert vae("weights", "pull", "sd15", "-q").exit_code == 0
    hand = tmp_path / "hand"
    hand.mkdir()
    (hand / "sdxl_vae.safetensors").write_bytes(b"placed by hand")  # no checksum known: unverified
    (hand / "taesana_encoder.pth").write_bytes(b"corrupt")  # shadows the real one: a mismatch
    monkeypatch.setenv(weights.ENV_VAR, f"{hand}{os.pathsep}{real_weights}")
    result = vae("weights", "list", "taef2", "sd15", "sdxl", "taesana", "flux1", "--json")
    assert result.exit_code == 0
    records = {(r["model"], r["role"]): r for r in map(json.loads, result.stdout.splitlines())}
    assert [k[0] for k in records] == ["taef2", "taef2", "sd15", "sdxl", "taesana", "flux1"]
    assert records["taef2", "encoder"]["state"] == "verified"
    assert records["taef2", "encoder"]["checksum"] == "registry"
    assert records["taef2", "encoder"]["path"] == str(real_weights / "taef2_encoder.pth")
    assert records["sd15", "vae"]["state"] == "verified" and records["sd15", "vae"]["checksum"] == "recorded"
    assert records["sd15", "vae"]["path"] == str(weights.cache_dir() / SD15.name)
    assert records["sdxl", "vae"]["state"] == "unverified" and records["sdxl", "vae"]["checksum"] is None
    assert records["taesana", "encoder"]["state"] == "checksum mismatch"
    assert records["taesana", "encoder"]["copies"] == [str(hand / "taesana_encoder.pth"),
                                                       str(real_weights / "taesana_encoder.pth")]
    assert records["flux1", "vae"] == {
        "model": "flux1", "role": "vae", "name": "ae.safetensors", "state": "missing", "path": None, "copies": [],
        "checksum": None, "repo": "black-forest-labs/FLUX.1-schnell", "path_in_repo": "ae.safetensors",
        "url": "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors"}
    fast = {(r["model"], r["role"]): r["state"]
            for r in map(json.loads, vae("weights", "list", "taesana", "--json", "--no-verify").stdout.splitlines())}
    assert fast == {("taesana", "encoder"): "found"}

    text = vae("weights", "list", "sd15", "flux1")
    assert text.stdout.splitlines() == [
        f"sd15   vae  verified  {weights.cache_dir() / SD15.name}",
        "flux1  vae  missing   (vae weights pull flux1)"]
    assert text.stderr.startswith("search path: " + str(hand))


def test_a_tampered_pulled_file_fails_its_recorded_checksum(vae, fake_hub):
    sha = fake_hub.publish(SD15, b"sd15 bytes")
    assert vae("weights", "pull", "sd15", "-q").exit_code == 0
    target = weights.cache_dir() / SD15.name
    target.write_bytes(b"sd15 bytes, then edited")
    (record,) = map(json.loads, vae("weights", "list", "sd15", "--json").stdout.splitlines())
    assert record["state"] == "checksum mismatch"
    with pytest.raises(WeightsError) as err:
        weights.find_on_search_path(REGISTRY["sd15"], SD15)
    got = hashlib.sha256(b"sd15 bytes, then edited").hexdigest()
    assert str(err.value) == (
        f"checksum mismatch for {target}: expected sha256 {sha} (recorded in {SD15.name}.sha256 when pulled), "
        f"got {got} (replace the file, or pass --no-verify to use it anyway)")
    assert weights.find_on_search_path(REGISTRY["sd15"], SD15, verify=False) == target
    # pulling again replaces the edited file: its bytes no longer match what the hub reports
    assert vae("weights", "pull", "sd15", "-q").exit_code == 0
    assert target.read_bytes() == b"sd15 bytes" and len(fake_hub.downloads) == 2


def test_an_unreadable_weights_file_says_so(vae, tmp_path, shared_weights, monkeypatch):
    """Listing, verifying or loading a weights file the user may not read was 'unexpected PermissionError: ...
    (rerun with --debug ...)', as if vaecli had a bug."""
    from tests.conftest import deny_reads_of

    folder = tmp_path / "w"
    folder.mkdir()
    locked = folder / "taef2_encoder.pth"
    locked.write_bytes((shared_weights / locked.name).read_bytes())
    monkeypatch.setenv(weights.ENV_VAR, str(folder))
    deny_reads_of(locked, monkeypatch)
    message = f"{locked}: cannot read: permission denied"
    result = vae("weights", "list", "taef2", "--json")
    assert (result.exit_code, _error_lines(result)) == (1, [f"Error: {message}"])
    encoder, decoder = map(json.loads, result.stdout.splitlines())  # the listing goes on past the unreadable file
    assert (encoder["state"], encoder["path"], encoder["error"]) == ("unreadable", str(locked), message)
    assert (decoder["state"], decoder["path"], "error" in decoder) == ("missing", None, False)
    result = vae("weights", "list", "taef2")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0].split() == ["taef2", "encoder", "unreadable", str(locked)]
    spec = REGISTRY["taef2"]
    with pytest.raises(InputError) as err:
        weights.find_on_search_path(spec, spec.weights[0])
    assert str(err.value) == message
    with pytest.raises(InputError) as err:
        weights.load_state_dict(locked)
    assert str(err.value) == message
    locked.chmod(0o644)


def test_pull_into_a_folder_it_may_not_write(vae, fake_github, shared_weights, tmp_path, monkeypatch):
    """A --to folder that refuses the file was 'unexpected PermissionError: ... (rerun with --debug ...)'."""
    import errno

    for wf in REGISTRY["taef2"].weights:
        fake_github[wf.url] = (shared_weights / wf.name).read_bytes()
    dest = tmp_path / "w"
    dest.mkdir()
    if os.geteuid() != 0:
        dest.chmod(0o555)
    else:  # root ignores modes: refuse the temp file
        real = hub.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == dest.resolve():
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(hub.tempfile, "mkstemp", mkstemp)
    result = vae("weights", "pull", "taef2", "--to", dest, "--json")
    dest.chmod(0o755)
    assert result.exit_code == 1
    assert _error_lines(result) == [f"Error: {dest / 'taef2_encoder.pth'}: cannot write: permission denied",
                                    f"Error: {dest / 'taef2_decoder.pth'}: cannot write: permission denied"]
    assert [json.loads(line)["error"] for line in result.stdout.splitlines()] == [
        f"{dest / 'taef2_encoder.pth'}: cannot write: permission denied",
        f"{dest / 'taef2_decoder.pth'}: cannot write: permission denied"]
    assert list(dest.iterdir()) == []


def test_a_full_disk_while_pulling_blames_the_disk_not_the_download(vae, fake_github, fake_hub, shared_weights,
                                                                     monkeypatch):
    """It read 'cannot download taef2_encoder.pth ... (No space left on device)', as if the network had failed."""
    import errno

    for wf in REGISTRY["taef2"].weights:
        fake_github[wf.url] = (shared_weights / wf.name).read_bytes()
    real_fdopen = hub.os.fdopen

    class Full(io.BufferedWriter):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode, buffering=0)))
    result = vae("weights", "pull", "taef2")
    assert result.exit_code == 1
    target = weights.cache_dir() / "taef2_encoder.pth"
    assert _error_lines(result)[0] == f"Error: {target}: cannot write: no space left on the device"
    assert list(weights.cache_dir().iterdir()) == []

    def hf_hub_download(*args, **kwargs):  # huggingface_hub writes the file itself
        raise OSError(errno.ENOSPC, "No space left on device")

    fake_hub.publish(SD15, b"sd15 bytes")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    result = vae("weights", "pull", "sd15")
    assert result.exit_code == 1
    assert _error_lines(result)[0] == f"Error: {weights.cache_dir() / SD15.name}: cannot write: no space left on " \
                                      f"the device"
    assert list(weights.cache_dir().iterdir()) == []


def test_a_search_path_folder_the_user_may_not_search(vae, tmp_path, monkeypatch):
    """VAE_WEIGHTS_DIR naming another user's private folder was 'unexpected PermissionError' (Path.is_file raises
    for EACCES) in every command that looks for weights."""
    import errno

    private = tmp_path / "private"
    private.mkdir()
    monkeypatch.setenv(weights.ENV_VAR, str(private))
    if os.geteuid() != 0:
        private.chmod(0)
    else:  # root ignores modes: refuse looking inside it
        real = Path.stat

        def stat(self, *args, **kwargs):
            if self.parent == private:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "stat", stat)
    message = f"{private / 'taef2_encoder.pth'}: cannot read: permission denied"
    result = vae("weights", "list", "taef2", "-q")
    private.chmod(0o755)
    decoder = f"{private / 'taef2_decoder.pth'}: cannot read: permission denied"
    assert (result.exit_code, _error_lines(result)) == (1, [f"Error: {message}", f"Error: {decoder}"])
    assert [line.split(maxsplit=3) for line in result.stdout.splitlines()] == [
        ["taef2", "encoder", "unreadable", message], ["taef2", "decoder", "unreadable", decoder]]
    spec = REGISTRY["taef2"]
    if os.geteuid() != 0:
        private.chmod(0)
    with pytest.raises(InputError) as err:
        weights.find_on_search_path(spec, spec.weights[0])
    private.chmod(0o755)
    assert str(err.value) == message
