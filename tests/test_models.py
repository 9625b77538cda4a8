"""`vae models`: the registry listing, weight status, JSON, and the weights manifest."""

from __future__ import annotations

import json
from pathlib import Path

from vaecli.registry import REGISTRY, manifest_lines


def test_models_lists_every_entry_with_weight_status(vae, real_weights):
    result = vae("models")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(REGISTRY)
    by_name = {line.split()[0]: line for line in lines}
    assert "32 x H/8 x W/8" in by_name["taef2"] and " found " in by_name["taef2"]
    assert by_name["taef2"].endswith("(default)")
    assert "32 x H/32 x W/32" in by_name["taesana"] and "found (encoder only)" in by_name["taesana"]
    assert " missing " in by_name["taesd"]


def test_models_json(vae, real_weights):
    result = vae("models", "--json")
    records = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert records["taef2"]["channels"] == 32
    assert records["taef2"]["default"] is True
    assert records["taef2"]["weights"]["decoder"] == str(real_weights / "taef2_decoder.pth")
    assert records["taesd"]["weights"] == {"encoder": None, "decoder": None}
    assert records["taesd3"]["channels"] == 16 and records["taef1"]["channels"] == 16
    assert records["taesdxl"]["channels"] == 4


def test_models_reports_checksum_mismatch(vae, tmp_path, monkeypatch):
    (tmp_path / "taef2_encoder.pth").write_bytes(b"not the real file")
    monkeypatch.setenv("VAE_WEIGHTS_DIR", str(tmp_path))
    records = {r["name"]: r for r in map(json.loads, vae("models", "--json").stdout.splitlines())}
    assert records["taef2"]["weights"]["encoder"] == "checksum mismatch"


def test_models_reports_an_unreadable_weights_file(vae, shared_weights, tmp_path, monkeypatch):
    """A weights file the user may not read is no checksum mismatch (which it was shown as)."""
    from tests.conftest import deny_reads_of

    locked = tmp_path / "taef2_encoder.pth"
    locked.write_bytes((shared_weights / locked.name).read_bytes())
    (tmp_path / "taef2_decoder.pth").write_bytes((shared_weights / "taef2_decoder.pth").read_bytes())
    monkeypatch.setenv("VAE_WEIGHTS_DIR", str(tmp_path))
    deny_reads_of(locked, monkeypatch)
    records = {r["name"]: r for r in map(json.loads, vae("models", "--json").stdout.splitlines())}
    lines = {line.split()[0]: line for line in vae("models").stdout.splitlines()}
    locked.chmod(0o644)
    assert records["taef2"]["weights"] == {"encoder": "unreadable", "decoder": str(tmp_path / "taef2_decoder.pth")}
    assert lines["taef2"].split()[6] == "unreadable"


def test_manifest_file_matches_registry(vae):
    manifest = Path(__file__).resolve().parents[1] / "weights" / "manifest.tsv"
    assert manifest.read_text().splitlines() == manifest_lines()
    assert vae("models", "--manifest").stdout.splitlines() == manifest_lines()


def test_manifest_with_json_is_refused(vae):
    """--manifest printed its TSV under --json, which a script then failed to parse."""
    result = vae("models", "--manifest", "--json")
    message = "--json does not apply to --manifest, which prints the TSV of weights/manifest.tsv"
    assert result.exit_code == 2
    assert result.stderr == f"Error: {message}\n"
    assert json.loads(result.stdout) == {"input": None, "output": None, "status": "error", "error": message}


def test_manifest_checksums_match_shared_files(shared_weights):
    sums = dict(line.split()[::-1] for line in (shared_weights / "SHA256SUMS").read_text().splitlines())
    for spec in REGISTRY.values():
        for wf in spec.weights:
            if wf.name in sums:
                assert wf.sha256 == sums[wf.name]
                assert wf.size == (shared_weights / wf.name).stat().st_size
