"""The KL image family as a codec (`vaecli.families`): SD 1.x/2.x, SDXL, SD3, FLUX.1 and FLUX.2 autoencoders.

Past the budget, a half runs as a chain of local blocks tile by tile (`vaecli.tiling.streamed`, GroupNorm statistics
gathered over every tile first) around a part at latent resolution run layer by layer (`vaecli.layerwise`); within
it, on the CPU, band by band (`vaecli.banded`). All three give the whole-image numbers.
"""

from __future__ import annotations

import torch

from vaecli import banded, layerwise, metrics, tiling
from vaecli.codec import Codec, check_room
from vaecli.errors import WeightsError
from vaecli.models.kl import KLAutoencoder
from vaecli.registry import ModelSpec


class Family(Codec):
    """A KL autoencoder as a codec: raw posterior latents, streamed tiles past the budget."""

    posterior = True
    batch_pixels = 1 << 18  # KL activations are ~8x a tiny model's

    @staticmethod
    def build(spec: ModelSpec, encoder: bool = True, decoder: bool = True) -> KLAutoencoder:
        """An uninitialised network for `spec` with the requested halves."""
        return KLAutoencoder(spec.config, encoder=encoder, decoder=decoder)

    @staticmethod
    def state_dict(spec: ModelSpec, sd: dict, source: str) -> dict:
        """A checkpoint in LDM/BFL or diffusers keys (`vaecli.checkpoints`), in the network's keys."""
        from vaecli.checkpoints import as_in_kl_models, kl_state_dict

        out = kl_state_dict(sd, len(spec.config.channel_mult), source)
        # The weights of a model with another latent space (SD3's given for sd15) say so, not which keys differ.
        for key, dim, per in (("encoder.conv_out.weight", 0, 2), ("decoder.conv_in.weight", 1, 1)):
            w = out.get(key)
            if w is None or w.dim() != 4 or w.shape[dim] % per or w.shape[dim] == per * spec.latent_channels:
                continue
            got = w.shape[dim] // per
            hint = as_in_kl_models("latent_channels", got)
            raise WeightsError(f"expected {spec.latent_channels} latent channels for {spec.name}, got {got} in "
                               f"{source} ({key} {tuple(w.shape)}{hint})")
        return out

    @classmethod
    def network_memory_format(cls, device: torch.device) -> torch.memory_format:
        """channels_last, except on CUDA: its GroupNorm copies channels_last tensors to NCHW, which made the KL
        decoder 1.2-1.5x slower and 1.9x larger there (bench/cuda.py)."""
        return torch.contiguous_format if device.type == "cuda" else torch.channels_last

    @classmethod
    def load(cls, spec, sd, sources, roles, device, dtype, tile, budget, scratch) -> Family:
        """`Codec.load`, the decoder kept in fp32 where fp16 overflows in the reference weights."""
        codec = super().load(spec, sd, sources, roles, device, dtype, tile, budget, scratch)
        model = codec.model
        if spec.force_upcast and dtype == "fp16" and model.decoder is not None:
            model.decoder.float()
            if model.post_quant_conv is not None:
                model.post_quant_conv.float()
        return codec

    def frame_bytes(self, width: int, height: int) -> tuple[int, int]:
        """Bytes the loaded halves take run whole on a frame, and the budget (half the available RAM by default)."""
        f = self.spec.spatial_factor
        per_frame = 0
        if self.model.decoder is not None:
            _, blocks, shape, _ = self._decoder_plan(1, (-(-height // f), -(-width // f)))
            per_frame = tiling.whole_bytes(blocks, shape)
        if self.model.encoder is not None:
            padded = (1, 3, height + (-height) % f, width + (-width) % f)
            per_frame = max(per_frame, tiling.whole_bytes(self.model.encoder_plan()[0], padded))
        return per_frame, self._budget()

    def encode_raw(self, x: torch.Tensor, sample: bool, seed: int | None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> raw latents: the posterior mean, or a draw with `seed`."""
        gen = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        blocks, tail = self.model.encoder_plan()
        if self._streams(blocks, x.shape):
            moments = self._latent_part(tail, self._streamed(blocks, x * 2 - 1))
            return self.model.encode(x, generator=gen, sample=sample, moments=self.model.split_moments(moments))
        if not self._banded(blocks):
            return self.model.encode(x, generator=gen, sample=sample)
        h = banded.run_chain(blocks, x * 2 - 1)
        return self.model.encode(x, generator=gen, sample=sample, moments=self.model.split_moments(tail(h)))

    def decode_raw(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Raw latents -> pixels in [0, 1]: whole, band by band, or streamed in tiles past the budget."""
        head, blocks, _, streams = self._decoder_plan(z.shape[0], z.shape[-2:])
        if streams:
            h = self._streamed(blocks, self._latent_part(head, z), unit=self.spec.spatial_factor)
        elif self._banded(blocks):
            h = banded.run_chain(blocks, head(z))
        else:
            return self.model.decode(z)
        return ((h + 1) / 2).clamp(0, 1)

    def verify_tiling(self, latent: torch.Tensor, meta: dict, pixels: torch.Tensor) -> dict:
        """KL models normalise over the whole image, so a window alone is no reference: a tiled decode is compared
        with the whole image decoded untiled."""
        from dataclasses import replace

        _, blocks, shape, streams = self._decoder_plan(1, latent.shape[-2:])
        if not streams:
            return {"tiled": False, "max_abs_diff": 0.0, "psnr": float("inf")}
        check_room(self.device, tiling.whole_bytes(blocks, shape), "decoding this latent untiled")
        ref = replace(self, tile=None).decode_latent(latent, meta)
        return {"tiled": True, "window": [0, 0, ref.shape[-1], ref.shape[-2]],
                "max_abs_diff": (pixels - ref).abs().max().item(), "psnr": metrics.psnr(pixels, ref)}

    def _decoder_plan(self, batch: int, hw) -> tuple:
        """The 2-D decoder's head and blocks, their input shape for `batch` latents of `hw`, and whether they run
        tiled."""
        head, blocks = self.model.decoder_plan()
        cfg = self.spec.config
        shape = (batch, cfg.channels * cfg.channel_mult[-1], *hw)
        return head, blocks, shape, self._streams(blocks, shape)

    def _budget(self) -> int:
        # KL activations are large: the default is half the available RAM (the tiny family caps it at 1 GiB).
        return self.budget or tiling.default_budget(self.device, cap=None)

    def _streams(self, blocks: list, shape: tuple[int, ...]) -> bool:
        """Whether a half runs tiled: forced by --tile N, else when running it whole would not fit the budget."""
        if self.tile is None:
            return False
        return self.tile != "auto" or tiling.whole_bytes(blocks, shape) > self._budget()

    def _streamed(self, blocks: list, x: torch.Tensor, unit: float = 1.0) -> torch.Tensor:
        """`tiling.streamed` over a chain with this codec's budget and tile (`unit`: pixels per cell of `x`)."""
        tile = None if self.tile == "auto" else int(self.tile)
        stats: dict = {}
        out = tiling.streamed(blocks, x, self._budget(), tile, unit=unit, scratch_dir=self.scratch_dir, stats=stats)
        self.scratch_bytes = max(self.scratch_bytes, stats["scratch_bytes"])
        return out

    def _latent_part(self, part: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """A decoder head or encoder tail past the budget: its mid block and output head layer by layer too."""
        stats: dict = {}
        out = layerwise.run_latent_part(part, x, self._budget(), self.scratch_dir, stats)
        self.scratch_bytes = max(self.scratch_bytes, stats["scratch_bytes"])
        return out

    def _banded(self, blocks: list) -> bool:
        """Whether a whole-image chain runs band by band (CPU: less memory, cache-sized work, same numbers)."""
        return self.device.type == "cpu" and self.memory_format == torch.channels_last and banded.supports(blocks)
