"""The codec pipeline: a registry model with its weights loaded, turning pixels into latents and back.

Knows nothing of the CLI; every user-facing failure is a `VaeError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vaecli import allocator, banded, causal, media, scratch, tiling
from vaecli.checkpoints import load_strict, model_state_dict, read_weights
from vaecli.errors import LatentFormatError, UsageError
from vaecli.latents import make_metadata
from vaecli.models.kl import KLAutoencoder
from vaecli.models.temporal import TemporalDecoder
from vaecli.models.tiny import TinyAutoencoder
from vaecli.registry import REGISTRY, ModelSpec
from vaecli.weights import find_on_search_path, load_state_dict

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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
    """A loaded model on a device, ready to encode (B, 3, H, W) pixels in [0, 1] and decode latents."""

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

    def tile_size(self, pixels: int, batch: int = 1) -> int | None:
        """Tile side in pixels for a forward pass over `batch` images of `pixels` pixels, or None to run it whole
        (a tile spans the whole batch, so its side shrinks as the batch grows)."""
        if self.spec.family != "tiny" or self.tile is None:
            return None
        if self.tile != "auto":
            return int(self.tile)
        return tiling.tile_for_budget(pixels, self._tiny_bytes_per_pixel() * batch,
                                      self.budget or tiling.default_budget(self.device), self._halo_px(),
                                      self.spec.spatial_factor)

    def _tiny_bytes_per_pixel(self) -> int:
        return self.spec.config.width * 6 * torch.finfo(self.dtype).bits // 8

    def frames_per_pass(self, size: tuple[int, int]) -> int:
        """Video frames of `size` (W, H) to encode or decode together: as many as run whole within the budget, at
        least one (a frame too large alone is tiled); never changes the numbers."""
        w, h = size
        f = self.spec.spatial_factor
        if self.mixes_frames:
            per_frame, budget = self._temporal_frame_bytes(w * h), self._temporal_budget()
        elif self.spec.family == "tiny":
            per_frame, budget = self._tiny_bytes_per_pixel() * w * h, self.budget or tiling.default_budget(self.device)
        else:
            per_frame = 0
            if self.model.decoder is not None:
                _, blocks, shape, _ = self._kl_decoder_plan(1, (-(-h // f), -(-w // f)))
                per_frame = tiling.whole_bytes(blocks, shape)
            if self.model.encoder is not None:
                padded = (1, 3, h + (-h) % f, w + (-w) % f)
                per_frame = max(per_frame, tiling.whole_bytes(self.model.encoder_plan()[0], padded))
            budget = self._kl_budget()
        return max(1, min(MAX_CLIP_CHUNK, budget // max(1, per_frame)))

    @property
    def mixes_frames(self) -> bool:
        """Whether the decoder mixes the frames of a clip (SVD): a clip is then decoded as a whole, never per frame."""
        return bool(getattr(self.spec.config, "temporal_decoder", False)) and self.model.decoder is not None

    def streams_frames(self, size: tuple[int, int]) -> bool:
        """Whether latent frames of clips of `size` (W, H) decode as they come (not SVD: its clip decodes whole)."""
        return not self.mixes_frames

    def _temporal_budget(self) -> int:
        # Frame chunks and whole-clip layers share it; what does not fit goes to scratch files, so the default is
        # the tiny family's (1 GiB), not half the RAM: a clip's layers live in the page cache, not the process.
        return self.budget or tiling.default_budget(self.device)

    def _temporal_frame_bytes(self, pixels: int) -> int:
        """Working set of the temporal decoder per frame of `pixels` output pixels (its widest layer, ~8 copies)."""
        cfg = self.spec.config
        return cfg.channels * cfg.channel_mult[0] * pixels * 8 * tiling.DTYPE_BYTES

    def _halo_px(self) -> int:
        """Overlap in pixels the tiles of whichever half is loaded need (their receptive field)."""
        if self.model.encoder is not None:
            return math.ceil(tiling.receptive_radius(self.model.encoder_segments()[0]))
        return math.ceil(tiling.receptive_radius(self.model.decoder_segments()[1]) * self.spec.spatial_factor)

    def verify_tiling(self, latent: torch.Tensor, meta: dict, pixels: torch.Tensor) -> dict:
        """Decode a window around a tile seam untiled and compare it with `pixels`, the tiled (1, 3, H, W) result.

        KL models normalise over the whole image, so a window alone is no reference: they decode it all untiled.
        """
        f = self.spec.spatial_factor
        if self.spec.family != "tiny":
            return self._verify_whole(latent, meta, pixels)
        tile = self.tile_size(latent.shape[-2] * latent.shape[-1] * f * f)
        if tile is None:
            return {"tiled": False, "max_abs_diff": 0.0, "psnr": float("inf")}
        cells = max(1, tile // f)
        head, local = self.model.decoder_segments()
        halo = math.ceil(tiling.receptive_radius(local))
        h, w = latent.shape[-2:]
        # A tile-sized window straddling the first seams (tiles start at multiples of `cells`).
        y0, x0 = min(cells // 2, max(0, h - cells)), min(cells // 2, max(0, w - cells))
        y1, x1 = min(h, y0 + cells), min(w, x0 + cells)
        with torch.inference_mode():
            z = self._to_input(latent[None].to(self.device, torch.float32), meta)
            top = head(z.to(next(self.model.decoder.parameters()).dtype))
            ry0, rx0 = max(0, y0 - halo), max(0, x0 - halo)
            ref = local(top[:, :, ry0:min(h, y1 + halo), rx0:min(w, x1 + halo)]).clamp(0, 1).float().cpu()
        ref = ref[:, :, (y0 - ry0) * f:(y1 - ry0) * f, (x0 - rx0) * f:(x1 - rx0) * f]
        ours = pixels[:, :, y0 * f:y1 * f, x0 * f:x1 * f]
        ref = ref[:, :, :ours.shape[-2], :ours.shape[-1]]
        from vaecli import metrics

        return {"tiled": True, "window": [x0 * f, y0 * f, x1 * f, y1 * f],
                "max_abs_diff": (ours - ref).abs().max().item(), "psnr": metrics.psnr(ours, ref)}

    def _verify_whole(self, latent: torch.Tensor, meta: dict, pixels: torch.Tensor) -> dict:
        from dataclasses import replace

        from vaecli import metrics

        if self.mixes_frames:
            ref = self.whole_clip(latent[None], meta)
        else:
            _, blocks, shape, streams = self._kl_decoder_plan(1, latent.shape[-2:])
            if not streams:
                return {"tiled": False, "max_abs_diff": 0.0, "psnr": float("inf")}
            self._check_room(tiling.whole_bytes(blocks, shape), "decoding this latent untiled")
            ref = replace(self, tile=None).decode_latent(latent, meta)
        return {"tiled": True, "window": [0, 0, ref.shape[-1], ref.shape[-2]],
                "max_abs_diff": (pixels - ref).abs().max().item(), "psnr": metrics.psnr(pixels, ref)}

    def _check_room(self, need: int, what: str) -> None:
        check_room(self.device, need, what)

    def reference_frames(self, read, frames: int, meta: dict) -> tuple[Iterator[torch.Tensor], str] | None:
        """`--verify` of a latent clip, `read(i, j)` giving latent frames i .. j: the exact reference frames computed
        another way, as (k, 3, H, W) chunks in order, and what they are; None where the frames are checked one by one
        (`verify_tiling`). Here: a temporal decoder's (SVD's) plain forward over the whole clip at once."""
        if not self.mixes_frames:
            return None
        return iter([self.whole_clip(read(0, frames), meta)]), "the whole clip decoded at once"

    def whole_clip(self, latents: torch.Tensor, meta: dict) -> torch.Tensor:
        """(T, C, h, w) latents of one clip -> (T, 3, H, W) pixels in [0, 1] by the temporal decoder's plain forward
        over the whole clip at once (the reference `--verify` compares the streamed decode with); a UsageError when
        that would not fit in half the available memory."""
        h, w = latents.shape[-2:]
        f = self.spec.spatial_factor
        self._check_room(latents.shape[0] * self._temporal_frame_bytes(h * w * f * f), "decoding the clip whole")
        dec_dtype = next(self.model.decoder.parameters()).dtype
        with torch.inference_mode():
            z = self._to_input(latents.to(self.device, torch.float32), meta).to(dec_dtype)
            pixels = self.model.decode(z.contiguous(memory_format=self.memory_format), latents.shape[0])
        size = tuple(meta.get("image_size") or (pixels.shape[-1], pixels.shape[-2]))
        return media.crop(pixels.float().cpu(), size, tuple(meta.get("padding") or (0, 0, 0, 0)))

    def _kl_decoder_plan(self, batch: int, hw) -> tuple:
        """The 2-D KL decoder's head and blocks, their input shape for `batch` latents of `hw`, and whether they
        run tiled."""
        head, blocks = self.model.decoder_plan()
        cfg = self.spec.config
        shape = (batch, cfg.channels * cfg.channel_mult[-1], *hw)
        return head, blocks, shape, self._kl_streams(blocks, shape)

    def _kl_budget(self) -> int:
        # KL activations are large: the default is half the available RAM (the tiny family caps it at 1 GiB).
        return self.budget or tiling.default_budget(self.device, cap=None)

    def _kl_streams(self, blocks: list, shape: tuple[int, ...]) -> bool:
        """Whether a KL half runs tiled: forced by --tile N, else when running it whole would not fit the budget."""
        if self.tile is None:
            return False
        return self.tile != "auto" or tiling.whole_bytes(blocks, shape) > self._kl_budget()

    def _kl_streamed(self, blocks: list, x: torch.Tensor, unit: float = 1.0) -> torch.Tensor:
        """`tiling.streamed` over a KL chain with this codec's budget and tile (`unit`: pixels per cell of `x`)."""
        tile = None if self.tile == "auto" else int(self.tile)
        stats: dict = {}
        out = tiling.streamed(blocks, x, self._kl_budget(), tile, unit=unit, scratch_dir=self.scratch_dir,
                              stats=stats)
        self.scratch_bytes = max(self.scratch_bytes, stats["scratch_bytes"])
        return out

    def _kl_latent_part(self, part: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """A KL decoder head or encoder tail past the budget: its mid block and output head layer by layer too."""
        from vaecli import layerwise

        stats: dict = {}
        out = layerwise.run_latent_part(part, x, self._kl_budget(), self.scratch_dir, stats)
        self.scratch_bytes = max(self.scratch_bytes, stats["scratch_bytes"])
        return out

    def _banded(self, blocks: list) -> bool:
        """Whether a whole-image KL chain runs band by band (CPU: less memory, cache-sized work, same numbers)."""
        return self.device.type == "cpu" and self.memory_format == torch.channels_last and banded.supports(blocks)

    def _encode_raw(self, x: torch.Tensor, sample: bool, seed: int | None) -> torch.Tensor:
        if self.spec.family != "tiny":
            gen = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
            blocks, tail = self.model.encoder_plan()
            if self._kl_streams(blocks, x.shape):
                moments = self._kl_latent_part(tail, self._kl_streamed(blocks, x * 2 - 1))
                return self.model.encode(x, generator=gen, sample=sample, moments=self.model.split_moments(moments))
            if not self._banded(blocks):
                return self.model.encode(x, generator=gen, sample=sample)
            h = banded.run_chain(blocks, x * 2 - 1)
            return self.model.encode(x, generator=gen, sample=sample, moments=self.model.split_moments(tail(h)))
        tile = self.tile_size(x.shape[-2] * x.shape[-1], x.shape[0])
        if tile is None:
            return self.model.encode(x)
        local, rest = self.model.encoder_segments()
        f = self.spec.spatial_factor
        return rest(tiling.tiled(local, x, tile, tiling.receptive_radius(local), 1 / f, align=f))

    def _decode_raw(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        f = self.spec.spatial_factor
        tile = self.tile_size(z.shape[-2] * z.shape[-1] * f * f, z.shape[0])
        if self.spec.family != "tiny":
            if self.spec.config.temporal_decoder:
                return self.model.decode(z, num_frames)  # one frame (an image latent): nothing to mix
            head, blocks, _, streams = self._kl_decoder_plan(z.shape[0], z.shape[-2:])
            if streams:
                h = self._kl_streamed(blocks, self._kl_latent_part(head, z), unit=f)
            elif self._banded(blocks):
                h = banded.run_chain(blocks, head(z))
            else:
                return self.model.decode(z)
            return ((h + 1) / 2).clamp(0, 1)
        if tile is None:
            return self.model.decode(z)
        head, local = self.model.decoder_segments()
        h = head(z)
        return tiling.tiled(local, h, max(1, tile // f), tiling.receptive_radius(local), f).clamp(0, 1)

    @property
    def max_batch_pixels(self) -> int:
        """Pixels one forward pass may take at once (0: one image per pass); KL activations are ~8x tiny ones'.

        On CPU one image per pass: as fast there, and oneDNN's blocking follows the batch size (~3e-6 apart), so
        an image's latent would otherwise depend on its batch-mates; per image, a resumed run or the Ray engine
        writes the same bits as a fresh local run.
        """
        if self.device.type == "cpu":
            return 0
        return 1 << 21 if self.spec.family == "tiny" else 1 << 18

    @property
    def dtype_name(self) -> str:
        """The compute dtype's short name (fp32/fp16/bf16)."""
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    def check_encode_options(self, space: str | None, sample: bool) -> str:
        """The latent space to write (default: the model's own); a UsageError if this model can't do it."""
        space = space or self.spec.latent_space
        if space not in self.spec.spaces:
            raise UsageError(f"{self.spec.name} cannot write '{space}' latents: expected one of "
                             f"{', '.join(self.spec.spaces)}")
        if sample and self.spec.family == "tiny":
            raise UsageError(f"{self.spec.name} is deterministic: --sample needs a model with a posterior (KL, Wan)")
        return space

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
            raw = self._encode_raw(x, sample, seed)
            latent = self._from_raw(raw, space).cpu()
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
        as (k, 3, H, W) chunks in [0, 1], `chunk` frames at a time (None: as many as fit the budget).

        Per-frame models decode chunk by chunk; a temporal decoder (SVD) decodes the clip as one, exactly as if
        whole, keeping the layers it needs whole in RAM within the budget and in scratch files past it.
        """
        if self.model.decoder is None:
            raise UsageError(f"{self.spec.name} has no decoder" + (f" ({self.spec.notes})" if self.spec.notes else ""))
        if chunk is not None and chunk < 1:
            raise UsageError(f"--chunk must be at least 1, got {chunk}")
        size = tuple(meta.get("image_size") or ())
        padding = tuple(meta.get("padding") or (0, 0, 0, 0))
        dec_dtype = next(self.model.decoder.parameters()).dtype  # fp32 when the model forces an upcast

        def prepare(part: torch.Tensor) -> torch.Tensor:
            check_latent_fits(self.spec, part[0], meta)
            z = self._to_input(part.to(self.device, torch.float32), meta)
            return z.to(dec_dtype).contiguous(memory_format=self.memory_format)

        def finish(pixels: torch.Tensor) -> torch.Tensor:
            pixels = pixels.float().cpu()
            return media.crop(pixels, size or (pixels.shape[-1], pixels.shape[-2]), padding)

        f = self.spec.spatial_factor
        if not self.mixes_frames:
            probe = read(0, 1)
            chunk = chunk or self.frames_per_pass((probe.shape[-1] * f, probe.shape[-2] * f))
            for i in range(0, frames, chunk):
                with torch.inference_mode():
                    part = read(i, min(frames, i + chunk))
                    out = finish(self._decode_raw(prepare(part), part.shape[0]))
                yield out
            return
        with torch.inference_mode():
            z = prepare(read(0, frames))
            if self.model.post_quant_conv is not None:
                z = self.model.post_quant_conv(z)
        pixels = z.shape[-2] * z.shape[-1] * f * f
        chunk = chunk or self.frames_per_pass((z.shape[-1] * f, z.shape[-2] * f))
        budget, per_frame = self._temporal_budget(), self._temporal_frame_bytes(pixels)
        # A frame that alone passes the budget goes band by band (half the budget for its bands and buffers).
        frame_budget = budget // 2 if per_frame > budget else None
        store = scratch.Scratch(budget // 2 if frame_budget else max(0, budget - chunk * per_frame), self.device,
                                self.scratch_dir)
        store.check_space(self.model.decoder.clip_bytes(frames, pixels, dec_dtype) - store.budget)
        try:
            with torch.inference_mode():
                stream = self.model.decoder.stream(z, chunk, store, frame_budget)
            while True:
                with torch.inference_mode():
                    part = next(stream, None)
                    if part is None:
                        break
                    out = finish(((part + 1) / 2).clamp(0, 1))
                self.scratch_bytes = max(self.scratch_bytes, store.peak_file_bytes)
                yield out
        finally:
            store.close()

    def _from_raw(self, raw: torch.Tensor, space: str) -> torch.Tensor:
        if self.spec.family == "tiny":
            if space == self.spec.latent_space:
                return raw  # a tiny model already produces its family's denoiser space
            if self.spec.latent_space == "scaled":  # --latent-space raw: undo the scaling it was trained with
                raw = raw / self.spec.scaling_factor + self.spec.shift_factor
        if space == "scaled":
            return (raw - self.spec.shift_factor) * self.spec.scaling_factor
        if space == "normalized":
            return self.model.normalize(raw)
        return raw

    def _to_input(self, z: torch.Tensor, meta: dict) -> torch.Tensor:
        """A latent in the space its metadata names -> what this model's decoder consumes."""
        space = meta.get("space", self.spec.latent_space)
        if self.spec.family == "tiny" and space == self.spec.latent_space and (
                space != "scaled" or (meta.get("scaling_factor"), meta.get("shift_factor", 0.0))
                == (self.spec.scaling_factor, self.spec.shift_factor)):
            return z
        if space == "scaled":
            raw = z / float(meta["scaling_factor"]) + float(meta.get("shift_factor", 0.0))
        elif space == "normalized":
            raw = self.model.denormalize(z)
        else:
            raw = z
        if self.spec.family == "tiny" and self.spec.latent_space == "scaled":
            return (raw - self.spec.shift_factor) * self.spec.scaling_factor
        return raw


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


def check_latent_fits(spec: ModelSpec, latent: torch.Tensor, meta: dict) -> None:
    """Raise a LatentFormatError when a (C, h, w) latent cannot be decoded by `spec`."""
    made_by = f" (made by {meta['model']})" if meta.get("model") and meta["model"] != spec.name else ""
    maker = REGISTRY.get(str(meta.get("model")))
    if maker is not None and not spec.shares_latents(maker):
        fits = [n for n, s in REGISTRY.items() if s.shares_latents(maker) and s.has_decoder]
        hint = f": decode with {', '.join(fits)}" if fits else ""
        raise LatentFormatError(f"a {maker.name} latent ({maker.latent_family or maker.name} latent space) cannot be "
                                f"decoded with {spec.name} ({spec.latent_family or spec.name} latent space){hint}")
    space = meta.get("space", spec.latent_space)
    if space == "normalized" and not spec.can_normalize:
        owner = meta.get("model") or "the model that made them"
        raise LatentFormatError(f"'normalized' latents{made_by} need {owner}'s normalization statistics: "
                                f"decode with --model {owner}, not {spec.name}")
    if (space == "native") != (spec.latent_space == "native") or (space == "native" and made_by):
        raise LatentFormatError(f"{spec.name} cannot decode '{space}' latents{made_by}")
    expected = spec.latent_channels * (spec.normalized_patch ** 2 if space == "normalized" else 1)
    if latent.shape[0] != expected:
        raise LatentFormatError(f"expected {expected} latent channels for {spec.name}, "
                                f"got {latent.shape[0]}{made_by}")


HALVES = {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}


def build_model(spec: ModelSpec, encoder: bool = True, decoder: bool = True) -> torch.nn.Module:
    """An uninitialised network for `spec` with the requested halves."""
    if spec.family == "tiny":
        return TinyAutoencoder(spec.config, encoder=encoder, decoder=decoder)
    temporal = TemporalDecoder if spec.config.temporal_decoder else None
    return KLAutoencoder(spec.config, encoder=encoder, decoder=decoder, decoder_cls=temporal)


def load_codec(name: str, weights: list[Path] | None = None, roles: tuple[str, ...] = ("encoder", "decoder"),
               device: str = "auto", dtype: str = "fp32", verify: bool = True, tile: int | str | None = "auto",
               budget: int = 0, scratch: str | None = None) -> Codec:
    """Build model `name` and load the halves in `roles`: from `weights` files/folders, else the search path."""
    spec = get_spec(name)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}': expected one of {', '.join(DTYPES)}")
    if "decoder" in roles and not spec.has_decoder:
        raise UsageError(f"{spec.name} has no decoder ({spec.notes})")
    dev = resolve_device(device)
    if dev.type == "cpu" and spec.family == "tiny" and dtype == "bf16":
        # bf16 is the speed mode: keeping freed 32-64 MB activations in the heap makes taef2's decoder ~1.6x faster
        # at 512x512. Not for fp32 or KL, whose larger activations fragment such a heap (taef2 fp32 at 2048x2048:
        # 1660 MB peak instead of 923).
        allocator.keep_freed_memory()
    if dev.type == "cuda" and dtype == "fp32":
        # fp32 means the reference's numbers: TF32 (torch's CUDA default for convolutions) drifts ~1e-3 from them.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    sd: dict = {}
    sources: list[str] = []
    for path in weights or []:
        sd.update(read_weights(spec, path))
        sources.append(str(path))
    for role in roles:
        if not any(k.startswith(f"{role}.") for k in sd):
            wf = spec.weight(role)
            path = find_on_search_path(spec, wf, verify=verify)
            if str(path) not in sources:
                sd.update(model_state_dict(spec, load_state_dict(path), str(path)))
                sources.append(str(path))
    if causal.family(spec) is not None:
        if isinstance(tile, int):
            raise UsageError(f"--tile {tile}: causal video models ({spec.name}) take no fixed tile size; the Wan "
                             "family goes tile by tile by itself when a frame's caches exceed --max-memory")
        return causal.load(spec, sd, sources, roles, dev, DTYPES[dtype], budget, scratch)
    absent = [prefix for half, prefixes in HALVES.items() if half not in roles for prefix in prefixes]
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(absent))}
    model = build_model(spec, encoder="encoder" in roles, decoder="decoder" in roles)
    load_strict(model, sd, f"{' + '.join(sources)} as the {spec.name} {' and '.join(roles)}")
    model = model.to(dev, DTYPES[dtype]).eval()
    # channels_last: oneDNN's fast conv layout on CPU (~1.8x here) and cuDNN's for the tiny family (0.65x
    # diffusers' time in fp16 on an H100); but CUDA's GroupNorm copies channels_last tensors to NCHW, which made
    # the KL decoder 1.2-1.5x slower and 1.9x larger there (bench/cuda.py), so KL on CUDA stays NCHW.
    fmt = torch.contiguous_format if dev.type == "cuda" and spec.family == "kl" else torch.channels_last
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=fmt)
    if spec.force_upcast and dtype == "fp16" and model.decoder is not None:
        model.decoder.float()
        if getattr(model, "post_quant_conv", None) is not None:
            model.post_quant_conv.float()
    if isinstance(tile, int) and getattr(spec.config, "temporal_decoder", False) and "decoder" in roles:
        raise UsageError(f"--tile {tile}: {spec.name}'s temporal decoder tiles over frames (--chunk), not space")
    return Codec(spec=spec, model=model, device=dev, dtype=DTYPES[dtype], tile=tile, budget=budget,
                 memory_format=fmt, sources=tuple(sources), scratch_dir=scratch)
