"""Encoding many images with one loaded codec: the read -> encode -> write stages every engine runs.

`vae encode` (local threads) and each Ray worker run the same `encode_stages`, so they write the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from vaecli import latents, media
from vaecli.files import output_done

SAVERS = {"safetensors": latents.save_safetensors, "png": latents.save_png, "comfyui": latents.save_comfyui}


def input_seed(seed: int, rel: Path | str) -> int:
    """The `--sample` seed of one input: from the run's seed and the input's path relative to its root (what an
    output folder mirrors; a lone file's name), so each input draws its own noise, the same in any order or engine."""
    digest = hashlib.sha256(f"{seed}:{Path(rel).as_posix()}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def frame_seed(seed: int, frame: int) -> int:
    """The `--sample` seed of latent frame `frame` of a clip encoded with `seed` (each frame draws its own noise)."""
    return input_seed(seed, f"frame {frame}")


def scratch_fields(nbytes: int) -> dict:
    """The JSON record's `scratch_bytes` (the most scratch-file space one input used), present when it used some."""
    return {"scratch_bytes": nbytes} if nbytes else {}


def scratch_text(nbytes: int) -> str:
    """The summary line's note of the scratch-file space one input used, if any."""
    return f"  scratch {nbytes / 1e9:.2f} GB" if nbytes else ""


def encode_group(group: list, codec, **options) -> Iterator[tuple]:
    """Encode same-sized image jobs (payload: (1, 3, H, W) in [0, 1] and ImageInfo) in forward passes within the
    codec's pixel budget; yields (job, (C, h, w) latent, metadata) for each."""
    import torch

    h, w = group[0].payload[0].shape[-2:]
    size = group[0].payload[1].size  # read now: callers replace payloads as results come
    sampled = options.get("sample") and options.get("seed") is not None
    per = 1 if sampled else max(1, codec.max_batch_pixels // (h * w))
    for i in range(0, len(group), per):
        part = group[i:i + per]
        opts = options
        if sampled:
            opts = {**options, "seed": input_seed(options["seed"], part[0].rel or part[0].src.name)}
        codec.scratch_bytes = 0  # read by callers as each image comes: this pass's scratch files
        out, meta = codec.encode_batch(torch.cat([job.payload[0] for job in part]), size, **opts)
        for job, latent in zip(part, out, strict=True):
            yield job, latent, meta


def encode_stages(codec, fmt: str = "safetensors", space: str | None = None, sample: bool = False,
                  seed: int | None = None, alpha: str = "white", batch_size: int = 8,
                  skip_existing: bool = False) -> dict:
    """`batch.run` keyword arguments that encode each job's image into `job.dst` as a `fmt` latent file
    ("safetensors", "png" or "comfyui", which needs space "raw"), or with fmt "bytes" keep the safetensors bytes
    in `job.extra["latent_bytes"]`."""
    options = {"space": space, "sample": sample, "seed": seed}

    def compute(group: list) -> None:
        for job, latent, meta in encode_group(group, codec, **options):
            job.payload = (latent.clone(), meta, codec.scratch_bytes)

    def write(job) -> None:
        latent, meta, scratch = job.payload
        shape = list(latent.shape)
        job.extra = {"model": codec.spec.name, "shape": shape, **scratch_fields(scratch)}
        if fmt == "bytes":
            job.extra["latent_bytes"] = latents.safetensors_bytes(latent, meta, str(job.src))
            job.extra["image_size"] = list(meta["image_size"])
            job.extra["line"] = f"{job.src}  {codec.spec.name} latent {shape}{scratch_text(scratch)}"
        else:
            SAVERS[fmt](job.dst, latent, meta)
            job.extra["line"] = f"{job.src} -> {job.dst}  {codec.spec.name} latent {shape}{scratch_text(scratch)}"

    return {"read": lambda job: media.read_image(job.src, alpha), "compute": compute, "write": write,
            "batch_size": 1 if sample else batch_size, "key": lambda job: tuple(job.payload[0].shape),
            "skip": lambda job: skip_existing and job.dst is not None and output_done(job.dst)}
