"""Causal video autoencoders as codecs (Wan, Qwen-Image, TAEHV, TAESDV): clips stream through the networks' caches.

Each family module in `vaecli.models` holds a `Family` (a `CausalFamily`, see `vaecli.families`): `build`,
`state_dict` (checkpoint keys), `encoder` / `decoder` (push/flush streams over frames), its frame rule (`chunks`,
`frame_counts`), where its networks are cut for spatial tiles (`encoder_split`, `decoder_split`), `posterior` and
`network_space`. This codec adds what every family shares: device and dtype, padding to the spatial factor, latent
spaces, metadata, and the image API (an image is a one-frame clip), so the commands use it as they use
`vaecli.codec.Codec`.
A latent video is (T', C, h, w) latent frames, written as they come; T = 1 + f * k frames give 1 + k of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vaecli import clip_tiles, media, scratch, tiling
from vaecli.batch import check_at_least_one
from vaecli.checkpoints import load_strict
from vaecli.codec import check_latent_fits, check_room
from vaecli.errors import UsageError
from vaecli.families import family
from vaecli.latents import make_metadata
from vaecli.registry import ModelSpec
from vaecli.spaces import DTYPES, check_encode_space, dtype_name, from_network, to_network


def check_tile(spec: ModelSpec, tile: int | str | None) -> None:
    """A UsageError for `--tile N` with a causal video model; `vae decode --model` checks it before any input, as
    the commands that load their model up front do."""
    if isinstance(tile, int) and issubclass(family(spec), CausalFamily):
        raise UsageError(f"--tile {tile}: causal video models ({spec.name}) take no fixed tile size; they go "
                         "tile by tile by themselves when a frame's caches exceed --max-memory")


class CausalFamily:
    """What every causal video family's `Family` shares: it loads as a `CausalCodec`, which runs its streams."""

    posterior = False  # whether the encoder streams give the posterior's moments (mean, then log-variance)
    network_space = "raw"  # the latent space the network produces and consumes

    @staticmethod
    def lead_frames(model, n_latents: int | None) -> int:
        """Frames a decode of `n_latents` latent frames (None: a stream, the count unknown) gives before the first
        frame of the clip: none, unless the model keeps startup frames (taecvx)."""
        return 0

    @classmethod
    def load(cls, spec: ModelSpec, sd: dict, sources: tuple[str, ...], roles: tuple[str, ...],
             device: torch.device, dtype: str, tile: int | str | None, budget: int, scratch: str | None) -> CausalCodec:
        """A CausalCodec for `spec` with state dict `sd` (already in the family's keys) loaded strictly; spatial tiles
        come from the budget, never from a fixed `tile`."""
        check_tile(spec, tile)
        model = cls.build(spec, encoder="encoder" in roles, decoder="decoder" in roles)
        own = set(model.state_dict())
        halves = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
        load_strict(model, {k: v for k, v in sd.items() if k in own or not k.startswith(halves)},
                    f"{' + '.join(sources)} as the {spec.name} {' and '.join(roles)}")
        model = model.to(device, DTYPES[dtype]).eval()
        return CausalCodec(spec=spec, model=model, device=device, dtype=DTYPES[dtype], family=cls,
                           sources=tuple(sources), budget=budget, scratch_dir=scratch)


