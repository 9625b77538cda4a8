"""TAEHV tiny causal video autoencoders: taehv (Hunyuan), taew2_1 / taew2_2 (Wan), taecvx (CogVideoX), taehv1_5,
taeltx, and the `_super` decoders.

Layer indices follow the original taehv.py Sequentials, so the published `.pth` / `.safetensors` state dicts load with
a strict `load_state_dict`. Each half is a causal stack over time built from frame-wise layers, MemBlocks (which also
see the previous frame's input), TPool (merges `stride` consecutive frames into one) and TGrow (splits one frame into
`stride`). The whole-clip and the streaming paths run the same chunk-wise code, so they agree to float rounding.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaecli.registry import TAEHVConfig

VARIANTS: dict[str, TAEHVConfig] = {
    "taehv": TAEHVConfig(),  # Hunyuan Video
    "taew2_1": TAEHVConfig(),  # Wan 2.1 (and Wan 2.2 A14B)
    "taew2_2": TAEHVConfig(latent_channels=48, patch_size=2),  # Wan 2.2 TI2V-5B
    "taecvx": TAEHVConfig(cogvideox_trim=True),  # CogVideoX
    "taehv1_5": TAEHVConfig(latent_channels=32, patch_size=2),  # Hunyuan Video 1.5
    "taeltx": TAEHVConfig(latent_channels=128, patch_size=4, encoder_time_downscale=(True,) * 3,
                          decoder_time_upscale=(True,) * 3),  # LTX-Video 2 and 2.3
}


def variant_config(name: str) -> TAEHVConfig:
    """The config for a checkpoint or variant name such as `taew2_2`, `taew2_1_super.pth` (longest known name)."""
    if "taeh3" in name:
        # taeh3 encodes 17-frame chunks each behind three zero frames and drops tokens: not a plain causal stream.
        raise ValueError("taeh3 (MiniMax-H3) chunked coding is not supported")
    known = [k for k in VARIANTS if k in name]
    if not known:
        raise ValueError(f"unknown TAEHV variant {name!r} (known: {', '.join(VARIANTS)})")
    cfg = VARIANTS[max(known, key=len)]
    return replace(cfg, arch="super", decoder_widths=None) if "_super" in name else cfg


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    """3x3 convolution with 'same' padding."""
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3), the range the decoders were trained on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) any range -> same shape in (-3, 3)."""
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block that also sees the previous frame's input: (B, n, H, W) x 2 -> (B, n, H, W) >= 0."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(conv(2 * n, n), nn.ReLU(inplace=True), conv(n, n), nn.ReLU(inplace=True), conv(n, n))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """`x` and `past` (zeros before the first frame) are (B, n, H, W) -> (B, n, H, W)."""
        return torch.relu_(self.conv(torch.cat([x, past], 1)) + x)


class SuperMemBlock(nn.Module):
    """The `_super` decoders' MemBlock: 7x7 depthwise then 4x inverted bottleneck; (B, n, H, W) x 2 -> (B, n, H, W)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * n, 2 * n, 7, padding=3, groups=2 * n, bias=False),
                                  nn.Conv2d(2 * n, 4 * n, 1), nn.ReLU(inplace=True), nn.Conv2d(4 * n, n, 1, bias=False))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """`x` and `past` (zeros before the first frame) are (B, n, H, W) -> (B, n, H, W)."""
        return self.conv(torch.cat([x, past], 1)) + x


class TPool(nn.Module):
    """Temporal downsampling: every `stride` consecutive frames, stacked on channels, mixed into one frame."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n * stride, n, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, n, H, W) with T a multiple of `stride` -> (N, T / stride, n, H, W)."""
        N, T, C, H, W = x.shape
        return self.conv(x.reshape(N * (T // self.stride), self.stride * C, H, W)).reshape(N, T // self.stride, C, H, W)


class TGrow(nn.Module):
    """Temporal upsampling: each frame becomes `stride` consecutive frames (channel groups in time order)."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, n, H, W) -> (N, T * stride, n, H, W)."""
        N, T, C, H, W = x.shape
        return self.conv(x.reshape(N * T, C, H, W)).reshape(N, T * self.stride, C, H, W)


def make_encoder(cfg: TAEHVConfig) -> nn.Sequential:
    """Encoder stack: patched frames (N*T, 3 p^2, H/p, W/p) in [0, 1] -> latents, run by `CausalRunner`."""
    w = cfg.encoder_width
    layers: list[nn.Module] = [conv(3 * cfg.patch_size**2, w), nn.ReLU(inplace=True)]
    for down in cfg.encoder_time_downscale:
        layers += [TPool(w, 2 if down else 1), conv(w, w, stride=2, bias=False), MemBlock(w), MemBlock(w), MemBlock(w)]
    return nn.Sequential(*layers, conv(w, cfg.latent_channels))


def make_decoder(cfg: TAEHVConfig) -> nn.Sequential:
    """Decoder stack: latents -> patched frames (3 p^2 channels, not clamped), run by `CausalRunner`."""
    n, c_out = cfg.decoder_widths, 3 * cfg.patch_size**2
    stages = list(zip(cfg.decoder_space_upscale, cfg.decoder_time_upscale, strict=True))
    if cfg.arch == "super":
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, n[0], 1, bias=False)]
        for i, (space, time) in enumerate(stages):
            s = 2 if space else 1
            layers += [SuperMemBlock(n[i]), SuperMemBlock(n[i]), SuperMemBlock(n[i]), conv(n[i], n[i + 1] * s * s),
                       nn.ReLU(inplace=True), nn.PixelShuffle(s), TGrow(n[i + 1], 2 if time else 1)]
        return nn.Sequential(*layers, conv(n[3], c_out))
    layers = [Clamp(), conv(cfg.latent_channels, n[0]), nn.ReLU(inplace=True)]
    for i, (space, time) in enumerate(stages):
        layers += [MemBlock(n[i]), MemBlock(n[i]), MemBlock(n[i]),
                   nn.Upsample(scale_factor=2) if space else nn.Identity(), TGrow(n[i], 2 if time else 1),
                   conv(n[i], n[i + 1], bias=False)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True), conv(n[3], c_out))


