"""CUDA bench: vaecli vs diffusers on one GPU, same weights and inputs, in one run; prints a table and JSON.

Cases: taesd layout (random weights) vs AutoencoderTiny at 1024; sd15 configuration decode at 1024 vs
AutoencoderKL (time and peak GPU memory); taef2 (real weights) fp32/fp16/bf16 time and PSNR over
../shared/images; the drift TF32 would cause in fp32 (why vaecli turns it off).
Run on a GPU machine: `python bench/cuda.py [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VAE_SHARED_DIR", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))

HALF = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def gpu_time(fn, repeat: int = 5) -> float:
    """Fastest of `repeat` synchronised runs after two warm-ups, in seconds."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def peak_mb(fn) -> float:
    """Peak GPU memory allocated during `fn()`, in MB."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def set_tf32(on: bool) -> None:
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


def case_taesd(dtype: str, size: int = 1024) -> dict:
    from bench.speed import _taesd_pair

    ref, ours = _taesd_pair()
    dt = HALF[dtype]
    ref, ours = ref.cuda().to(dt), ours.cuda().to(dt)
    x = torch.rand(1, 3, size, size, device="cuda", dtype=dt)
    xl = x.contiguous(memory_format=torch.channels_last)
    z = ours.encode(xl)
    return {"ours": gpu_time(lambda: ours.decode(ours.encode(xl))),
            "ref": gpu_time(lambda: ref.decode(ref.encode(x * 2 - 1).latents)),
            "max_abs_diff": (ours.decode(z).float() - ((ref.decode(z.contiguous()).sample + 1) / 2).float()
                             .clamp(0, 1)).abs().max().item()}


def case_sd15(dtype: str, size: int = 1024) -> dict:
    from tests.conftest import diffusers_kl
    from vaecli.checkpoints import kl_state_dict
    from vaecli.codec import build_model
    from vaecli.registry import REGISTRY

    ref = diffusers_kl("sd15")
    ours = build_model(REGISTRY["sd15"]).eval()
    ours.load_state_dict(kl_state_dict(ref.state_dict(), 4, "bench"))
    dt = HALF[dtype]
    ref, ours = ref.cuda().to(dt), ours.cuda().to(dt)  # NCHW: what load_codec uses for KL on CUDA
    z = torch.randn(1, 4, size // 8, size // 8, device="cuda", dtype=dt)
    res = {"ours": gpu_time(lambda: ours.decode(z), 3), "ref": gpu_time(lambda: ref.decode(z), 3),
           "ours_peak_mb": peak_mb(lambda: ours.decode(z)), "ref_peak_mb": peak_mb(lambda: ref.decode(z))}
    res["max_abs_diff"] = (ours.decode(z).float() - ((ref.decode(z).sample.float() + 1) / 2).clamp(0, 1)
                           ).abs().max().item()
    return res


def case_taef2(dtype: str) -> dict:
    from vaecli import media, metrics
    from vaecli.codec import load_codec

    codec = load_codec("taef2", device="cuda", dtype=dtype, tile=None)
    x, info = media.read_image(SHARED / "images" / "retina.jpg")
    res = {"enc_dec_1411": gpu_time(lambda: codec.decode_latent(*codec.encode_image(x, info.size)))}
    res["psnr"] = {}
    for path in sorted((SHARED / "images").iterdir()):
        img, info = media.read_image(path)
        res["psnr"][path.name] = metrics.psnr(media.quantize8(codec.decode_latent(*codec.encode_image(img,
                                                                                                       info.size))),
                                              img)
    return res


def case_tf32_drift() -> dict:
    from vaecli import media
    from vaecli.codec import load_codec

    x, info = media.read_image(SHARED / "images" / "astronaut.png")
    cpu = load_codec("taef2", device="cpu", tile=None)
    latent, meta = cpu.encode_image(x, info.size)
    ref = cpu.decode_latent(latent, meta)
    out = {}
    for on in (False, True):
        gpu = load_codec("taef2", device="cuda", tile=None)
        set_tf32(on)
        out["tf32" if on else "fp32"] = (gpu.decode_latent(latent, meta) - ref).abs().max().item()
    set_tf32(False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "cuda_results.json")
    args = parser.parse_args()
    os.environ.setdefault("VAE_WEIGHTS_DIR", str(SHARED / "weights"))
    results = {"device": torch.cuda.get_device_name()}
    with torch.inference_mode():
        results["tf32_drift"] = case_tf32_drift()
        set_tf32(False)
        for dt in ("fp32", "fp16"):
            results[f"taesd_{dt}"] = case_taesd(dt)
            results[f"sd15_{dt}"] = case_sd15(dt)
        for dt in ("fp32", "fp16", "bf16"):
            results[f"taef2_{dt}"] = case_taef2(dt)
    args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    print(f"\n{results['device']}")
    print("| case | ours s | diffusers s | ratio | ours peak MB | diffusers peak MB | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dt in ("fp32", "fp16"):
        r = results[f"taesd_{dt}"]
        print(f"| taesd {dt} 1024 enc+dec | {r['ours']:.4f} | {r['ref']:.4f} | {r['ours'] / r['ref']:.2f} | - | - | "
              f"{r['max_abs_diff']:.1e} |")
        r = results[f"sd15_{dt}"]
        print(f"| sd15 {dt} 1024 decode | {r['ours']:.4f} | {r['ref']:.4f} | {r['ours'] / r['ref']:.2f} | "
              f"{r['ours_peak_mb']:.0f} | {r['ref_peak_mb']:.0f} | {r['max_abs_diff']:.1e} |")
    base = results["taef2_fp32"]
    for dt in ("fp32", "fp16", "bf16"):
        r = results[f"taef2_{dt}"]
        loss = max(base["psnr"][k] - r["psnr"][k] for k in r["psnr"])
        print(f"taef2 {dt}: enc+dec 1411x1411 {r['enc_dec_1411']:.4f} s, worst PSNR loss vs fp32 {loss:.3f} dB")
    print(f"TF32 drift vs CPU fp32 (taef2 decode, max abs): {results['tf32_drift']}")


if __name__ == "__main__":
    main()
