"""The model registry: one `ModelSpec` per name, holding config, latent conventions and weight files.

This module imports no torch so that `vae --help` and `vae models` start fast.
"""

from __future__ import annotations

from dataclasses import dataclass

TAESD_URL = "https://github.com/madebyollin/taesd/raw/main/{name}"

# Latent conventions (diffusers' scaling_factor, shift_factor), shared by each KL model and its tiny twin.
# `latent_family` names the latent space itself: a latent decodes with any model of its family, and only those.
SD_SCALING = {"latent_space": "scaled", "scaling_factor": 0.18215, "latent_family": "SD 1.x/2.x"}
SDXL_SCALING = {"latent_space": "scaled", "scaling_factor": 0.13025, "latent_family": "SDXL"}
SD3_SCALING = {"latent_space": "scaled", "scaling_factor": 1.5305, "shift_factor": 0.0609, "latent_family": "SD3"}
FLUX1_SCALING = {"latent_space": "scaled", "scaling_factor": 0.3611, "shift_factor": 0.1159,
                 "latent_family": "FLUX.1"}
FLUX2_SCALING = {"latent_space": "raw", "latent_family": "FLUX.2"}  # the denoiser's normalization is opt-in


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

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 8 * 2 ** len(self.encoder_stem)


@dataclass(frozen=True)
class KLConfig:
    """Architecture of an LDM-lineage KL autoencoder (see `vaecli.models.kl`)."""

    latent_channels: int
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    quant_conv: bool = True  # SD 1/2/XL and FLUX.2 have 1x1 quant/post-quant convs; SD3 and FLUX.1 do not
    post_quant_conv: bool | None = None  # None: same as quant_conv (SVD has a quant_conv only)
    batch_norm: bool = False  # FLUX.2: batch-norm statistics of the patchified latents
    patch_size: int = 1
    batch_norm_eps: float = 1e-4
    temporal_decoder: bool = False  # SVD: the decoder mixes information across frames

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: everything vaecli knows about one model, none of it read from disk."""

    name: str
    family: str
    description: str
    config: TinyConfig | KLConfig
    weights: tuple[WeightFile, ...]
    # The latent space the model writes by default (and a tiny decoder reads): "scaled" = diffusers'
    # (posterior_mean - shift) * scale, the space the denoiser consumes; "raw" = the KL posterior itself;
    # "native" = a space vaecli cannot convert (TAESana). Tiny models produce their family's denoiser space.
    latent_space: str = "native"
    latent_family: str = ""  # models sharing a latent space (a KL model and its tiny twin); "" only its own
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    pixel_range: tuple[float, float] = (0.0, 1.0)  # what the network itself consumes and produces
    force_upcast: bool = False  # fp16 overflows in the reference weights: decode in fp32 unless told otherwise
    notes: str = ""

    @property
    def spaces(self) -> tuple[str, ...]:
        """Latent spaces this model can write: its default first, then "raw", then (FLUX.2) "normalized"."""
        if self.latent_space == "native":
            return ("native",)
        extra = ("normalized",) if getattr(self.config, "batch_norm", False) else ()
        return tuple(dict.fromkeys((self.latent_space, "raw", *extra)))

    @property
    def latent_channels(self) -> int:
        """Channels of the latent tensor."""
        return self.config.latent_channels

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return self.config.spatial_factor

    @property
    def has_decoder(self) -> bool:
        """Whether decoder weights exist for this model at all."""
        return self.weight("decoder") is not None

    def weight(self, role: str) -> WeightFile | None:
        """The weights file holding `role` ("encoder" or "decoder"; a "vae" file holds both), or None."""
        return next((w for w in self.weights if w.role in (role, "vae")), None)

    def shares_latents(self, other: ModelSpec) -> bool:
        """Whether latents made by `other` are in this model's latent space (same family, or the same model)."""
        return other.name == self.name or bool(self.latent_family) and other.latent_family == self.latent_family

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
        config=TinyConfig(latent_channels=4), weights=_tiny_weights("taesd"), **SD_SCALING,
    ),
    "taesdxl": ModelSpec(
        name="taesdxl", family="tiny", description="Tiny autoencoder for SDXL latents",
        config=TinyConfig(latent_channels=4), weights=_tiny_weights("taesdxl"), **SDXL_SCALING,
    ),
    "taesd3": ModelSpec(
        name="taesd3", family="tiny", description="Tiny autoencoder for SD3 latents",
        config=TinyConfig(latent_channels=16), weights=_tiny_weights("taesd3"), **SD3_SCALING,
    ),
    "taef1": ModelSpec(
        name="taef1", family="tiny", description="Tiny autoencoder for FLUX.1 latents",
        config=TinyConfig(latent_channels=16), weights=_tiny_weights("taef1"), **FLUX1_SCALING,
    ),
    "taef2": ModelSpec(
        name="taef2", family="tiny", description="Tiny autoencoder for FLUX.2 latents (unpatchified, 32 ch)",
        config=TinyConfig(latent_channels=32, midblock_gn=True), **FLUX2_SCALING,
        weights=_tiny_weights(
            "taef2",
            encoder_sha="10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6", encoder_size=2704692,
            decoder_sha="0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5", decoder_size=2704756,
        ),
    ),
    "taesana": ModelSpec(
        name="taesana", family="tiny", description="Tiny encoder for Sana DC-AE latents (32x spatial)",
        config=TinyConfig(latent_channels=32, encoder_stem=(32, 64)), latent_family="Sana DC-AE",
        weights=_tiny_weights(
            "taesana",
            encoder_sha="858f4e4cc293f88efaf58107f4154b960b9ced0cb5d9c050dad11f926b618c1f", encoder_size=2537004,
            decoder=False,
        ),
        notes="encoder only: no decoder weights are published",
    ),
}