class CausalRunner:
    """Runs a causal stack over a clip given chunk by chunk: (N, t, C, H, W) in -> the outputs those frames complete."""

    # The state between chunks is one input frame per MemBlock and fewer than `stride` frames per TPool, so memory
    # grows with the chunk, never with the clip; a single chunk of the whole clip is the reference's parallel mode.

    def __init__(self, layers: nn.Sequential):
        self.layers = layers
        self.state: list[torch.Tensor | None] = [None] * len(layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, t, C, H, W) -> (N, t', C', H', W'), t' possibly 0 while a TPool waits for more frames."""
        for i, layer in enumerate(self.layers):
            N, T = x.shape[:2]
            if isinstance(layer, (MemBlock, SuperMemBlock)):
                if T == 0:
                    continue
                prev = self.state[i] if self.state[i] is not None else torch.zeros_like(x[:, :1])
                past = torch.cat([prev, x[:, :-1]], 1)
                # A copy, not a view: a view would keep the whole chunk alive until the next one.
                self.state[i] = x[:, -1:].clone()
                x = layer(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, (N, T))
            elif isinstance(layer, TPool):
                if self.state[i] is not None:
                    x = torch.cat([self.state[i], x], 1)
                whole = x.shape[1] - x.shape[1] % layer.stride
                self.state[i] = x[:, whole:].clone() if whole < x.shape[1] else None
                x = layer(x[:, :whole])
            elif isinstance(layer, TGrow):
                x = layer(x)
            else:
                x = layer(x.flatten(0, 1)).unflatten(0, (N, T))
        return x


