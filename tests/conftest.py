"""Shared fixtures: the real data in ../shared (required, never skipped), small images, random-weight models."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vaecli import weights as weights_mod
from vaecli.cli import app

SHARED = Path(os.environ.get("VAE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: these tests need ../shared next to the project (set VAE_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared data folder; its absence fails the test loudly."""
    return _require(SHARED)


@pytest.fixture(scope="session")
def shared_images(shared) -> Path:
    return _require(shared / "images")


@pytest.fixture(scope="session")
def shared_weights(shared) -> Path:
    return _require(shared / "weights")


@pytest.fixture(scope="session")
def clip(shared) -> Path:
    """A real 512x320, 48-frame MP4."""
    return _require(shared / "video" / "pan_motorcycle.mp4")


@pytest.fixture(scope="session")
def gif(shared) -> Path:
    """A real tiny animated GIF (14x25)."""
    return _require(shared / "video" / "no_time_for_that_tiny.gif")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine OpenMP's spinning workers cost ten times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_search_path(tmp_path_factory, monkeypatch):
    """No test sees weights from the developer's own weights/ folder, cache, or environment."""
    empty = tmp_path_factory.mktemp("empty-search")
    monkeypatch.setattr(weights_mod, "PROJECT_WEIGHTS", empty / "project-weights")
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty / "cache"))
    monkeypatch.delenv(weights_mod.ENV_VAR, raising=False)


@pytest.fixture
def real_weights(shared_weights, monkeypatch) -> Path:
    """Point the search path at the real TAEF2/TAESana weights in ../shared/weights."""
    monkeypatch.setenv(weights_mod.ENV_VAR, str(shared_weights))
    return shared_weights


class Cli:
    """Runs `vae` in-process through Typer's CliRunner, with stdout and stderr kept apart."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args, input: str | None = None):
        return self.runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture
def vae() -> Cli:
    return Cli()


@pytest.fixture
def small_image(tmp_path, shared_images) -> Path:
    """A 61x45 RGB crop of chelsea.png (sizes not multiples of 8) for fast CLI runs."""
    img = Image.open(shared_images / "chelsea.png").convert("RGB").crop((180, 60, 241, 105))
    path = tmp_path / "small.png"
    img.save(path)
    return path


def make_image(path: Path, size=(40, 24), mode="RGB", seed=0) -> Path:
    """Write a smooth random test image of `size` (W, H) in `mode`."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.random((h // 4 + 1, w // 4 + 1, 3))
    arr = (np.kron(base, np.ones((4, 4, 1)))[:h, :w] * 255).astype(np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path)
    return path


