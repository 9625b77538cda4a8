"""Speed bench: vaecli vs diffusers on the same weights and inputs, in one run; prints a table and JSON.

Cases (each in a fresh process, so peak RSS is its own):
- conv peak: one 3x3 conv, 64->64 at 256x256, NCHW/channels_last, fp32/bf16 (this machine's ceiling);
- taesd layout (random weights): vaecli vs diffusers AutoencoderTiny, encode and decode, 512 and 1024;
- taef2 (real weights) fp32 and bf16: time, achieved GFLOP/s, PSNR over ../shared/images;
- sd15 and flux1 configurations (random weights): decode vs diffusers AutoencoderKL, each side alone in a
  process for its peak RSS (512; sd15 1024 with --full);
- with --full, torch.compile on taef2's decoder (cold compile time, compiled vs eager), fp32 and bf16.
Decoder GFLOP/s are set against the reference conv timed in the same process, interleaved with the decodes.
Cases run under torch's default allocator settings; those named `@cli` with huge pages, as the `vae` command
runs (THP_MEM_ALLOC_ENABLE=1, see vaecli/allocator.py).
Run: `make bench` or `python bench/speed.py [--full] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


def conv_flops(model: torch.nn.Module, run) -> int:
    """FLOPs of every Conv2d in `model` during `run()` (2 * MACs), as the module calls them: run the reference
    graph (e.g. `nn.Sequential.forward`) to count an upsampled 3x3 conv as 9 taps over the upsampled image, as the
    GFLOP/s figures do, not vaecli's 4 (`banded.upsample_conv`)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1]
        total += 2 * out.numel() * mod.in_channels // mod.groups * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total


def rounds(fns: dict, n: int) -> dict[str, list[float]]:
    """Seconds of each `(fn, repeat)` in `fns` (its best of `repeat`) in each of `n` rounds, the functions
    interleaved round by round so that all see the same state of this shared machine; one warm-up each."""
    for fn, _ in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, (fn, repeat) in fns.items():
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[name].append(min(times))
    return out


def summary(times: dict[str, list[float]]) -> dict:
    """Each name's best time, plus a "medians" entry with each name's median: the rounds of `rounds`, summarised."""
    return {**{name: min(v) for name, v in times.items()},
            "medians": {name: statistics.median(v) for name, v in times.items()}}


def best_time(fn, repeat: int = 3) -> float:
    """Fastest of `repeat` timed runs after one warm-up."""
    return rounds({"fn": (fn, repeat)}, 1)["fn"][0]


PEAK_FLOPS = 2 * 64 * 64 * 9 * 256 * 256  # the reference conv: 3x3, 64->64 channels, 256x256


