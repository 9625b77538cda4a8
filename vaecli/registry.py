"""The model registry: one `ModelSpec` per name, holding config, latent conventions and weight files.

This module imports no torch so that `vae --help` and `vae models` start fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TAESD_URL = "https://github.com/madebyollin/taesd/raw/main/{name}"


@dataclass(frozen=True)
class WeightFile:
    """One weights file a model needs: its role (`encoder`/`decoder`), file name and known checksum."""

    role: str
    name: str
    sha256: str | None = None  # None: no published checksum known to vaecli, so it cannot be verified
    size: int | None = None
    url: str = ""


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of a TAESD-family tiny autoencoder (see `vaecli.models.tiny`)."""

    latent_channels: int
    width: int = 64
    midblock_gn: bool = False  # TAEF2: a 1x1-conv/GroupNorm branch in the three blocks at latent resolution
    encoder_stem: tuple[int, ...] = ()  # widths of extra stride-2 conv+ReLU stages before the first block (TAESana)
    has_decoder: bool = True

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 8 * 2 ** len(self.encoder_stem)


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: everything vaecli knows about one model, none of it read from disk."""

    name: str
    family: str
    description: str
    config: TinyConfig
    weights: tuple[WeightFile, ...]
    # What a saved latent holds: "native" = exactly what the tiny model produces, which for the
    # TAESD family is already the space the diffusion model consumes.
    latent_space: str = "native"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    pixel_range: tuple[float, float] = (0.0, 1.0)  # what the network itself consumes and produces
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent tensor."""
        return self.config.latent_channels

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return self.config.spatial_factor

    def weight(self, role: str) -> WeightFile | None:
        """The weights file for `role` ("encoder" or "decoder"), or None if the model has none."""
        return next((w for w in self.weights if w.role == role), None)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """Latent (C, h, w) for an image of `width` x `height` pixels (padded up to the spatial factor)."""
        f = self.spatial_factor
        return (self.latent_channels, -(-height // f), -(-width // f))


def _tiny_weights(prefix: str, *, encoder_sha: str | None = None, decoder_sha: str | None = None,
                  encoder_size: int | None = None, decoder_size: int | None = None,
                  decoder: bool = True) -> tuple[WeightFile, ...]:
    files = [WeightFile("encoder", f"{prefix}_encoder.pth", encoder_sha, encoder_size,
                        TAESD_URL.format(name=f"{prefix}_encoder.pth"))]
    if decoder:
        files.append(WeightFile("decoder", f"{prefix}_decoder.pth", decoder_sha, decoder_size,
                                TAESD_URL.format(name=f"{prefix}_decoder.pth")))
    return tuple(files)


REGISTRY: dict[str, ModelSpec] = {
    "taesd": ModelSpec(
        name="taesd", family="tiny", description="Tiny autoencoder for SD 1.x/2.x latents",
        config=TinyConfig(latent_channels=4), weights=_tiny_weights("taesd"),
    ),
    "taesdxl": ModelSpec(
        name="taesdxl", family="tiny", description="Tiny autoencoder for SDXL latents",
        config=TinyConfig(latent_channels=4), weights=_tiny_weights("taesdxl"),
    ),
    "taesd3": ModelSpec(
        name="taesd3", family="tiny", description="Tiny autoencoder for SD3 latents",
        config=TinyConfig(latent_channels=16), weights=_tiny_weights("taesd3"),
    ),
    "taef1": ModelSpec(
        name="taef1", family="tiny", description="Tiny autoencoder for FLUX.1 latents",
        config=TinyConfig(latent_channels=16), weights=_tiny_weights("taef1"),
    ),
    "taef2": ModelSpec(
        name="taef2", family="tiny", description="Tiny autoencoder for FLUX.2 latents (unpatchified, 32 ch)",
        config=TinyConfig(latent_channels=32, midblock_gn=True),
        weights=_tiny_weights(
            "taef2",
            encoder_sha="10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6", encoder_size=2704692,
            decoder_sha="0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5", decoder_size=2704756,
        ),
    ),
    "taesana": ModelSpec(
        name="taesana", family="tiny", description="Tiny encoder for Sana DC-AE latents (32x spatial)",
        config=TinyConfig(latent_channels=32, encoder_stem=(32, 64), has_decoder=False),
        weights=_tiny_weights(
            "taesana",
            encoder_sha="858f4e4cc293f88efaf58107f4154b960b9ced0cb5d9c050dad11f926b618c1f", encoder_size=2537004,
            decoder=False,
        ),
        notes="encoder only: no decoder weights are published",
    ),
}

DEFAULT_MODEL = "taef2"


def manifest_lines() -> list[str]:
    """Rows of `weights/manifest.tsv`: file name, sha256, size, URL and model, for every known weights file."""
    rows = ["# name\tsha256\tsize\turl\tmodel\trole"]
    for spec in REGISTRY.values():
        for w in spec.weights:
            rows.append("\t".join([w.name, w.sha256 or "-", str(w.size) if w.size else "-", w.url,
                                   spec.name, w.role]))
    return rows