def _unshuffle(frames: torch.Tensor, p: int) -> torch.Tensor:
    """(N, T, 3, H, W) -> (N, T, 3 p^2, H/p, W/p), each p x p pixel patch onto channels."""
    if p == 1:
        return frames
    if frames.numel() == 0:  # pixel_unshuffle returns an empty input unchanged (torch 2.13)
        N, T, C, H, W = frames.shape
        return frames.new_empty(N, T, C * p * p, H // p, W // p)
    return F.pixel_unshuffle(frames, p)


class StreamEncoder:
    """Encodes a clip pushed a few frames at a time: push((N, t, 3, H, W) in [0, 1]) -> latents (N, t', C, h, w)."""

    def __init__(self, encoder: nn.Sequential, patch_size: int = 1, t_downscale: int = 1, latent_channels: int = 0):
        self.run, self.patch, self.t_down = CausalRunner(encoder), patch_size, t_downscale
        self.channels, self.n_frames, self.last, self.blank = latent_channels, 0, None, None

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (N, t, 3, H, W) in [0, 1] -> the latents (N, t', C, h, w) now complete (t' may be 0)."""
        x = _unshuffle(frames, self.patch)
        self.blank = x[:, :0]
        if x.shape[1]:
            self.last, self.n_frames = x[:, -1:].clone(), self.n_frames + x.shape[1]
        return self.run(x)

    def flush(self) -> torch.Tensor:
        """Pads the clip to whole latents with copies of its last frame -> the remaining latents (N, t', C, h, w)."""
        if self.blank is None:
            return torch.zeros(0, 0, self.channels, 0, 0)
        tail = self.blank if self.last is None else self.last.expand(-1, -self.n_frames % self.t_down, -1, -1, -1)
        out = self.run(tail.contiguous())
        self.run, self.n_frames, self.last, self.blank = CausalRunner(self.run.layers), 0, None, None  # next clip
        return out


class StreamDecoder:
    """Decodes latents pushed a few at a time: push((N, t, C, h, w)) -> frames (N, t', 3, H, W) in [0, 1]."""

    def __init__(self, decoder: nn.Sequential, patch_size: int = 1, trim: int = 0):
        self.run, self.patch, self.trim, self.empty = CausalRunner(decoder), patch_size, trim, None

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, t, C, h, w) -> every frame (N, t', 3, H, W) in [0, 1] they decode to, startup frames dropped."""
        self.empty = latents[:, :0]
        x = self.run(latents)
        drop = min(self.trim, x.shape[1])
        self.trim -= drop
        x = x[:, drop:]
        return (F.pixel_shuffle(x, self.patch) if self.patch > 1 else x).clamp(0, 1)

    def flush(self) -> torch.Tensor:
        """The remaining frames (N, 0, 3, H, W): the decoder is causal, so each push already returned all of its own."""
        return torch.zeros(0, 0, 3, 0, 0) if self.empty is None else self.push(self.empty)


def split_time(x: torch.Tensor, chunk: int | None) -> list[torch.Tensor]:
    """(N, T, ...) -> pieces of at most `chunk` steps along T (the whole, also when T is 0, for `None`)."""
    return [x] if chunk is None or x.shape[1] == 0 else list(x.split(chunk, 1))


class TAEHV(nn.Module):
    """Tiny causal video autoencoder: frames (N, T, 3, H, W) in [0, 1] <-> latents (N, T', C, H/f, W/f) ~N(0, 1)."""

    def __init__(self, config: TAEHVConfig = TAEHVConfig()):
        super().__init__()
        self.config = config
        self.encoder = make_encoder(config)
        self.decoder = make_decoder(config)

    def stream_encoder(self) -> StreamEncoder:
        """A fresh streaming encoder over this model's weights (frames in [0, 1] -> latents)."""
        c = self.config
        return StreamEncoder(self.encoder, c.patch_size, c.t_downscale, c.latent_channels)

    def stream_decoder(self, n_latents: int | None = None) -> StreamDecoder:
        """A fresh streaming decoder (latents -> frames in [0, 1]); `n_latents` is the clip's count where known."""
        return StreamDecoder(self.decoder, self.config.patch_size, self.config.frames_to_trim(n_latents))

    def encode(self, frames: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Frames (N, T, 3, H, W) in [0, 1] -> latents (N, latent_frames(T), C, H/f, W/f), `chunk` frames at a time."""
        s = self.stream_encoder()
        return torch.cat([s.push(x) for x in split_time(frames, chunk)] + [s.flush()], 1)

    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Latents (N, T', C, h, w) -> frames (N, decoded_frames(T'), 3, H, W) in [0, 1], `chunk` latents at a time."""
        s = self.stream_decoder(latents.shape[1])
        return torch.cat([s.push(z) for z in split_time(latents, chunk)], 1)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors from `.safetensors` or (weights only, on the CPU) a torch `.pth`."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _temporal(sd: dict[str, torch.Tensor], half: str) -> dict[int, torch.Tensor]:
    """{layer index: weight} of the TPool / TGrow layers in `half`, in layer order."""
    # They are the only layers whose conv sits directly at `<half>.<i>.conv.weight`.
    found = {int(m[1]): v for k, v in sd.items() if (m := re.fullmatch(rf"{half}\.(\d+)\.conv\.weight", k))}
    return dict(sorted(found.items()))


def config_from_state_dict(sd: dict[str, torch.Tensor], name: str = "") -> TAEHVConfig:
    """The config a checkpoint's shapes imply; the file `name` only decides taecvx's trim (its shapes are taehv's)."""
    if "taeh3" in name:
        variant_config(name)  # raises: unsupported
    pools, grows = list(_temporal(sd, "encoder").values()), _temporal(sd, "decoder")
    if len(pools) != 3 or len(grows) != 3 or "encoder.0.weight" not in sd:
        raise ValueError("not a TAEHV checkpoint (expected encoder.* and decoder.* with 3 TPool and 3 TGrow layers)")
    stem = sd["encoder.0.weight"]
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("encoder."))
    super_arch = "decoder.0.weight" in sd  # base decoders start with a parameter-free Clamp
    # Stage widths are the TGrow widths plus the first conv's (super) or the conv after the last TGrow's (base).
    grow_widths = [g.shape[1] for g in grows.values()]
    if super_arch:
        widths = (sd["decoder.0.weight"].shape[0], *grow_widths)
    else:
        widths = (*grow_widths, sd[f"decoder.{max(grows) + 1}.weight"].shape[0])
    return TAEHVConfig(
        latent_channels=sd[f"encoder.{last}.weight"].shape[0], patch_size=math.isqrt(stem.shape[1] // 3),
        encoder_time_downscale=tuple(p.shape[1] > p.shape[0] for p in pools),
        decoder_time_upscale=tuple(g.shape[0] > g.shape[1] for g in grows.values()),
        arch="super" if super_arch else "base", encoder_width=stem.shape[0], decoder_widths=widths,
        cogvideox_trim="taecvx" in name)


def load_taehv(path: str | Path, config: TAEHVConfig | None = None) -> TAEHV:
    """A TAEHV (eval mode, float32, CPU) from a checkpoint; `config` defaults to what the checkpoint's shapes imply."""
    sd = read_state_dict(path)
    model = TAEHV(config or config_from_state_dict(sd, Path(path).name))
    own = model.state_dict()
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in sd and sd[key].shape[0] > own[key].shape[0]:
            # A preview config with this TGrow off keeps the last of the trained frames: the one aligned in time.
            sd[key] = sd[key][-own[key].shape[0]:]
    model.load_state_dict(sd, strict=True)
    return model.eval()


class Family:
    """vaecli's interface to this family (`vaecli.causal`): build, checkpoint keys, and clip streams on (T, C, h, w)
    latent frames and (T, 3, H, W) pixel frames in [0, 1], one clip at a time."""

    network_space = "raw"  # the latent space of the big autoencoder it stands in for, before the denoiser's scaling
    frame_step = 4  # a clip of 1 + 4k frames gives 1 + k latent frames (TAELTX: 8)

    @staticmethod
    def build(spec, encoder: bool = True, decoder: bool = True) -> TAEHV:
        """The network for registry entry `spec` (both halves: the checkpoints hold both, and they are small)."""
        return TAEHV(spec.config)

    @staticmethod
    def state_dict(spec, sd: dict, source: str) -> dict:
        """A checkpoint in the reference's keys (`encoder.N.*`, `decoder.N.*`), checked against the entry's config."""
        from vaecli.errors import WeightsError

        try:
            found = config_from_state_dict(sd, Path(source).name)
        except ValueError as exc:
            raise WeightsError(f"{source}: {exc}") from None
        if replace(found, cogvideox_trim=spec.config.cogvideox_trim) != spec.config:
            raise WeightsError(f"{source} is a TAEHV checkpoint with {found.latent_channels} latent channels and "
                               f"patch {found.patch_size}, not {spec.name}'s {spec.config.latent_channels} and "
                               f"{spec.config.patch_size}")
        return dict(sd)

    @staticmethod
    def encoder(model: TAEHV) -> FrameRule:
        """A stream: push((k, 3, H, W) frames) -> raw latent frames (k', C, h, w); flush() -> (latents, dropped)."""
        return FrameRule(model.stream_encoder(), model.config.t_downscale)

    @staticmethod
    def decoder(model: TAEHV, n_latents: int):
        """A stream: push((k, C, h, w) raw latent frames) -> pixel frames (k', 3, H, W); flush() -> None."""
        return _Unbatched(model.stream_decoder(n_latents))


class FrameRule:
    """Encodes the first 1 + t*k frames of a clip, t = the temporal factor, streaming: a group of t frames goes to
    the network only once the frame after it has come, so the clip's end is known when the last group is chosen;
    `flush()` encodes the last frame (padded as the network does) and drops the frames after it."""

    def __init__(self, stream: StreamEncoder, step: int):
        self.stream, self.step, self.pending = stream, step, []

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """(k, 3, H, W) frames in [0, 1] -> the raw latent frames (k', C, h, w) now complete."""
        self.pending += list(frames)
        out = []
        while len(self.pending) > self.step:
            out.append(self.stream.push(torch.stack(self.pending[:self.step])[None])[0])
            self.pending = self.pending[self.step:]
        return torch.cat(out) if out else frames.new_zeros(0)

    def flush(self) -> tuple[torch.Tensor | None, int]:
        """The clip's last latent frames and how many trailing frames were dropped."""
        if not self.pending:
            return None, 0
        dropped = len(self.pending) - 1
        last = self.stream.push(self.pending[0][None, None])[0]
        self.pending = []
        return torch.cat([last, self.stream.flush()[0]]), dropped


class _Unbatched:
    def __init__(self, stream: StreamDecoder):
        self.stream = stream

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        return self.stream.push(latents[None])[0]

    def flush(self) -> None:
        return None
