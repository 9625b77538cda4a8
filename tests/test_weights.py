"""The weights search path, checksum verification, safe loading and readable layout errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings

import pytest
import torch

from vaecli import weights
from vaecli.errors import WeightsError


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_missing_weights_message(vae, small_image, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_WEIGHTS_DIR", str(tmp_path / "a") + os.pathsep + str(tmp_path / "b"))
    result = vae("encode", small_image, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    looked = ", ".join(str(p) for p in weights.search_path())
    assert str(tmp_path / "a") in looked and str(tmp_path / "b") in looked
    assert _error_line(result) == (
        f"Error: taef2_encoder.pth (taef2 encoder) not found; looked in: {looked}; run 'vae weights pull taef2' "
        f"or download it from https://github.com/madebyollin/taesd/raw/main/taef2_encoder.pth into one of those "
        f"folders, or pass --weights PATH")
    assert not (tmp_path / "x.latent").exists()


def test_search_path_order(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_WEIGHTS_DIR", f"{tmp_path / 'one'}{os.pathsep}{tmp_path / 'two'}")
    path = weights.search_path()
    assert path[:2] == [tmp_path / "one", tmp_path / "two"]
    assert path[2] == weights.PROJECT_WEIGHTS
    assert path[3] == weights.cache_dir()


def test_first_folder_on_the_path_wins(vae, shared_weights, small_image, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    shutil.copytree(shared_weights, second)
    (first / "taef2_encoder.pth").write_bytes(b"corrupt")
    monkeypatch.setenv("VAE_WEIGHTS_DIR", f"{first}{os.pathsep}{second}")
    result = vae("encode", small_image, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert "checksum mismatch for " + str(first / "taef2_encoder.pth") in result.stderr


def test_checksum_mismatch_and_no_verify(vae, shared_weights, small_image, tmp_path, monkeypatch):
    sd = torch.load(shared_weights / "taef2_encoder.pth", weights_only=True)
    torch.save({k: v.float() for k, v in sd.items()}, tmp_path / "taef2_encoder.pth")  # same values, other bytes
    monkeypatch.setenv("VAE_WEIGHTS_DIR", str(tmp_path))
    digest = weights.sha256_of(tmp_path / "taef2_encoder.pth")
    result = vae("encode", small_image, "-o", tmp_path / "x.latent")
    assert result.exit_code == 1
    assert _error_line(result) == (
        f"Error: checksum mismatch for {tmp_path / 'taef2_encoder.pth'}: expected sha256 "
        f"10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6, got {digest} "
        f"(replace the file, or pass --no-verify to use it anyway)")
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--no-verify")
    assert result.exit_code == 0, result.stderr


def test_a_bad_half_found_by_name_blames_no_given_weights(vae, shared_weights, small_image, tmp_path,
                                                          monkeypatch):
    shutil.copy(shared_weights / "taef2_encoder.pth", tmp_path)
    (tmp_path / "taef2_decoder.pth").write_bytes(b"corrupt")
    monkeypatch.setenv("VAE_WEIGHTS_DIR", str(tmp_path))
    result = vae("roundtrip", small_image, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    good, bad = (weights.sha256_of(d / "taef2_decoder.pth") for d in (shared_weights, tmp_path))
    assert _error_line(result) == (
        f"Error: checksum mismatch for {tmp_path / 'taef2_decoder.pth'}: expected sha256 {good}, got {bad} "
        f"(replace the file, or pass --no-verify to use it anyway)")
    assert not (tmp_path / "x.png").exists()


def test_user_named_weights_are_not_checksummed(vae, shared_weights, small_image, tmp_path):
    sd = torch.load(shared_weights / "taef2_encoder.pth", weights_only=True)
    torch.save({k: v.float() for k, v in sd.items()}, tmp_path / "finetuned.pth")
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--weights", tmp_path / "finetuned.pth")
    assert result.exit_code == 0, result.stderr


def test_named_weights_without_the_half_a_command_needs_are_refused(vae, real_weights, small_image, tmp_path,
                                                                   monkeypatch):
    """`decode -w taef2_encoder.pth` ran the search path's decoder and ignored the file; a half a command can use
    is taken, the other half then comes from the search path."""
    enc, dec = real_weights / "taef2_encoder.pth", real_weights / "taef2_decoder.pth"
    lat = tmp_path / "x.latent"
    result = vae("encode", small_image, "-o", lat, "-w", dec)
    assert (result.exit_code, result.stderr) == (1, f"Error: {dec}: expected taef2's encoder weights for this "
                                                    f"command, found only its decoder\n")
    assert not lat.exists()
    assert vae("encode", small_image, "-o", lat, "-w", enc, "-q").exit_code == 0
    result = vae("decode", lat, "-o", tmp_path / "x.png", "-w", enc)
    assert (result.exit_code, result.stderr.splitlines()[0]) == (
        1, f"Error: {lat}: {enc}: expected taef2's decoder weights for this command, found only its encoder")
    assert vae("roundtrip", small_image, "-w", dec, "-q").exit_code == 0
    monkeypatch.setenv("VAE_WEIGHTS_DIR", str(tmp_path / "empty"))  # the other half is on no folder of the path
    result = vae("roundtrip", small_image, "-w", dec)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].startswith("Error: taef2_encoder.pth (taef2 encoder) not found; looked in: ")
    assert result.stderr.splitlines()[0].endswith(f"or pass --weights PATH (the weights given, {dec}, hold no "
                                                  f"encoder)")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_executed(vae, small_image, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"0.weight": Exploit()}, f, protocol=2)
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--weights", evil)
    assert result.exit_code == 1
    assert _error_line(result) == (f"Error: cannot load weights from {evil}: expected a .pth or .safetensors state "
                                   f"dict of tensors; it holds objects other than tensors, or is not a PyTorch file "
                                   f"(loaded with weights_only=True)")
    assert not (tmp_path / "pwned").exists()


def test_files_that_are_no_checkpoint_say_so_and_warn_nothing(tmp_path):
    """torch.load warns on stderr about a pickle protocol other than 2 (a second line under the Error), and a text or
    empty file reached the user as '101' or 'EOFError'."""
    cases = {"evil4.pth": (pickle.dumps({"0.weight": Exploit()}, protocol=4), "it holds objects other than tensors, "
                                                                             "or is not a PyTorch file (loaded with "
                                                                             "weights_only=True)"),
             "notes.pth": (b"hello, world\n", "it holds objects other than tensors, or is not a PyTorch file (loaded "
                                              "with weights_only=True)"),
             "empty.pth": (b"", "the file is empty"),
             "cut.pth": (pickle.dumps({"0.weight": torch.zeros(1)}, protocol=2)[:2], "it ends before its pickled "
                                                                                    "data does (a cut-off file?)")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(WeightsError) as err:
                weights.load_state_dict(tmp_path / name)
        assert str(err.value) == (f"cannot load weights from {tmp_path / name}: expected a .pth or .safetensors "
                                  f"state dict of tensors; {message}")
        assert [str(w.message) for w in caught] == []


def test_wrong_architecture_gives_key_summary(vae, random_taesd, small_image, tmp_path):
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--weights",
                 random_taesd / "original" / "taesd_encoder.pth")
    assert result.exit_code == 1
    line = _error_line(result)
    assert line.startswith(f"Error: {random_taesd / 'original' / 'taesd_encoder.pth'} as the taef2 encoder "
                           f"does not fit: 12 missing: encoder.11.pool.0.weight, encoder.11.pool.1.weight, "
                           f"encoder.11.pool.1.bias (+9 more); "
                           f"2 mismatched (file vs model): encoder.14.weight (4, 64, 3, 3) vs (32, 64, 3, 3), ")


def test_foreign_checkpoint_keys(vae, small_image, tmp_path):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "unet.safetensors"))
    result = vae("encode", small_image, "--weights", tmp_path / "unet.safetensors")
    assert result.exit_code == 1
    assert _error_line(result) == (
        f"Error: {tmp_path / 'unet.safetensors'} is not a tiny-autoencoder checkpoint: unexpected key "
        f"'model.diffusion_model.x' (expected taesd.py keys like '0.weight' or diffusers keys like "
        f"'encoder.layers.0.weight')")


def test_diffusers_config_with_wrong_channels(vae, random_taesd, small_image, tmp_path):
    result = vae("encode", small_image, "--model", "taef2", "--weights", random_taesd / "diffusers")
    assert result.exit_code == 1
    assert _error_line(result) == (f"Error: expected 32 latent channels for taef2, got 4 in "
                                   f"{random_taesd / 'diffusers' / 'config.json'}")


def test_weights_folder_without_files(vae, small_image, tmp_path):
    (tmp_path / "w").mkdir()
    result = vae("encode", small_image, "--weights", tmp_path / "w")
    assert result.exit_code == 1
    assert _error_line(result) == (f"Error: no weights for taef2 in folder {tmp_path / 'w'}: expected one of "
                                   f"taef2_encoder.pth, taef2_decoder.pth, diffusion_pytorch_model.safetensors")


def test_nonexistent_weights_path(vae, small_image, tmp_path):
    result = vae("encode", small_image, "--weights", tmp_path / "nope.pth")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: weights path not found: {tmp_path / 'nope.pth'}"


def test_taesd_via_cli_with_random_weights(vae, random_taesd, small_image, tmp_path):
    lat = tmp_path / "x.latent"
    result = vae("encode", small_image, "-o", lat, "--model", "taesd", "--weights", random_taesd / "diffusers")
    assert result.exit_code == 0, result.stderr
    result = vae("decode", lat, "-o", tmp_path / "x.png", "--weights", random_taesd / "original")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == f"{lat} -> {tmp_path / 'x.png'}  taesd 61x45"


def test_config_json_that_is_no_object_or_names_channels_as_text(vae, random_taesd, small_image, tmp_path):
    folder = tmp_path / "diffusers"
    shutil.copytree(random_taesd / "diffusers", folder)
    config = folder / "config.json"
    for text, error in (("[]", f"cannot read {config}: expected a JSON object, got list"),
                        ('{"latent_channels": "4"}', f"expected 4 latent channels for taesd, got '4' in {config}")):
        config.write_text(text)
        result = vae("encode", small_image, "-m", "taesd", "-o", tmp_path / "x.latent", "--weights", folder)
        assert (result.exit_code, _error_line(result)) == (1, f"Error: {error}")
    assert not (tmp_path / "x.latent").exists()


def test_weights_files_that_would_load_but_compute_garbage_are_refused(vae, shared_weights, small_image, tmp_path):
    """An empty file was ignored (the search path's weights ran in its place); integer, complex, sparse, meta or
    NaN weights loaded (cast silently) and gave all-zero or NaN latents at exit 0."""
    from safetensors.torch import save_file

    sd = torch.load(shared_weights / "taef2_encoder.pth", weights_only=True)
    first = next(iter(sd))
    cases = {
        "empty.pth": ({}, "{p} holds no tensors (expected a state dict of the model's weights)"),
        "empty_sd.pth": ({"state_dict": {}}, "{p} holds no tensors (expected a state dict of the model's weights)"),
        "int.pth": ({k: v.to(torch.int32) for k, v in sd.items()},
                    f"{{p}} as the taef2 encoder: expected floating-point tensors, got int32 for encoder.{first}"),
        "complex.pth": ({k: v.to(torch.complex64) for k, v in sd.items()},
                        f"{{p}} as the taef2 encoder: expected floating-point tensors, got complex64 for "
                        f"encoder.{first}"),
        "sparse.pth": ({k: v.to_sparse() for k, v in sd.items()},
                       f"{{p}} as the taef2 encoder: expected floating-point tensors, got torch.sparse_coo for "
                       f"encoder.{first}"),
        "meta.pth": ({k: v.to("meta") for k, v in sd.items()},
                     f"{{p}} as the taef2 encoder: expected floating-point tensors, got meta for encoder.{first}"),
        "nan.pth": ({k: v * float("nan") if k == first else v for k, v in sd.items()},
                    f"{{p}} as the taef2 encoder: expected finite weights, found {sd[first].numel()} NaN/Inf in "
                    f"encoder.{first}"),
        "key.pth": ({1: torch.zeros(3)}, "{p}: expected a state dict with string keys, found the key '1' (int)"),
    }
    for name, (state, error) in cases.items():
        path = tmp_path / name
        torch.save(state, path)
        result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--weights", path)
        assert (result.exit_code, _error_line(result)) == (1, "Error: " + error.format(p=path)), name
    save_file({}, str(tmp_path / "empty.safetensors"))
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--weights", tmp_path / "empty.safetensors")
    assert _error_line(result) == (f"Error: {tmp_path / 'empty.safetensors'} holds no tensors (expected a state "
                                   f"dict of the model's weights)")
    assert not (tmp_path / "x.latent").exists()


def test_compressed_pytorch_zip_is_refused_before_inflating(vae, shared_weights, small_image, tmp_path):
    """A re-zipped .pth can hold GBs of zeros in a few MB; torch.load inflated them before the shape check."""
    import zipfile

    plain, packed = tmp_path / "plain.pth", tmp_path / "packed.pth"
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with zipfile.ZipFile(packed) as z:
        first = z.infolist()[0].filename
        count = len(z.infolist())
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--weights", packed)
    assert _error_line(result) == (
        f"Error: cannot load weights from {packed}: expected a PyTorch file as torch.save writes it, with stored "
        f"entries; {count} are compressed ({first[:60]}...), which would be inflated in full before their shapes "
        f"could be checked (re-save it with torch.save)")
    assert "does not fit" in _error_line(vae("encode", small_image, "--weights", plain))  # stored: read as usual


def test_truncated_checkpoint_is_one_whole_sentence(vae, shared_weights, small_image, tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes((shared_weights / "taef2_encoder.pth").read_bytes()[:100000])
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--weights", cut)
    assert _error_line(result) == (f"Error: cannot load weights from {cut}: expected a .pth or .safetensors state "
                                   f"dict of tensors; PytorchStreamReader failed reading zip archive: failed finding "
                                   f"central directory")


def test_float8_weights_load_as_before(vae, shared_weights, small_image, tmp_path):
    """fp8 repackagings are floats (torch has no isfinite for them: the finite check goes through float32)."""
    from safetensors.torch import save_file

    sd = torch.load(shared_weights / "taef2_encoder.pth", weights_only=True)
    save_file({k: v.to(torch.float8_e4m3fn).contiguous() for k, v in sd.items()}, str(tmp_path / "fp8.safetensors"))
    result = vae("encode", small_image, "-o", tmp_path / "x.latent", "--weights", tmp_path / "fp8.safetensors")
    assert result.exit_code == 0, result.stderr


def test_kl_weights_of_another_latent_space_name_the_channels(vae, kl_files, small_image, tmp_path):
    """SD3's autoencoder given for sd15 was a list of missing and mismatched keys; it is the latent channels."""
    sd3 = kl_files("sd3")["ldm"]
    result = vae("encode", small_image, "-m", "sd15", "-w", sd3, "-o", tmp_path / "x.latent")
    assert (result.exit_code, _error_line(result)) == (
        1, f"Error: expected 4 latent channels for sd15, got 16 in {sd3} (encoder.conv_out.weight (32, 512, 3, 3), "
           f"as in sd3, flux1)")
    assert not (tmp_path / "x.latent").exists()


def test_diffusers_kl_folder_of_another_latent_space_is_refused(vae, kl_files, small_image, tmp_path):
    """SD3's diffusers folder for flux1 (same shapes) loaded, and its latents were scaled and shifted as FLUX.1's."""
    folder = kl_files("sd3")["diffusers"]
    result = vae("encode", small_image, "-m", "flux1", "-w", folder, "-o", tmp_path / "x.latent")
    assert (result.exit_code, _error_line(result)) == (
        1, f"Error: expected scaling_factor 0.3611 for flux1, got 1.5305 in {folder / 'config.json'} (the weights of "
           f"a model with another latent space, as in sd3)")
    assert not (tmp_path / "x.latent").exists()
    shutil.copytree(folder, tmp_path / "sd3")  # a fine-tune recording another shift only is refused as well
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "sd3" / "config.json").write_text(json.dumps({**config, "shift_factor": 0.5}))
    result = vae("encode", small_image, "-m", "sd3", "-w", tmp_path / "sd3", "-o", tmp_path / "x.latent")
    assert (result.exit_code, _error_line(result)) == (
        1, f"Error: expected shift_factor 0.0609 for sd3, got 0.5 in {tmp_path / 'sd3' / 'config.json'} (the "
           f"weights of a model with another latent space)")