def _kl(name: str, description: str, cfg: KLConfig, file: str, url: str, **conventions) -> ModelSpec:
    return ModelSpec(name=name, family="kl", description=description, config=cfg,
                     weights=(WeightFile("vae", file, url=url),), pixel_range=(-1.0, 1.0), **conventions)


SD_VAE = KLConfig(latent_channels=4)
HF = "https://huggingface.co/"
REGISTRY.update({
    "sd15": _kl("sd15", "SD 1.x VAE (sd-vae-ft-mse)", SD_VAE, "vae-ft-mse-840000-ema-pruned.safetensors",
                HF + "stabilityai/sd-vae-ft-mse-original", **SD_SCALING),
    "sd21": _kl("sd21", "SD 2.x VAE (sd-vae-ft-ema)", SD_VAE, "vae-ft-ema-560000-ema-pruned.safetensors",
                HF + "stabilityai/sd-vae-ft-ema-original", **SD_SCALING),
    "sdxl": _kl("sdxl", "SDXL VAE (decodes in fp32: fp16 overflows)", SD_VAE, "sdxl_vae.safetensors",
                HF + "stabilityai/sdxl-vae", force_upcast=True, **SDXL_SCALING),
    "sdxl-fp16-fix": _kl("sdxl-fp16-fix", "SDXL VAE fine-tuned to run in fp16", SD_VAE, "sdxl.vae.safetensors",
                         HF + "madebyollin/sdxl-vae-fp16-fix", **SDXL_SCALING),
    "sd3": _kl("sd3", "SD3 / SD3.5 VAE (16 ch)", KLConfig(latent_channels=16, quant_conv=False),
               "sd3_vae.safetensors", HF + "stabilityai/stable-diffusion-3-medium-diffusers", **SD3_SCALING),
    "flux1": _kl("flux1", "FLUX.1 autoencoder (16 ch)", KLConfig(latent_channels=16, quant_conv=False),
                 "ae.safetensors", HF + "black-forest-labs/FLUX.1-schnell", **FLUX1_SCALING),
    "svd": _kl("svd", "Stable Video Diffusion VAE (temporal decoder mixes frames)",
               KLConfig(latent_channels=4, post_quant_conv=False, temporal_decoder=True), "svd_vae.safetensors",
               HF + "stabilityai/stable-video-diffusion-img2vid-xt", **SD_SCALING),
    "flux2": _kl("flux2", "FLUX.2 autoencoder (32 ch; --latent-space normalized: 2x2 patches, batch-norm)",
                 KLConfig(latent_channels=32, batch_norm=True, patch_size=2), "flux2_ae.safetensors",
                 HF + "black-forest-labs/FLUX.2-dev", **FLUX2_SCALING),
})

DEFAULT_MODEL = "taef2"


def manifest_lines() -> list[str]:
    """Rows of `weights/manifest.tsv`: file name, sha256, size, URL and model, for every known weights file."""
    rows = ["# name\tsha256\tsize\turl\tmodel\trole"]
    for spec in REGISTRY.values():
        for w in spec.weights:
            rows.append("\t".join([w.name, w.sha256 or "-", str(w.size) if w.size else "-", w.url,
                                   spec.name, w.role]))
    return rows
