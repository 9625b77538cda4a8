"""The layers and the chunk-wise runtime shared by the TAEHV-style tiny video autoencoders (TAEHV, TAESDV).

A network is an `nn.Sequential` of frame-wise layers, MemBlocks (which also see the previous frame's input), TPool
(merges `stride` consecutive frames into one) and TGrow (splits one frame into `stride`), run over a clip chunk by
chunk by `CausalRunner`; the streams wrap it for vaecli's clip API, and `encoder_split` / `decoder_split` cut a stack
for exact spatial tiles (`vaecli.clip_tiles`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaecli import banded, tiling
from vaecli.clip_tiles import Split


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


class CausalRunner:
    """Runs a causal stack over a clip given chunk by chunk: (N, t, C, H, W) in -> the outputs those frames complete."""

    # The state between chunks is one input frame per MemBlock and fewer than `stride` frames per TPool, so memory
    # grows with the chunk, never with the clip; a single chunk of the whole clip is the reference's parallel mode.

    def __init__(self, layers: nn.Sequential):
        self.layers = layers
        self.state: list[torch.Tensor | None] = [None] * len(layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, t, C, H, W) -> (N, t', C', H', W'), t' possibly 0 while a TPool waits for more frames."""
        layers, i = list(self.layers), -1
        while i + 1 < len(layers):
            i += 1
            layer = layers[i]
            N, T = x.shape[:2]
            # A nearest-2x upsampling and the 3x3 conv after it run as four 2x2 convs of the source (vaecli.banded);
            # a TGrow between them (a 1x1 conv: it commutes with the upsampling) runs first, on a quarter of the pixels.
            j = i + 1 + (i + 1 < len(layers) and isinstance(layers[i + 1], TGrow))
            if j < len(layers) and banded.phased(layer, layers[j]):
                x = layers[i + 1](x) if j > i + 1 else x
                x = banded.upsample_conv(layers[j], x.flatten(0, 1)).unflatten(0, x.shape[:2])
                i = j
                continue
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


def step_chunks(frames: int, step: int) -> list[tuple[int, int]]:
    """`FrameRule`'s steps over a clip of `frames` frames: groups of `step`, then the last frame of 1 + step * k
    alone (the network pads it), each giving one latent frame."""
    n = 1 + (frames - 1) // step
    return [(i * step, (i + 1) * step) for i in range(n - 1)] + [((n - 1) * step, (n - 1) * step + 1)]


def stack_cost(layers: nn.Sequential, frames: int, dtype: torch.dtype, unit: int = 1) -> int:
    """Bytes per tile unit a causal stack holds while it runs a step of `frames` frames: every MemBlock's and TPool's
    kept frames, plus its widest layer's input and output (a MemBlock's: its past, their concatenation and its inner
    activations too) twice, for the reordered copies the CPU convolutions make; `unit` tile units to an input cell
    (a patchify before the stack)."""
    area, t, kept, widest = 1.0, float(frames), 0.0, 0.0
    c = next(m for m in layers.modules() if isinstance(m, nn.Conv2d)).in_channels
    for layer in layers:
        size = t * area * c  # the layer's input
        if isinstance(layer, (MemBlock, SuperMemBlock)):
            kept += c * area
            held = 4 * size + t * area * sum(m.out_channels for m in layer.conv if isinstance(m, nn.Conv2d))
        elif isinstance(layer, TPool):
            kept += (layer.stride - 1) * c * area
            t /= layer.stride
            held = size + t * area * c
        elif isinstance(layer, TGrow):
            t *= layer.stride
            held = size + t * area * c
        elif isinstance(layer, nn.Conv2d):
            area, c = area / layer.stride[0] ** 2, layer.out_channels
            held = size + t * area * c
        else:  # resamplers; ReLU and Clamp (at most a copy)
            s = tiling.upscale(layer)
            area, c = area * s * s, c / (s * s if isinstance(layer, nn.PixelShuffle) else 1)
            held = size + t * area * c
        widest = max(widest, held)
    return math.ceil(dtype.itemsize * (kept + 2 * widest) / (unit * unit))


def _run(layers: nn.Sequential, cache: dict, x: torch.Tensor) -> torch.Tensor:
    """(1, C, k, H, W) through a causal stack with the runner kept in `cache` -> (1, C', k', H', W')."""
    return cache.setdefault("run", CausalRunner(layers))(x.movedim(1, 2)).movedim(1, 2)


def encoder_split(layers: nn.Sequential, t_down: int, patch: int) -> Split:
    """A causal encoder stack cut for `vaecli.clip_tiles`: pixels tile by tile through everything before its last
    downsampling convolution (the TPools included, so a step of `t_down` frames leaves one frame), that convolution
    and the rest (at the latent resolution) whole."""
    cut = max(i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d) and m.stride[0] > 1)
    local_layers, whole_layers = layers[:cut], layers[cut:]
    dtype = next(layers.parameters()).dtype
    down = patch * math.prod(m.stride[0] for m in local_layers.modules() if isinstance(m, nn.Conv2d))
    halo, unit_bytes = tiling.receptive_radius(local_layers) * patch, stack_cost(local_layers, t_down, dtype, patch)

    def local(x, cache, first):
        stream = cache.setdefault("stream", StreamEncoder(local_layers, patch, t_down))
        y = stream.push(x.to(dtype).movedim(1, 2))
        if x.shape[2] < t_down:  # the clip's last frame: the stream pads it as it pads a whole clip's end
            y = torch.cat([y, stream.flush()], 1)
        return y.movedim(1, 2)

    def whole(x, cache):
        return _run(whole_layers, cache, x.to(dtype))

    return Split(whole, local, halo, 1 / down, down, unit_bytes, 1)


def decoder_split(layers: nn.Sequential, t_up: int, patch: int, trim: int) -> Split:
    """A causal decoder stack cut for `vaecli.clip_tiles`: its layers up to the end of the first run of MemBlocks
    whole (at the latent resolution), the rest tile by tile in latent cells; `trim` startup frames dropped."""
    mem = [isinstance(m, (MemBlock, SuperMemBlock)) for m in layers]
    cut = mem.index(False, mem.index(True))
    whole_layers, local_layers = layers[:cut], layers[cut:]
    dtype = next(layers.parameters()).dtype
    up = patch * round(math.prod(tiling.upscale(m) for m in local_layers))
    halo, unit_bytes = tiling.receptive_radius(local_layers), stack_cost(local_layers, 1, dtype)

    def whole(z, cache):
        return _run(whole_layers, cache, z.to(dtype))

    def local(x, cache, first):
        y = _run(local_layers, cache, x.to(dtype))[:, :, trim if first else 0:]
        return (F.pixel_shuffle(y.movedim(1, 2), patch).movedim(1, 2) if patch > 1 else y).clamp(0, 1)

    return Split(whole, local, halo, up, 1, unit_bytes, up)


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


class Unbatched:
    """A clip stream over (N, T, ...) tensors used on (T, ...) ones."""

    def __init__(self, stream: StreamDecoder):
        self.stream = stream

    def push(self, latents: torch.Tensor) -> torch.Tensor:
        return self.stream.push(latents[None])[0]

    def flush(self) -> None:
        return None