def peak_conv(dtype: torch.dtype, layout=torch.channels_last):
    """The reference conv (PEAK_FLOPS) as a no-argument function, in `dtype` and `layout`."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(dtype=dtype, memory_format=layout)
    x = torch.randn(1, 64, 256, 256, dtype=dtype).contiguous(memory_format=layout)
    return lambda: conv(x)


def case_conv() -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, layout in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            secs = best_time(peak_conv(dtype, layout), repeat=20)  # the best of many: this is the ceiling
            out[f"{str(dtype)[6:]}_{name}"] = PEAK_FLOPS / secs / 1e9
    return {"gflops": out}


def _taesd_pair():
    from diffusers import AutoencoderTiny

    from vaecli.checkpoints import model_state_dict
    from vaecli.codec import build_model
    from vaecli.registry import REGISTRY

    torch.manual_seed(0)
    ref = AutoencoderTiny().eval()
    spec = REGISTRY["taesd"]
    ours = build_model(spec).eval()
    ours.load_state_dict(model_state_dict(spec, ref.state_dict(), "bench"))
    return ref, ours.to(memory_format=torch.channels_last)


def case_taesd(size: int) -> dict:
    ref, ours = _taesd_pair()
    x = torch.rand(1, 3, size, size)
    xl = x.contiguous(memory_format=torch.channels_last)
    zl = ours.encode(xl).contiguous(memory_format=torch.channels_last)
    z = zl.contiguous()  # diffusers as users call it: NCHW tensors
    t = rounds({"ours_encode": (lambda: ours.encode(xl), 1), "ours_decode": (lambda: ours.decode(zl), 1),
                "ref_encode": (lambda: ref.encode(x * 2 - 1), 1), "ref_decode": (lambda: ref.decode(z), 1),
                "peak_conv": (peak_conv(torch.float32), 10)}, 3)
    res = summary(t)
    res["max_abs_diff"] = max((ours.encode(xl) - ref.encode(x * 2 - 1).latents).abs().max().item(),
                              (ours.decoder(zl) - (ref.decode(z).sample + 1) / 2).abs().max().item())
    res["flops_decode"] = conv_flops(ours, lambda: torch.nn.Sequential.forward(ours.decoder, zl))
    return res


def case_taef2(dtype: str) -> dict:
    from vaecli import media, metrics
    from vaecli.codec import load_codec
    os.environ.setdefault("VAE_WEIGHTS_DIR", str(SHARED / "weights"))
    codec = load_codec("taef2", device="cpu", dtype=dtype, tile=None)
    x, info = media.read_image(SHARED / "images" / "astronaut.png")
    latent, meta = codec.encode_image(x, info.size)
    t = rounds({"encode": (lambda: codec.encode_image(x, info.size), 1),
                "decode": (lambda: codec.decode_latent(latent, meta), 1),
                "peak_conv": (peak_conv(codec.dtype), 5)}, 10)
    z = latent[None].to(codec.dtype).contiguous(memory_format=torch.channels_last)
    # Counted by module hooks on an fp32 copy: the bf16 path calls fused oneDNN ops that bypass the modules.
    ref = copy.deepcopy(codec.model).float()
    flops = conv_flops(ref, lambda: torch.nn.Sequential.forward(ref.decoder, z.float()))
    psnrs = {}
    for path in sorted((SHARED / "images").iterdir()):
        if path.name == "retina.jpg":
            continue  # the largest photo; PSNR change is the same story at a quarter of the time
        img, info = media.read_image(path)
        lat, m = codec.encode_image(img, info.size)
        y = codec.decode_latent(lat, m)
        y = media.quantize8(y)
        psnrs[path.name] = metrics.psnr(y, img)
    return {**summary(t), "flops_decode": flops, "psnr": psnrs}


def case_compile(dtype: str) -> dict:
    """taef2's decoder at 512x512: eager vs torch.compile (inductor, default mode), and what compiling costs."""
    from vaecli.codec import load_codec
    os.environ.setdefault("VAE_WEIGHTS_DIR", str(SHARED / "weights"))
    codec = load_codec("taef2", device="cpu", dtype=dtype, tile=None)
    torch.manual_seed(0)
    z = torch.randn(1, 32, 64, 64).to(codec.dtype).contiguous(memory_format=torch.channels_last)
    eager = codec.model.decoder
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, as on a user's first run
        t = time.perf_counter()
        compiled = torch.compile(eager)
        out = compiled(z)
        compile_s = time.perf_counter() - t
        t = rounds({"eager": (lambda: eager(z), 1), "compiled": (lambda: compiled(z), 1)}, 5)
    return {"compile_s": compile_s, "eager": min(t["eager"]), "compiled": min(t["compiled"]),
            "max_abs_diff": (out.float() - eager(z).float()).abs().max().item()}


