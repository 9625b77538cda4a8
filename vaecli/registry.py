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
    """One weights file a model needs: its role (`encoder`/`decoder`/`vae`), the name vaecli searches for, its known
    checksum, and where it is published (a Hugging Face `repo` and `path_in_repo`, or only a download `url`)."""

    role: str
    name: str
    sha256: str | None = None  # None: no published checksum known to vaecli, so it cannot be verified
    size: int | None = None
    url: str = ""  # where to download it by hand
    repo: str = ""  # Hugging Face model repository that publishes it ("" : not on the hub, `url` only)
    path_in_repo: str = ""  # its path there; a pulled file is stored under `name` whatever this is


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


Flags = tuple[bool, bool, bool]


@dataclass(frozen=True)
class TAEHVConfig:
    """Shape of a TAEHV network: frames (N, T, 3, H, W) in [0, 1] <-> latents (N, T', C, H/f, W/f), f = 8 * patch."""

    latent_channels: int = 16
    patch_size: int = 1  # pixel (un)shuffle around the network
    encoder_time_downscale: Flags = (True, True, False)  # per encoder stage: TPool stride 2 or 1
    decoder_time_upscale: Flags = (False, True, True)  # per decoder stage: TGrow stride 2 or 1 (1: cheaper preview)
    decoder_space_upscale: Flags = (True, True, True)  # per decoder stage: 2x or 1x spatially (1x: preview)
    arch: str = "base"  # "super": ConvNeXt-style decoder with about twice the parameters
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] | None = None  # None: the published widths for `arch`
    cogvideox_trim: bool = False  # taecvx: the startup frames are kept when the latent count is even

    def __post_init__(self):
        if self.arch not in ("base", "super"):
            raise ValueError(f"unknown TAEHV decoder arch {self.arch!r} (base, super)")
        if self.decoder_widths is None:
            widths = (512, 256, 128, 64) if self.arch == "super" else (256, 128, 64, 64)
            object.__setattr__(self, "decoder_widths", widths)

    @property
    def t_downscale(self) -> int:
        """Input frames per latent frame."""
        return 2 ** sum(self.encoder_time_downscale)

    @property
    def t_upscale(self) -> int:
        """Decoder output frames per latent frame, before the startup trim."""
        return 2 ** sum(self.decoder_time_upscale)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (with every spatial upscale on)."""
        return 8 * self.patch_size

    def latent_frames(self, n_frames: int) -> int:
        """Latent frames for `n_frames` input frames: ceil(T / t_downscale), the tail padded with the last frame."""
        return -(-n_frames // self.t_downscale)

    def frames_to_trim(self, n_latents: int | None = None) -> int:
        """Startup frames dropped from the front of the decoder's output for a clip of `n_latents` latents."""
        # The first latent stands for one frame (4k+1 frame clips), but TGrow makes t_upscale of it: all but the last
        # precede the clip. taecvx keeps them for even counts; with the count unknown (a stream) it keeps them too,
        # as the reference's StreamingTAEHV does.
        if self.cogvideox_trim and (n_latents is None or n_latents % 2 == 0):
            return 0
        return self.t_upscale - 1

    def decoded_frames(self, n_latents: int) -> int:
        """Output frames for `n_latents` latent frames: n * t_upscale - frames_to_trim(n), e.g. 21 -> 81 for Wan."""
        return max(0, n_latents * self.t_upscale - self.frames_to_trim(n_latents))

    def frame_rule(self, n_frames: int) -> tuple[int, int]:
        """(latent frames, frames a round trip gives back) for a clip of `n_frames`; equal for T = k * t_down + 1."""
        # Other lengths come back shorter or longer: the padded tail shares the last latent, e.g. Wan 8 -> 2 -> 5.
        n_latents = self.latent_frames(n_frames)
        return n_latents, self.decoded_frames(n_latents)