def deny_reads_of(path: Path, monkeypatch) -> None:
    """Make file `path` unreadable: chmod for an ordinary user; as root (who ignores modes) refuse opening it."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    import builtins

    real = builtins.open

    def deny(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == path.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)


def deny_listing_of(folder: Path, monkeypatch) -> None:
    """Make `folder` unlistable: chmod for an ordinary user; as root (who ignores modes) refuse scanning it."""
    if os.geteuid() != 0:
        folder.chmod(0)
        return
    real = os.scandir

    def deny(path="."):
        if Path(path).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", deny)


def deny_search_of(folder: Path, monkeypatch) -> None:
    """Make the paths inside `folder` unreachable (no search permission on it): chmod for an ordinary user; as root
    (who ignores modes) refuse stat and open of them."""
    if os.geteuid() != 0:
        folder.chmod(0o600)
        return
    import builtins

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).parent == folder.absolute()

    def denying(real):
        def deny(path, *args, **kwargs):
            if inside(path):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)
        return deny

    for module, name in ((os, "stat"), (os, "lstat"), (builtins, "open")):
        monkeypatch.setattr(module, name, denying(getattr(module, name)))


@pytest.fixture(scope="session")
def random_taesd(tmp_path_factory) -> Path:
    """A diffusers AutoencoderTiny (taesd config) with seeded random weights, saved in both layouts.

    Returns a folder holding `diffusers/` (config.json + diffusion_pytorch_model.safetensors) and
    `original/` (taesd_encoder.pth + taesd_decoder.pth in taesd.py's key names).
    """
    from diffusers import AutoencoderTiny

    root = tmp_path_factory.mktemp("random-taesd")
    torch.manual_seed(0)
    model = AutoencoderTiny(latent_channels=4).eval()
    # Perturb the default init so every parameter (biases too) is exercised with non-trivial values.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(root / "diffusers")
    sd = model.state_dict()
    enc = {k.removeprefix("encoder.layers."): v for k, v in sd.items() if k.startswith("encoder.")}
    dec = {}
    for k, v in sd.items():
        if k.startswith("decoder.layers."):
            idx, rest = k.removeprefix("decoder.layers.").split(".", 1)
            dec[f"{int(idx) + 1}.{rest}"] = v
    (root / "original").mkdir()
    torch.save(enc, root / "original" / "taesd_encoder.pth")
    torch.save(dec, root / "original" / "taesd_decoder.pth")
    return root


def diffusers_kl(name: str, seed: int = 0):
    """A diffusers reference model for registry entry `name` at its production channel configuration,
    with seeded random weights (FLUX.2: random batch-norm statistics too)."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLTemporalDecoder

    from vaecli.registry import REGISTRY

    cfg = REGISTRY[name].config
    widths = tuple(cfg.channels * m for m in cfg.channel_mult)
    torch.manual_seed(seed)
    common = dict(block_out_channels=widths, latent_channels=cfg.latent_channels, layers_per_block=cfg.num_res_blocks,
                  use_quant_conv=cfg.quant_conv, use_post_quant_conv=cfg.quant_conv)
    if cfg.temporal_decoder:
        del common["use_quant_conv"], common["use_post_quant_conv"]
        model = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * len(widths), **common)
    elif cfg.batch_norm:
        model = AutoencoderKLFlux2(**common)
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    else:
        n = len(widths)
        model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                              scaling_factor=REGISTRY[name].scaling_factor,
                              shift_factor=REGISTRY[name].shift_factor, **common)
    with torch.no_grad():  # non-trivial GroupNorm affines, so a swapped norm would show
        for key, p in model.named_parameters():
            if "norm" in key or "mix_factor" in key:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def kl_files(tmp_path_factory):
    """Factory: random-weight checkpoints for a KL registry entry, in diffusers and original layouts.

    Returns {"diffusers": folder, "ldm": bare LDM/BFL file, "full": full-checkpoint file with the
    `first_stage_model.` prefix, saved in fp16}; made once per model name.
    """
    from safetensors.torch import save_file

    from vaecli.checkpoints import kl_state_dict

    made: dict = {}

    def make(name: str) -> dict:
        if name not in made:
            root = tmp_path_factory.mktemp(f"kl-{name}")
            model = diffusers_kl(name)
            model.save_pretrained(root / "diffusers")
            ldm = kl_state_dict(model.state_dict(), len(model.config.block_out_channels), "test")
            save_file({k: v.contiguous() for k, v in ldm.items()}, str(root / "ldm.safetensors"))
            full = {f"first_stage_model.{k}": v.half().contiguous() if v.is_floating_point() else v
                    for k, v in ldm.items()}
            full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4)
            save_file(full, str(root / "full.safetensors"))
            made[name] = {"diffusers": root / "diffusers", "ldm": root / "ldm.safetensors",
                          "full": root / "full.safetensors", "reference": model}
        return made[name]

    return make


@pytest.fixture
def clip_latent(vae, real_weights, gif, tmp_path):
    """A 2-frame taef2 latent video of the test GIF, `tmp_path/work/clip.latent`."""
    lat = tmp_path / "work" / "clip.latent"
    result = vae("video", gif, "-o", lat, "--frames", 2)
    assert result.exit_code == 0, result.stderr
    return lat


@pytest.fixture
def nan_decoder(monkeypatch):
    """Every codec's decode gives one NaN pixel (3 values), as an overflow would, whatever the weights."""
    from vaecli.codec import Codec

    decode = Codec.decode_latent

    def overflowing(self, latent, meta):
        pixels = decode(self, latent, meta)
        pixels[..., 0, 0] = float("nan")
        return pixels

    monkeypatch.setattr(Codec, "decode_latent", overflowing)


def default_sigint() -> None:
    """A subprocess' preexec_fn: SIGINT handled as by default. A shell's background jobs (a CI script run with `&`)
    inherit SIGINT ignored, and so would the `vae` a test interrupts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