def case_kl(name: str, size: int, impl: str) -> dict:
    """One decode of a `size` image by `impl` (ours: the codec's default path; diffusers: AutoencoderKL), alone in
    its process so that its peak RSS is its own; both build the same seeded weights and latent."""
    from tests.conftest import diffusers_kl
    from vaecli.checkpoints import kl_state_dict
    from vaecli.codec import build_model
    from vaecli.families import family
    from vaecli.registry import REGISTRY

    spec = REGISTRY[name]
    ref = diffusers_kl(name)
    del ref.encoder  # decode only, on both sides
    torch.manual_seed(1)
    z = torch.randn(1, spec.latent_channels, size // 8, size // 8)  # NCHW for diffusers, as users call it
    if impl == "ours":
        model = build_model(spec, encoder=False).eval()
        sd = {k: v for k, v in kl_state_dict(ref.state_dict(), len(spec.config.channel_mult), "bench").items()
              if not k.startswith(("encoder.", "quant_conv."))}
        model.load_state_dict(sd)
        del ref, sd  # the reference and the converted copy: ours then holds only its own decoder
        from vaecli import allocator

        gc.collect()
        allocator.release_free_memory()
        codec = family(spec)(spec, model.to(memory_format=torch.channels_last), torch.device("cpu"), torch.float32)
        run = lambda z: codec.decode_raw(z.contiguous(memory_format=torch.channels_last))  # noqa: E731
    else:
        run = lambda z: ((ref.decode(z).sample + 1) / 2).clamp(0, 1)  # noqa: E731
    run(z[:, :, :8, :8])  # oneDNN's first-call set-up, outside the timing
    secs = []
    for _ in range(2):  # the better of two: this machine is shared
        t = time.perf_counter()
        out = run(z)
        secs.append(time.perf_counter() - t)
    return {"decode": min(secs), "sample": out[0, :, :4, :4].flatten().tolist()}


CASES = {"conv": case_conv, "taesd512": lambda: case_taesd(512), "taesd1024": lambda: case_taesd(1024),
         "taef2_fp32": lambda: case_taef2("fp32"), "taef2_bf16": lambda: case_taef2("bf16"),
         "compile_fp32": lambda: case_compile("fp32"), "compile_bf16": lambda: case_compile("bf16")}
KL_CASES = [("sd15", 512), ("flux1", 512), ("sd15", 1024)]  # sd15 at 1024 with --full
for _name, _size in KL_CASES:
    for _impl in ("ours", "diffusers"):
        CASES[f"{_name}_{_size}_{_impl}"] = lambda n=_name, s=_size, i=_impl: case_kl(n, s, i)


def run_case(name: str) -> dict:
    """Run one case in a fresh interpreter, with torch's default allocator settings (`<case>@cli`: with huge pages,
    as the `vae` command runs); its result plus its peak RSS."""
    case, _, cli = name.partition("@")
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if cli else "0"}
    out = subprocess.run([sys.executable, __file__, "--case", case], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help="include sd15 at 1024x1024 and torch.compile (slow)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args()
    if args.case:
        with torch.inference_mode():
            result = CASES[args.case]()
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    kl = [f"{n}_{size}" for n, size in KL_CASES if size <= 512 or args.full]
    # Against diffusers under torch's defaults, as diffusers is run and as the figures were taken; taesd 1024
    # also with huge pages on both sides (what `vae` sets for itself helps diffusers' allocations more than ours).
    # Our own figures (taef2, compile) as the `vae` command runs.
    names = ["conv", "taesd512", "taesd1024", "taesd1024@cli", "taef2_fp32@cli", "taef2_bf16@cli"]
    names += [f"{k}_{i}" for k in kl for i in ("ours", "diffusers")]
    names += ["compile_fp32@cli", "compile_bf16@cli"] if args.full else []
    results = {}
    for name in names:
        results[name] = run_case(name)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    peak = results["conv"]["gflops"]
    print("\n| case | ours s | diffusers s | ratio (median) | decoder GFLOP/s | % of conv peak (median) "
          "| peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")

    def rate(r: dict, dec: str) -> str:
        # Against the reference conv timed in the same process, interleaved with the decodes: best vs best, and
        # median vs median in brackets.
        best = r["flops_decode"] / r[dec] / (PEAK_FLOPS / r["peak_conv"])
        median = r["flops_decode"] / r["medians"][dec] / (PEAK_FLOPS / r["medians"]["peak_conv"])
        return f"{r['flops_decode'] / r[dec] / 1e9:.0f} | {100 * best:.0f}% ({100 * median:.0f}%)"

    for key in ("taesd512", "taesd1024", "taesd1024@cli"):
        r = results[key]
        ours, ref = r["ours_encode"] + r["ours_decode"], r["ref_encode"] + r["ref_decode"]
        m = r["medians"]
        median = (m["ours_encode"] + m["ours_decode"]) / (m["ref_encode"] + m["ref_decode"])
        print(f"| {key.replace('taesd', 'taesd fp32 ')} enc+dec | {ours:.2f} | {ref:.2f} | {ours / ref:.2f} "
              f"({median:.2f}) | {rate(r, 'ours_decode')} | {r['peak_rss_mb']:.0f} |")
    for dtype in ("fp32", "bf16"):
        r = results[f"taef2_{dtype}@cli"]
        print(f"| taef2 {dtype} 512 enc+dec @cli | {r['encode'] + r['decode']:.2f} | - | - | {rate(r, 'decode')} | "
              f"{r['peak_rss_mb']:.0f} |")
    for key in kl:
        ours, ref = results[f"{key}_ours"], results[f"{key}_diffusers"]
        print(f"| {key} fp32 decode | {ours['decode']:.2f} | {ref['decode']:.2f} | {ours['decode'] / ref['decode']:.2f}"
              f" | - | - | {ours['peak_rss_mb']:.0f} / {ref['peak_rss_mb']:.0f} "
              f"({ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}) |")
        diff = max(abs(a - b) for a, b in zip(ours["sample"], ref["sample"], strict=True))
        results[key] = {"time_ratio": ours["decode"] / ref["decode"],
                        "peak_ratio": ours["peak_rss_mb"] / ref["peak_rss_mb"], "sample_max_abs_diff": diff}
    f32, b16 = results["taef2_fp32@cli"], results["taef2_bf16@cli"]
    speedup = (f32["encode"] + f32["decode"]) / (b16["encode"] + b16["decode"])
    loss = {k: round(f32["psnr"][k] - b16["psnr"][k], 3) for k in f32["psnr"]}
    print(f"\nbf16 vs fp32 (taef2): {speedup:.2f}x faster; PSNR loss per photo (dB): {loss}")
    for dtype in ("fp32", "bf16") if args.full else ():
        r = results[f"compile_{dtype}@cli"]
        print(f"torch.compile, taef2 decoder {dtype} 512x512: {r['compiled']:.3f} s compiled vs {r['eager']:.3f} s "
              f"eager ({r['compiled'] / r['eager']:.2f}x the time), after a {r['compile_s']:.1f} s cold compile")
    print(f"conv peak GFLOP/s (own process, best of 20): {json.dumps({k: round(v) for k, v in peak.items()})}")
    args.json.write_text(json.dumps({"time": time.time(), "results": results}, indent=1))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
