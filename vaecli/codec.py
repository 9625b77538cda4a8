"""The codec pipeline: a registry model with its weights loaded, turning pixels into latents and back.

`Codec` holds what the image families share; each family's module subclasses it (see `vaecli.families`).

Knows nothing of the CLI; every user-facing failure is a `VaeError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from vaecli import media, tiling
from vaecli.batch import check_at_least_one
from vaecli.checkpoints import load_strict, model_state_dict, read_weights
from vaecli.errors import LatentFormatError, UsageError, WeightsError
from vaecli.families import family
from vaecli.latents import latent_channels, latent_factor, layout_problem, make_metadata
from vaecli.registry import REGISTRY, ModelSpec
from vaecli.spaces import DTYPES, check_encode_space, dtype_name, from_network, to_network
from vaecli.weights import find_on_search_path, load_state_dict

MAX_CLIP_CHUNK = 64  # frames per pass when they are small: more only holds more frames, it is not faster


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or a UsageError listing the known names."""
    if name not in REGISTRY:
        raise UsageError(f"unknown model '{name}': expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda, then mps, then cpu; an explicit device that is not available is a UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device '{name}': expected auto, cpu, cuda or mps")
    return torch.device(name)


@dataclass
class Codec:
    """A loaded image model on a device, ready to encode (B, 3, H, W) pixels in [0, 1] and decode latents.

    Each image family subclasses it (its `Family`, see `vaecli.families`) with how it runs its halves (`encode_raw`,
    `decode_raw`), tiles them (`tile_size`, `frame_bytes`, `verify_tiling`) and which latent space its network works
    in (`network_space`); what every family shares (padding, latent spaces, metadata, clips) is here.
    """

    spec: ModelSpec
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    tile: int | str | None = "auto"  # "auto": from `budget`; None: never; N: tiles of N pixels
    budget: int = 0  # bytes for activations; 0: half of the memory available when used
    memory_format: torch.memory_format = torch.channels_last
    sources: tuple[str, ...] = ()  # the weight files loaded (already verified), for workers to load the same
    scratch_dir: str | None = None  # where layers past the budget go (None: the system's temporary folder)
    scratch_bytes: int = 0  # the most scratch-file space an encode or decode has used so far

    posterior: ClassVar[bool] = False  # whether the encoder gives a distribution to draw from (--sample)
    batch_pixels: ClassVar[int] = 1 << 21  # pixels one forward pass may take at once on an accelerator

    # --- the family interface ------------------------------------------------------------------------------------

    @staticmethod
    def build(spec: ModelSpec, encoder: bool = True, decoder: bool = True) -> torch.nn.Module:
        """An uninitialised network for `spec` with the requested halves."""
        raise NotImplementedError

    @staticmethod
    def state_dict(spec: ModelSpec, sd: dict, source: str) -> dict:
        """A checkpoint's tensors in any layout known for the family, in the network's keys."""
        raise NotImplementedError

    @classmethod
    def network_memory_format(cls, device: torch.device) -> torch.memory_format:
        """The layout the network's convolutions run in on `device`."""
        # channels_last: oneDNN's fast conv layout on CPU (~1.8x here) and cuDNN's for the tiny family.
        return torch.channels_last

    @property
    def network_space(self) -> str:
        """The latent space the network itself produces and consumes (a KL posterior's: raw)."""
        return "raw"

    def encode_raw(self, x: torch.Tensor, sample: bool, seed: int | None) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] (padded to the spatial factor) -> (B, C, h, w) latents in `network_space`."""
        raise NotImplementedError

    def decode_raw(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """(B, C, h, w) latents in `network_space` -> (B, 3, H, W) pixels in [0, 1]."""
        raise NotImplementedError

    def tile_size(self, pixels: int, batch: int = 1) -> int | None:
        """Tile side in pixels for a forward pass over `batch` images of `pixels` pixels, or None to run it whole
        (or as the family streams by itself)."""
        return None

    def frame_bytes(self, width: int, height: int) -> tuple[int, int]:
        """Bytes a `width` x `height` frame needs run whole, and the budget frames share."""
        raise NotImplementedError

    def verify_tiling(self, latent: torch.Tensor, meta: dict, pixels: torch.Tensor) -> dict:
        """`--verify` of a (C, h, w) latent decoded to (1, 3, H, W) `pixels`: its largest difference from the exact
        result computed another way, and which part was compared."""
        raise NotImplementedError

    @property
    def mixes_frames(self) -> bool:
        """Whether the decoder mixes the frames of a clip (SVD): a clip is then decoded as a whole, never per frame."""
        return False

    def reference_frames(self, read, frames: int, meta: dict) -> tuple[Iterator[torch.Tensor], str] | None:
        """`--verify` of a latent clip, `read(i, j)` giving latent frames i .. j: the exact reference frames computed
        another way, as (k, 3, H, W) chunks in order, and what they are; None where the frames are checked one by one
        (`verify_tiling`)."""
        return None

    # --- shared by every image family ----------------------------------------------------------------------------

    def frames_per_pass(self, size: tuple[int, int]) -> int:
        """Video frames of `size` (W, H) to encode or decode together: as many as run whole within the budget, at
        least one (a frame too large alone is tiled); never changes the numbers."""
        per_frame, budget = self.frame_bytes(*size)
        return max(1, min(MAX_CLIP_CHUNK, budget // max(1, per_frame)))

    def streams_frames(self, size: tuple[int, int]) -> bool:
        """Whether latent frames of clips of `size` (W, H) decode as they come (not SVD: its clip decodes whole)."""
        return not self.mixes_frames

    def lead_frames(self, n_latents: int | None = None) -> int:
        """Frames a clip's decode gives before the frame its first latent stands for: none here, one per latent."""
        return 0

    @property
    def max_batch_pixels(self) -> int:
        """Pixels one forward pass may take at once (0: one image per pass).

        On CPU one image per pass: as fast there, and oneDNN's blocking follows the batch size (~3e-6 apart), so
        an image's latent would otherwise depend on its batch-mates; per image, a resumed run or the Ray engine
        writes the same bits as a fresh local run.
        """
        return 0 if self.device.type == "cpu" else self.batch_pixels

    @property
    def dtype_name(self) -> str:
        """The compute dtype's short name (fp32/fp16/bf16)."""
        return dtype_name(self.dtype)

    def check_encode_options(self, space: str | None, sample: bool) -> str:
        """The latent space to write (default: the model's own); a UsageError if this model can't do it."""
        return check_encode_space(self.spec, space, sample, self.posterior)

    def encode_image(self, pixels: torch.Tensor, size: tuple[int, int], space: str | None = None,
                     sample: bool = False, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """(1, 3, H, W) in [0, 1] -> a (C, h, w) latent in `space` and its metadata (padding recorded)."""
        latents, meta = self.encode_batch(pixels, size, space, sample, seed)
        return latents[0], meta

    def encode_batch(self, pixels: torch.Tensor, size: tuple[int, int], space: str | None = None,
                     sample: bool = False, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """(B, 3, H, W) same-sized images in [0, 1] -> (B, C, h, w) latents in `space` and their shared metadata."""
        if self.model.encoder is None:
            raise UsageError(f"{self.spec.name} has no encoder loaded")
        space = self.check_encode_options(space, sample)
        patch = self.spec.normalized_patch if space == "normalized" else 1
        padded, padding = media.pad_to_multiple(pixels, self.spec.spatial_factor * patch)
        with torch.inference_mode():
            x = padded.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
            raw = self.encode_raw(x, sample, seed) if sample else self._per_pass(
                lambda b: self.encode_raw(b, False, None), x)
            latent = from_network(raw, self.spec, self.network_space, space, self._normalizer()).cpu()
        meta = make_metadata(self.spec, size, padding, self.dtype_name, space, latent.shape[1])
        if sample:
            meta["sample_seed"] = seed
        return latent, meta

    def decode_latent(self, latent: torch.Tensor, meta: dict) -> torch.Tensor:
        """A (C, h, w) latent with its metadata -> (1, 3, H, W) pixels in [0, 1], cropped to the source size."""
        return self.decode_frames(latent[None], meta)

    def clip_encoder(self, size: tuple[int, int], space: str | None = None, sample: bool = False,
                     seed: int | None = None) -> FrameEncoder:
        """A stream for one clip of `size` (W, H): push((k, 3, H, W) in [0, 1]) -> its k latents (k, C, h, w): the
        posterior means, or with `sample` draws (frame i's noise from `frame_seed(seed, i)`)."""
        self.check_encode_options(space, sample)
        return FrameEncoder(self, size, space, sample, seed)

    def clip_decoder(self, meta: dict, n_latents: int | None = None) -> FrameDecoder:
        """A stream for one latent clip: push((k, C, h, w) latents) -> their frames (k, 3, H, W) in [0, 1]."""
        return FrameDecoder(self, meta)

    def decode_frames(self, latents: torch.Tensor, meta: dict, chunk: int | None = None) -> torch.Tensor:
        """(T, C, h, w) latents of one clip -> (T, 3, H, W) pixels in [0, 1], decoded `chunk` frames at a time."""
        return torch.cat(list(self.decode_stream(lambda i, j: latents[i:j], latents.shape[0], meta, chunk)))

    def decode_stream(self, read, frames: int, meta: dict, chunk: int | None = None) -> Iterator[torch.Tensor]:
        """The T = `frames` latents of one clip, `read(i, j)` giving frames i .. j as (j - i, C, h, w) -> its pixels
        as (k, 3, H, W) chunks in [0, 1], `chunk` frames at a time (None: as many as fit the budget)."""
        self._check_decode(chunk)
        f = self.spec.spatial_factor
        probe = read(0, 1)
        chunk = chunk or self.frames_per_pass((probe.shape[-1] * f, probe.shape[-2] * f))
        for i in range(0, frames, chunk):
            with torch.inference_mode():
                part = read(i, min(frames, i + chunk))
                pixels = self._per_pass(lambda z: self.decode_raw(z, z.shape[0]), self._decoder_input(part, meta))
                out = self._cropped(pixels, meta)
            yield out

    def _per_pass(self, run, x: torch.Tensor) -> torch.Tensor:
        """`run` over the (B, ...) batch `x`: at once, or on the CPU an item a pass (`max_batch_pixels`), so that
        an image's or a frame's result never depends on its batch-mates (a video's on --chunk)."""
        if self.max_batch_pixels or x.shape[0] == 1:
            return run(x)
        return torch.cat([run(x[i:i + 1]) for i in range(x.shape[0])])

    def _check_decode(self, chunk: int | None) -> None:
        if self.model.decoder is None:  # a model that has one was loaded without it (halves=("encoder",))
            raise UsageError(f"{self.spec.name} has no decoder loaded" if self.spec.has_decoder
                             else f"{self.spec.name} has no decoder" + (f" ({self.spec.notes})" if self.spec.notes
                                                                         else ""))
        check_at_least_one({"--chunk": chunk})

    def _decoder_input(self, part: torch.Tensor, meta: dict) -> torch.Tensor:
        """(k, C, h, w) latents in the space `meta` names -> the decoder's input, on its device in its dtype."""
        check_latent_fits(self.spec, part.shape[1:], meta)
        z = to_network(part.to(self.device, torch.float32), self.spec, meta, self.network_space,
                       self._normalizer(inverse=True))
        dec_dtype = next(self.model.decoder.parameters()).dtype  # fp32 when the model forces an upcast
        return z.to(dec_dtype).contiguous(memory_format=self.memory_format)

    def _cropped(self, pixels: torch.Tensor, meta: dict) -> torch.Tensor:
        """Decoded (k, 3, H, W) pixels -> float32 on the CPU, cropped to the source size `meta` records."""
        pixels = pixels.float().cpu()
        size = tuple(meta.get("image_size") or (pixels.shape[-1], pixels.shape[-2]))
        return media.crop(pixels, size, tuple(meta.get("padding") or (0, 0, 0, 0)))

    def _normalizer(self, inverse: bool = False):
        # The KL networks hold their "normalized" space (FLUX.2's batch-norm statistics); other families have none.
        return getattr(self.model, "denormalize" if inverse else "normalize", None)

    # --- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: ModelSpec, sd: dict, sources: tuple[str, ...], roles: tuple[str, ...], device: torch.device,
             dtype: str, tile: int | str | None, budget: int, scratch: str | None) -> Codec:
        """The codec for `spec` with the halves in `roles` loaded strictly from state dict `sd` (in the network's
        keys, read from `sources`)."""
        absent = [prefix for half, prefixes in HALVES.items() if half not in roles for prefix in prefixes]
        sd = {k: v for k, v in sd.items() if not k.startswith(tuple(absent))}
        model = cls.build(spec, encoder="encoder" in roles, decoder="decoder" in roles)
        load_strict(model, sd, f"{' + '.join(sources)} as the {spec.name} {' and '.join(roles)}")
        model = model.to(device, DTYPES[dtype]).eval()
        fmt = cls.network_memory_format(device)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.to(memory_format=fmt)
        return cls(spec=spec, model=model, device=device, dtype=DTYPES[dtype], tile=tile, budget=budget,
                   memory_format=fmt, sources=tuple(sources), scratch_dir=scratch)


class FrameEncoder:
    """Frame by frame models' clip stream (`Codec.clip_encoder`): every frame is its own latent."""

    def __init__(self, codec: Codec, size: tuple[int, int], space: str | None, sample: bool = False,
                 seed: int | None = None):
        self.codec, self.size, self.space, self.meta = codec, size, space, {}
        self.sample, self.seed, self.done = sample, seed, 0

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """(k, 3, H, W) frames in [0, 1] -> (k, C, h, w) latents."""
        if not self.sample:
            latents, self.meta = self.codec.encode_batch(frames, self.size, self.space)
            return latents
        from vaecli.pipeline import frame_seed

        out = []
        for frame in frames:  # one pass per frame: each draws from its own seed
            seed = frame_seed(self.seed, self.done) if self.seed is not None else None
            latent, self.meta = self.codec.encode_batch(frame[None], self.size, self.space, True, seed)
            out.append(latent)
            self.done += 1
        self.meta["sample_seed"] = self.seed
        return torch.cat(out)

    def flush(self) -> tuple[torch.Tensor, int]:
        """Nothing is held back: no latents, no frames dropped."""
        return torch.zeros(0), 0


class FrameDecoder:
    """Frame by frame models' latent clip stream (`Codec.clip_decoder`)."""

    def __init__(self, codec: Codec, meta: dict):
        self.codec, self.meta = codec, meta

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """(k, C, h, w) latents -> (k, 3, H, W) frames in [0, 1]."""
        return self.codec.decode_frames(latents, self.meta, latents.shape[0])


def check_room(device: torch.device, need: int, what: str) -> None:
    """A UsageError when `--verify`'s reference, `what`, needs more than half the memory available (`need` bytes)."""
    room = tiling.default_budget(device, cap=None)
    if need > room:
        raise UsageError(f"--verify: {what}, the reference, needs about {need / 2**30:.1f} GB; "
                         f"{room / 2**30:.1f} GB are free for it")


def check_latent_fits(spec: ModelSpec, shape: Sequence[int], meta: dict) -> None:
    """Raise a LatentFormatError when a latent of `shape` (C, h, w) cannot be decoded by `spec` (a file's is checked
    from its header, before its values are read)."""
    made_by = f" (made by {meta['model']})" if meta.get("model") and meta["model"] != spec.name else ""
    maker = REGISTRY.get(str(meta.get("model")))
    if maker is not None and not spec.shares_latents(maker):
        fits = [n for n, s in REGISTRY.items() if s.shares_latents(maker) and s.has_decoder]
        hint = f": decode with {', '.join(fits)}" if fits else ""
        raise LatentFormatError(f"a {maker.name} latent ({maker.latent_family or maker.name} latent space) cannot be "
                                f"decoded with {spec.name} ({spec.latent_family or spec.name} latent space){hint}")
    space = meta.get("space", spec.latent_space)
    if space == "normalized" and not spec.can_normalize:
        owner = meta.get("model")
        if owner and owner != spec.name:
            raise LatentFormatError(f"'normalized' latents{made_by} need {owner}'s normalization statistics: "
                                    f"decode with --model {owner}, not {spec.name}")
        able = ", ".join(n for n, s in REGISTRY.items() if s.can_normalize and s.has_decoder)
        raise LatentFormatError(f"'normalized' latents need their model's normalization statistics, which "
                                f"{spec.name} has none of (models with them: {able})")
    if (space == "native") != (spec.latent_space == "native") or (space == "native" and made_by):
        raise LatentFormatError(f"{spec.name} cannot decode '{space}' latents{made_by}")
    expected = latent_channels(spec, space)
    if shape[-3] != expected:
        raise LatentFormatError(f"expected {expected} latent channels for {spec.name}, got {shape[-3]}{made_by}")
    # Checked again with the decoding model: the file's own check had only its metadata's model to go by.
    problem = layout_problem(shape[-2:], meta, latent_factor(spec, space), f"{spec.name} '{space}' latents")
    if problem:
        raise LatentFormatError(problem)


HALVES = {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}


def build_model(spec: ModelSpec, encoder: bool = True, decoder: bool = True) -> torch.nn.Module:
    """An uninitialised network for `spec` with the requested halves."""
    return family(spec).build(spec, encoder=encoder, decoder=decoder)


def load_codec(name: str, weights: list[Path] | None = None, roles: tuple[str, ...] = ("encoder", "decoder"),
               device: str = "auto", dtype: str = "fp32", verify: bool = True, tile: int | str | None = "auto",
               budget: int = 0, scratch: str | None = None):
    """Build model `name` and load the halves in `roles`: from `weights` files/folders, else the search path.
    A `Codec` for the image families, a `vaecli.causal.CausalCodec` for the causal video ones."""
    spec = get_spec(name)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}': expected one of {', '.join(DTYPES)}")
    if "decoder" in roles and not spec.has_decoder:
        raise UsageError(f"{spec.name} has no decoder ({spec.notes})")
    dev = resolve_device(device)
    if dev.type == "cuda" and dtype == "fp32":
        # fp32 means the reference's numbers: TF32 (torch's CUDA default for convolutions) drifts ~1e-3 from them.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    sd: dict = {}
    sources: list[str] = []
    for path in weights or []:
        part = read_weights(spec, path)
        held = [role for role in ("encoder", "decoder") if any(k.startswith(f"{role}.") for k in part)]
        if held and not set(held) & set(roles):  # else the search path's halves would run, the file unused
            raise WeightsError(f"{path}: expected {spec.name}'s {' or '.join(roles)} weights for this command, "
                               f"found only its {' and '.join(held)}")
        sd.update(part)
        sources.append(str(path))
    given = list(sources)  # the halves found on the search path below are not the user's
    for role in roles:
        if not any(k.startswith(f"{role}.") for k in sd):
            wf = spec.weight(role)
            try:
                path = find_on_search_path(spec, wf, verify=verify)
            except WeightsError as exc:  # say why the search path was looked at when weights were given
                if not given:
                    raise
                raise WeightsError(f"{exc} (the weights given, {', '.join(given)}, hold no {role})") from None
            if str(path) not in sources:
                sd.update(model_state_dict(spec, load_state_dict(path), str(path)))
                sources.append(str(path))
    return family(spec).load(spec, sd, tuple(sources), roles, dev, dtype, tile, budget, scratch)