@dataclass
class CausalCodec:
    """A loaded causal video autoencoder on a device: clips in, latent frames out, and back."""

    spec: ModelSpec
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    family: type
    sources: tuple[str, ...] = ()
    budget: int = 0
    scratch_dir: str | None = None
    scratch_bytes: int = 0
    tile: None = None  # spatial tiles come from the budget only (`clip_tile`), never from --tile N
    mixes_frames = False  # causal: a frame depends on those before it only, so clips stream
    max_batch_pixels = 0  # one image per pass
    padding: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))

    @property
    def dtype_name(self) -> str:
        """The compute dtype's short name (fp32/fp16/bf16)."""
        return dtype_name(self.dtype)

    def check_encode_options(self, space: str | None, sample: bool) -> str:
        """The latent space to write (default: the model's own); a UsageError if this model can't do it."""
        return check_encode_space(self.spec, space, sample, self.family.posterior)

    def frames_per_pass(self, size: tuple[int, int]) -> int:
        """Frames pushed at a time: the network's own step (it runs 1 + f * k frames in groups of f anyway)."""
        return max(1, self.spec.temporal_factor)

    # --- clips ---------------------------------------------------------------------------------------------------

    def clip_encoder(self, size: tuple[int, int], space: str | None = None, sample: bool = False,
                     seed: int | None = None) -> ClipEncoder:
        """A stream for one clip of `size` (W, H): push((k, 3, H, W) in [0, 1]) -> latent frames (k', C, h, w): the
        posterior means, or with `sample` draws (latent frame i's noise from `frame_seed(seed, i)`)."""
        if self.model.encoder is None:
            raise UsageError(f"{self.spec.name} has no encoder loaded")
        return ClipEncoder(self, size, self.check_encode_options(space, sample), sample, seed)

    def clip_decoder(self, meta: dict, n_latents: int | None = None) -> ClipDecoder:
        """A stream for one latent clip with `meta`: push((k, C, h, w) latent frames) -> frames (k', 3, H, W)."""
        if self.model.decoder is None:
            raise UsageError(f"{self.spec.name} has no decoder loaded")
        return ClipDecoder(self, meta, n_latents)

    def lead_frames(self, n_latents: int | None = None) -> int:
        """Frames a clip's decode (`n_latents` latent frames; None: a stream) gives before its first source frame."""
        return self.family.lead_frames(self.model, n_latents)

    def clip_tile(self, split: clip_tiles.Split, height: int, width: int) -> int | None:
        """The spatial tile side (in `split`'s units) for frames of `height` x `width` pixels, or None to stream
        whole frames: tiles when one frame's caches and activations would not fit the budget, then sized to what the
        whole layers kept between the network's parts leave of it."""
        if clip_tiles.tile_for(split, height, width, self._budget()) is None:
            return None
        return clip_tiles.tile_for(split, height, width, self._budget() - self._store_budget())

    def streams_frames(self, size: tuple[int, int]) -> bool:
        """Whether latent frames of clips of `size` (W, H) decode as they come (not when frames that large go tile
        by tile: every tile needs every latent frame)."""
        f = self.spec.spatial_factor
        return self.clip_tile(self._split("decoder"), -(-size[1] // f) * f, -(-size[0] // f) * f) is None

    def _budget(self) -> int:
        return self.budget or tiling.default_budget(self.device, cap=None)

    def _store_budget(self) -> int:
        # A quarter for whole layers in RAM (past it they go to scratch files, read back a frame at a time); the rest
        # for the tile, since bigger tiles spend less of their time on halos.
        return self._budget() // 4

    def _split(self, half: str, n_latents: int | None = None) -> clip_tiles.Split:
        if half == "encoder":
            return self.family.encoder_split(self.model)
        return self.family.decoder_split(self.model, n_latents)

    def decode_stream(self, read, frames: int, meta: dict, chunk: int | None = None) -> Iterator[torch.Tensor]:
        """The `frames` latent frames of one clip, `read(i, j)` giving frames i .. j -> its pixels as (k, 3, H, W)
        chunks in [0, 1], `chunk` latent frames at a time (or, past the budget, tile by tile: see
        `vaecli.clip_tiles`)."""
        check_at_least_one({"--chunk": chunk})
        if self.model.decoder is None:
            raise UsageError(f"{self.spec.name} has no decoder loaded")
        split = self._split("decoder", frames)
        h, w = latent_size(meta, self.spec)
        tile = self.clip_tile(split, h * self.spec.spatial_factor, w * self.spec.spatial_factor)
        if tile is not None:
            yield from self._decode_tiled(split, tile, read, frames, meta)
            return
        dec = self.clip_decoder(meta, frames)
        step = chunk or 1
        for i in range(0, frames, step):
            out = dec.push(read(i, min(frames, i + step)))
            if out.shape[0]:
                yield out

    def _decode_tiled(self, split, tile: int, read, frames: int, meta: dict) -> Iterator[torch.Tensor]:
        def latents(i: int, j: int) -> torch.Tensor:
            z = read(i, j)
            check_latent_fits(self.spec, z.shape[1:], meta)
            return self.from_space(z.to(self.device, torch.float32), meta)

        size = tuple(meta.get("image_size") or ())
        padding = tuple(meta.get("padding") or (0, 0, 0, 0))
        store = scratch.Scratch(self._store_budget(), self.device, self.scratch_dir)
        try:
            with torch.inference_mode():
                for pixels in clip_tiles.decode(split, latents, frames, self.family.frame_counts(self.model, frames),
                                                 tile, store):
                    self.scratch_bytes = max(self.scratch_bytes, store.peak_file_bytes)
                    pixels = pixels.float().cpu()
                    yield media.crop(pixels, size or (pixels.shape[-1], pixels.shape[-2]), padding)
        finally:
            store.close()

    def decode_frames(self, latents: torch.Tensor, meta: dict, chunk: int | None = None) -> torch.Tensor:
        """(T', C, h, w) latent frames of one clip -> all its frames (T, 3, H, W) in [0, 1]."""
        return torch.cat(list(self.decode_stream(lambda i, j: latents[i:j], latents.shape[0], meta, chunk)))

    # --- images: one-frame clips ---------------------------------------------------------------------------------

    def encode_batch(self, pixels: torch.Tensor, size: tuple[int, int], space: str | None = None,
                     sample: bool = False, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """(B, 3, H, W) same-sized images in [0, 1] -> (B, C, h, w) latents in `space` and their shared metadata."""
        self.check_encode_options(space, sample)
        out, meta = [], {}
        for image in pixels:
            enc = self.clip_encoder(size, space, sample, seed)
            first = enc.push(image[None])
            rest, _ = enc.flush()
            out.append(torch.cat([t for t in (first, rest) if t.shape[0]])[:1])
            meta = enc.meta
        return torch.cat(out), meta

    def encode_image(self, pixels: torch.Tensor, size: tuple[int, int], space: str | None = None,
                     sample: bool = False, seed: int | None = None) -> tuple[torch.Tensor, dict]:
        """(1, 3, H, W) in [0, 1] -> a (C, h, w) latent in `space` and its metadata."""
        latents, meta = self.encode_batch(pixels, size, space, sample, seed)
        return latents[0], meta

    def decode_latent(self, latent: torch.Tensor, meta: dict) -> torch.Tensor:
        """A (C, h, w) latent with its metadata -> (1, 3, H, W) pixels in [0, 1], cropped to the source size."""
        return self.decode_frames(latent[None], meta)[:1]

    def verify_tiling(self, latent: torch.Tensor, meta: dict, pixels: torch.Tensor) -> dict:
        """`--verify` of an image (a one-frame clip) decoded to (1, 3, H, W) `pixels`: compared with the whole-frame
        stream when the decode went tile by tile."""
        from vaecli import metrics

        ref = self.reference_frames(lambda i, j: latent[None][i:j], 1, meta)
        if ref is None:
            return {"tiled": False, "max_abs_diff": 0.0, "psnr": float("inf")}
        expected = next(ref[0])[:1]
        return {"tiled": True, "window": [0, 0, pixels.shape[-1], pixels.shape[-2]],
                "max_abs_diff": (pixels - expected).abs().max().item(), "psnr": metrics.psnr(pixels, expected)}

    def reference_frames(self, read, frames: int, meta: dict) -> tuple[Iterator[torch.Tensor], str] | None:
        """`--verify` of a latent clip decoded tile by tile, `read(i, j)` giving latent frames i .. j: the same clip
        streamed in whole frames (outside the budget), as (k, 3, H, W) chunks in order; None when the decode itself
        streams whole frames."""
        split = self._split("decoder", frames)
        h, w = (n * self.spec.spatial_factor for n in latent_size(meta, self.spec))
        if self.clip_tile(split, h, w) is None:
            return None
        check_room(self.device, h * w * split.unit_bytes // round(split.unit_px) ** 2,
                   "decoding the clip in whole frames")
        dec = self.clip_decoder(meta, frames)
        return (dec.push(read(i, i + 1)) for i in range(frames)), "the clip streamed in whole frames"

    # --- latent spaces -------------------------------------------------------------------------------------------

    def to_space(self, z: torch.Tensor, space: str) -> torch.Tensor:
        """The network's latent frames (T, C, h, w) -> `space`: raw, scaled, or normalized per channel."""
        return from_network(z, self.spec, self.family.network_space, space, lambda raw: (raw - self._mean(raw))
                            / self._std(raw))

    def from_space(self, z: torch.Tensor, meta: dict) -> torch.Tensor:
        """Latent frames in the space `meta` names -> what the network consumes."""
        return to_network(z, self.spec, meta, self.family.network_space, lambda x: x * self._std(x) + self._mean(x))

    def _mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.spec.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)

    def _std(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.spec.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)


def latent_size(meta: dict, spec: ModelSpec) -> tuple[int, int]:
    """(h, w) of the latent frames of a clip with `meta` (its padded frame size over the spatial factor)."""
    w, h = meta.get("image_size") or (0, 0)
    left, top, right, bottom = meta.get("padding") or (0, 0, 0, 0)  # as make_metadata records it
    f = spec.spatial_factor
    return (h + top + bottom) // f, (w + left + right) // f


class ClipEncoder:
    """One clip through the encoder: frames padded to the spatial factor, latents converted to the chosen space.
    Frames whose caches would not fit the budget go tile by tile (`TiledEncoder`)."""

    def __init__(self, codec: CausalCodec, size: tuple[int, int], space: str, sample: bool = False,
                 seed: int | None = None):
        self.codec, self.size, self.space, self.sample, self.seed, self.done = codec, size, space, sample, seed, 0
        f = codec.spec.spatial_factor
        split = codec._split("encoder")
        tile = codec.clip_tile(split, -(-size[1] // f) * f, -(-size[0] // f) * f)
        self.stream = codec.family.encoder(codec.model) if tile is None else TiledEncoder(codec, split, tile)
        self.meta: dict = {}

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """(k, 3, H, W) frames in [0, 1] -> the latent frames (k', C, h, w) now complete, on the CPU in fp32."""
        padded, padding = media.pad_to_multiple(frames, self.codec.spec.spatial_factor)
        if not self.meta:
            c = self.codec
            self.meta = make_metadata(c.spec, self.size, padding, c.dtype_name, self.space)
            if self.sample:
                self.meta["sample_seed"] = self.seed
        with torch.inference_mode():
            z = self.stream.push(padded.to(self.codec.device, self.codec.dtype))
            return self._out(z)

    def flush(self) -> tuple[torch.Tensor, int]:
        """End the clip: its last latent frames (k', C, h, w) and how many trailing frames were not encoded."""
        with torch.inference_mode():
            z, dropped = self.stream.flush()
            empty = torch.zeros(0, self.codec.spec.latent_channels, 0, 0)
            return (empty if z is None or not z.shape[0] else self._out(z)), dropped

    def _out(self, z: torch.Tensor) -> torch.Tensor:
        if not z.shape[0]:
            return z.float().cpu()
        z = z.float()
        if self.codec.family.posterior:
            mean, logvar = z.chunk(2, 1)
            z = mean
            if self.sample:  # as diffusers' DiagonalGaussianDistribution, the noise from each frame's own seed
                noise = torch.stack([draw(mean.shape[1:], self.seed, self.done + i) for i in range(z.shape[0])])
                z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.device)
        self.done += z.shape[0]
        return self.codec.to_space(z, self.space).cpu()


def draw(shape: tuple[int, ...], seed: int | None, frame: int) -> torch.Tensor:
    """Standard normal noise of `shape` (float32, CPU) for latent frame `frame` of a clip sampled with `seed`
    (None: unseeded); each frame has a seed of its own, so draws do not depend on chunks, tiles or device."""
    from vaecli.pipeline import frame_seed

    gen = torch.Generator().manual_seed(frame_seed(seed, frame)) if seed is not None else None
    return torch.randn(shape, generator=gen)


class TiledEncoder:
    """The encoder tile by tile (`vaecli.clip_tiles.encode`): frames are spooled as they come, latents come at
    `flush()`, as (T', C, h, w) raw latent frames with the number of trailing frames dropped."""

    def __init__(self, codec: CausalCodec, split: clip_tiles.Split, tile: int):
        self.codec, self.split, self.tile = codec, split, tile
        self.store = scratch.Scratch(codec._store_budget(), codec.device, codec.scratch_dir)
        self.spool = clip_tiles.Spool(self.store)

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        self.spool.push(frames)
        self.codec.scratch_bytes = max(self.codec.scratch_bytes, self.store.peak_file_bytes)
        return frames.new_zeros(0, self.codec.spec.latent_channels, 0, 0)

    def flush(self) -> tuple[torch.Tensor, int]:
        try:
            chunks = self.codec.family.chunks(self.codec.model, self.spool.frames)
            z = clip_tiles.encode(self.split, self.spool, chunks, self.tile, self.store)
            self.codec.scratch_bytes = max(self.codec.scratch_bytes, self.store.peak_file_bytes)
            return z, self.spool.frames - chunks[-1][1]
        finally:
            self.spool.close()
            self.store.close()


class ClipDecoder:
    """One latent clip through the decoder: latents converted from their space, frames cropped to the source."""

    def __init__(self, codec: CausalCodec, meta: dict, n_latents: int | None):
        self.codec, self.meta = codec, meta
        self.stream = codec.family.decoder(codec.model, n_latents)
        self.size = tuple(meta.get("image_size") or ())
        self.padding = tuple(meta.get("padding") or (0, 0, 0, 0))

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """(k, C, h, w) latent frames -> the frames (k', 3, H, W) in [0, 1] they complete, on the CPU in fp32."""
        if not latents.shape[0]:
            return torch.zeros(0, 3, 0, 0)
        check_latent_fits(self.codec.spec, latents.shape[1:], self.meta)
        c = self.codec
        with torch.inference_mode():
            z = c.from_space(latents.to(c.device, torch.float32), self.meta).to(c.dtype)
            pixels = self.stream.push(z).float().cpu()
        size = self.size or (pixels.shape[-1], pixels.shape[-2])
        return media.crop(pixels, size, self.padding) if pixels.shape[0] else pixels