# Per-channel statistics of the 48 latent channels, as Wan 2.2's own VAE code (vae2_2.py) publishes them.
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
              -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
              -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
              -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
              0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
             0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
             0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
             0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
             0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan VAE (diffusers' `AutoencoderKLWan` config names) and its latent statistics."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    decoder_base_dim: int | None = None  # None: base_dim
    is_residual: bool = False  # Wan 2.2: down/up blocks with parameter-free shortcuts
    patch_size: int = 1  # Wan 2.2: pixels folded 2x2 into channels before the encoder
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    @property
    def latent_channels(self) -> int:
        """Channels of a latent frame."""
        return self.z_dim

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (8 for Wan 2.1, 16 for Wan 2.2 5B)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size


WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
WAN21_CONFIG = WanConfig(latents_mean=WAN21_MEAN, latents_std=WAN21_STD)  # Wan 2.1, 2.2 14B, Qwen-Image
WAN22_CONFIG = WanConfig(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2,
                  latents_mean=WAN22_MEAN, latents_std=WAN22_STD)  # Wan 2.2 TI2V 5B


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: everything vaecli knows about one model, none of it read from disk."""

    name: str
    family: str
    description: str
    config: TinyConfig | KLConfig | WanConfig | TAEHVConfig
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
    # "normalized" space of the video families: (raw - latents_mean) / latents_std per channel, as diffusers' Wan
    # pipelines give the denoiser (FLUX.2's normalized space uses its batch-norm statistics instead).
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()
    temporal_factor: int = 1  # causal video families: input frames per latent frame (a clip is 1 + factor * k)

    @property
    def spaces(self) -> tuple[str, ...]:
        """Latent spaces this model can write: its default first, then "raw", then (FLUX.2) "normalized"."""
        if self.latent_space == "native":
            return ("native",)
        extra = ("normalized",) if getattr(self.config, "batch_norm", False) else ()
        return tuple(dict.fromkeys((self.latent_space, "raw", *extra)))

    @property
    def normalized_patch(self) -> int:
        """Side of the patches folded into channels in the "normalized" space (FLUX.2: 2; else 1)."""
        return self.config.patch_size if getattr(self.config, "batch_norm", False) else 1

    @property
    def can_normalize(self) -> bool:
        """Whether this model knows a "normalized" space (batch-norm statistics or per-channel mean and std)."""
        return bool(getattr(self.config, "batch_norm", False) or self.latents_mean)

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



HF = "https://huggingface.co/"


def _hub_file(name: str, repo: str, path_in_repo: str = "") -> WeightFile:
    """The single "vae" file `name`, published as `path_in_repo` (default: `name`) in the hub repository `repo`."""
    path_in_repo = path_in_repo or name
    return WeightFile("vae", name, url=f"{HF}{repo}/resolve/main/{path_in_repo}", repo=repo,
                      path_in_repo=path_in_repo)


def _kl(name: str, description: str, cfg: KLConfig, file: str, repo: str, path_in_repo: str = "",
        family: str = "kl", **conventions) -> ModelSpec:
    return ModelSpec(name=name, family=family, description=description, config=cfg,
                     weights=(_hub_file(file, repo, path_in_repo),), pixel_range=(-1.0, 1.0), **conventions)


SD_VAE = KLConfig(latent_channels=4)
DIFFUSERS_VAE = "vae/diffusion_pytorch_model.safetensors"  # the VAE of a diffusers pipeline repository
REGISTRY.update({
    "sd15": _kl("sd15", "SD 1.x VAE (sd-vae-ft-mse)", SD_VAE, "vae-ft-mse-840000-ema-pruned.safetensors",
                "stabilityai/sd-vae-ft-mse-original", **SD_SCALING),
    "sd21": _kl("sd21", "SD 2.x VAE (sd-vae-ft-ema)", SD_VAE, "vae-ft-ema-560000-ema-pruned.safetensors",
                "stabilityai/sd-vae-ft-ema-original", **SD_SCALING),
    "sdxl": _kl("sdxl", "SDXL VAE (decodes in fp32: fp16 overflows)", SD_VAE, "sdxl_vae.safetensors",
                "stabilityai/sdxl-vae", force_upcast=True, **SDXL_SCALING),
    "sdxl-fp16-fix": _kl("sdxl-fp16-fix", "SDXL VAE fine-tuned to run in fp16", SD_VAE, "sdxl.vae.safetensors",
                         "madebyollin/sdxl-vae-fp16-fix", **SDXL_SCALING),
    "sd3": _kl("sd3", "SD3 / SD3.5 VAE (16 ch)", KLConfig(latent_channels=16, quant_conv=False),
               "sd3_vae.safetensors", "stabilityai/stable-diffusion-3-medium-diffusers", DIFFUSERS_VAE,
               **SD3_SCALING),
    "flux1": _kl("flux1", "FLUX.1 autoencoder (16 ch)", KLConfig(latent_channels=16, quant_conv=False),
                 "ae.safetensors", "black-forest-labs/FLUX.1-schnell", **FLUX1_SCALING),
    "svd": _kl("svd", "Stable Video Diffusion VAE (temporal decoder mixes frames)",
               KLConfig(latent_channels=4, post_quant_conv=False, temporal_decoder=True), "svd_vae.safetensors",
               "stabilityai/stable-video-diffusion-img2vid-xt", DIFFUSERS_VAE, family="svd", **SD_SCALING),
    "flux2": _kl("flux2", "FLUX.2 autoencoder (32 ch; --latent-space normalized: 2x2 patches, batch-norm)",
                 KLConfig(latent_channels=32, batch_norm=True, patch_size=2), "flux2_ae.safetensors",
                 "black-forest-labs/FLUX.2-dev", "ae.safetensors", **FLUX2_SCALING),
})

WAN21_SPACE = {"latent_space": "normalized", "latent_family": "Wan 2.1", "latents_mean": WAN21_MEAN,
               "latents_std": WAN21_STD, "temporal_factor": 4}
WAN22_SPACE = {"latent_space": "normalized", "latent_family": "Wan 2.2 (48 ch)", "latents_mean": WAN22_MEAN,
               "latents_std": WAN22_STD, "temporal_factor": 4}
HUNYUAN_SCALING = {"latent_space": "scaled", "scaling_factor": 0.476986, "latent_family": "HunyuanVideo",
                   "temporal_factor": 4}
COGVIDEOX_SCALING = {"latent_space": "scaled", "scaling_factor": 0.7, "latent_family": "CogVideoX",
                     "temporal_factor": 4}
TAEHV_URL = "https://github.com/madebyollin/taehv/raw/main/{name}"


def _wan(name: str, description: str, cfg: WanConfig, file: str, repo: str, path_in_repo: str = "",
         **conventions) -> ModelSpec:
    return ModelSpec(name=name, family="wan", description=description, config=cfg,
                     weights=(_hub_file(file, repo, path_in_repo),), pixel_range=(-1.0, 1.0), **conventions)


def _taehv(name: str, description: str, cfg: TAEHVConfig, **conventions) -> ModelSpec:
    return ModelSpec(name=name, family="taehv", description=description, config=cfg,
                     weights=(WeightFile("vae", f"{name}.pth", url=TAEHV_URL.format(name=f"{name}.pth")),),
                     **conventions)


TAEHV_BASE = TAEHVConfig()
REGISTRY.update({
    "wan2.1": _wan("wan2.1", "Wan 2.1 causal video VAE (16 ch, 8x, 4x in time; also Wan 2.2 14B)", WAN21_CONFIG,
                   "Wan2.1_VAE.pth", "Wan-AI/Wan2.1-T2V-14B", **WAN21_SPACE),
    "wan2.2": _wan("wan2.2", "Wan 2.2 TI2V-5B video VAE (48 ch, 16x, 4x in time)", WAN22_CONFIG,
                   "Wan2.2_VAE.pth", "Wan-AI/Wan2.2-TI2V-5B", **WAN22_SPACE),
    "qwen-image": _wan("qwen-image", "Qwen-Image VAE (Wan 2.1's, decoder fine-tuned; images are 1-frame clips)",
                       WAN21_CONFIG, "qwen_image_vae.safetensors", "Qwen/Qwen-Image", DIFFUSERS_VAE, **WAN21_SPACE),
    "taew2_1": _taehv("taew2_1", "Tiny video autoencoder for Wan 2.1 latents", TAEHV_BASE, **WAN21_SPACE),
    "taew2_2": _taehv("taew2_2", "Tiny video autoencoder for Wan 2.2 5B latents (48 ch)",
                      TAEHVConfig(latent_channels=48, patch_size=2), **WAN22_SPACE),
    "taehv": _taehv("taehv", "Tiny video autoencoder for HunyuanVideo latents", TAEHV_BASE, **HUNYUAN_SCALING),
    "taecvx": _taehv("taecvx", "Tiny video autoencoder for CogVideoX latents", TAEHVConfig(cogvideox_trim=True),
                     **COGVIDEOX_SCALING),
    "taesdv": ModelSpec(
        name="taesdv", family="taesdv", description="Tiny video autoencoder for SVD latents (frame by frame, causal)",
        config=TinyConfig(latent_channels=4),
        weights=(WeightFile("vae", "taesdv.pth", url="https://github.com/madebyollin/taesdv/raw/main/taesdv.pth"),),
        **SD_SCALING),
})

DEFAULT_MODEL = "taef2"


def manifest_lines() -> list[str]:
    """Rows of `weights/manifest.tsv`: file name, sha256, size, URL, model, role and hub repository and path, for every
    known weights file."""
    rows = ["# name\tsha256\tsize\turl\tmodel\trole\trepo\tpath_in_repo"]
    for spec in REGISTRY.values():
        for w in spec.weights:
            rows.append("\t".join([w.name, w.sha256 or "-", str(w.size) if w.size else "-", w.url,
                                   spec.name, w.role, w.repo or "-", w.path_in_repo or "-"]))
    return rows
