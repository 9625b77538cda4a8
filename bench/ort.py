"""Bench: vaecli vs ONNX Runtime on the CPU, the same modules, weights and inputs, in one process.

Cases (fp32 and bf16 codecs loaded by `vaecli.codec.load_codec`, as the `vae` command loads them):
- taesd layout, seeded random weights: encode and decode, 512 and 1024;
- taef2, the real weights in ../shared/weights: encode and decode, 512 and 1024;
- sd15 configuration (tests/conftest.py's seeded random diffusers model, converted): decode, 512.

ORT runs vaecli's own fp32 module for that half (`model.encode` on pixels in [0, 1], `model.decode` on the raw
latent, clamped output included), exported to ONNX (TorchScript exporter, opset 17; the dynamo exporter if that
fails) with static shapes (the reference graph: a traced tiny decoder keeps nn.Upsample and the 3x3 conv that
vaecli runs as four 2x2 convs), in an InferenceSession on CPUExecutionProvider with all graph optimizations and
intra_op_num_threads = torch.get_num_threads(). vaecli's side is `Codec.encode_raw` / `decode_raw`: the path the
`vae` command takes for that image (row streams past the budget as `--tile auto` does, unless `--tile off`; banded
KL chains), without reading, padding, latent scaling or writing; its inputs are prepared as `encode_batch` /
`decode_stream` prepare them (codec dtype, channels_last). ORT gets the same values as NCHW fp32 arrays.
Per case: vaecli fp32, vaecli bf16 and ORT fp32 interleaved round by round (one warm-up each; 5 rounds up to 512,
3 above), best and median seconds, the ratios to ORT fp32, and the max abs difference of each output from ORT's.
A 2048x2048 fp32 matrix product is timed in the same rounds (this machine's fp32 peak at that moment: VM clocks
drift between runs); for the tiny models, the reference graph's convolution FLOPs (9 taps for an upsampled conv, as
ORT runs it) over ORT's best time give the rate ORT reaches, to set against it: 0.8x ORT's time needs 1.25x that rate
from the same multiplies.
ORT's idle workers do not spin (`session.intra_op.allow_spinning` 0, unless `--ort-spin`): spinning, they hold the
cores torch's threads need next in this one process. Torch's tensors use huge pages, as in the `vae` command.
Loading a bf16 tiny codec raises glibc's mmap threshold for the whole process (vaecli/allocator.py), so later fp32
runs, vaecli's and ORT's, run under it too; `--no-bf16` measures fp32 without it.
Needs the `bench` extra (onnxruntime, onnx, onnxscript) and diffusers (the `test` extra) for the sd15 weights.
Run: `python bench/ort.py [--cases taesd taef2 sd15] [--sizes 512 1024] [--rounds N] [--tile off]
[--no-bf16] [--ort-spin] [--threads N] [--json out.json]` (`pip install -e .[bench,test]`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from vaecli import allocator  # noqa: E402

allocator.huge_pages()  # before torch's first allocation, as the CLI does

import torch  # noqa: E402

from bench.speed import conv_flops, rounds  # noqa: E402
from vaecli.codec import build_model, load_codec  # noqa: E402
from vaecli.registry import REGISTRY  # noqa: E402

HALVES = {"taesd": ("encode", "decode"), "taef2": ("encode", "decode"), "sd15": ("decode",)}
MAX_SIZE = {"sd15": 512}  # the KL decoder's 1024 run is minutes per round on a small machine
PEAK_GEMM = 2048  # the fp32 matrix product timed with each case, interleaved: this machine's peak in that run


def random_taesd(folder: Path) -> list[Path]:
    """taesd_encoder.pth / taesd_decoder.pth with seeded random weights, in taesd.py's keys (vaecli's own)."""
    torch.manual_seed(0)
    model = build_model(REGISTRY["taesd"]).eval()
    with torch.no_grad():  # non-trivial biases too, so that every parameter shows in the outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(model.encoder.state_dict(), folder / "taesd_encoder.pth")
    torch.save(model.decoder.state_dict(), folder / "taesd_decoder.pth")
    return [folder]


def random_sd15(folder: Path) -> list[Path]:
    """The decoder half of tests/conftest.py's seeded sd15 model, in LDM keys, as one safetensors file."""
    from safetensors.torch import save_file

    from tests.conftest import diffusers_kl
    from vaecli.checkpoints import kl_state_dict

    ref = diffusers_kl("sd15")
    sd = kl_state_dict(ref.state_dict(), len(REGISTRY["sd15"].config.channel_mult), "bench")
    path = folder / "sd15_decoder.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv."))}, str(path))
    return [path]


def weights(name: str, folder: Path) -> list[Path]:
    if name == "taesd":
        return random_taesd(folder)
    if name == "sd15":
        return random_sd15(folder)
    return [SHARED / "weights" / f"{name}_{role}.pth" for role in ("encoder", "decoder")]


class Half(torch.nn.Module):
    """One half of a vaecli model with its plain forward, as a module the exporters take."""

    def __init__(self, model: torch.nn.Module, half: str):
        super().__init__()
        self.model, self.half = model, half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x) if self.half == "encode" else self.model.decode(x)


def ort_session(module: torch.nn.Module, example: torch.Tensor, folder: Path, spin: bool = False):
    """An ORT session running `module` on inputs shaped like `example`, and which exporter made its graph."""
    import onnxruntime as ort

    path = folder / "model.onnx"
    with warnings.catch_warnings():  # the legacy exporter's deprecation, tracer warnings on shape arithmetic
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["y"],
                              opset_version=17, dynamo=False)
            exporter = "torchscript"
        except Exception as e:  # whatever the legacy exporter cannot take, the dynamo one may
            print(f"TorchScript export failed ({type(e).__name__}: {e}); using dynamo", file=sys.stderr)
            torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["y"], dynamo=True)
            exporter = "dynamo"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # Spinning idle workers would hold the cores that torch's threads need in the next timed call.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for f in folder.iterdir():  # the session holds the weights now; external-data files go with the graph
        f.unlink()
    return session, exporter


def vaecli_path(codec, half: str, x: torch.Tensor) -> str:
    """How `encode_raw` / `decode_raw` run this input: tiled, streamed, banded or whole."""
    pixels = x.shape[-2] * x.shape[-1] * (codec.spec.spatial_factor ** 2 if half == "decode" else 1)
    if codec.spec.family == "tiny":
        tile = codec.tile_size(pixels)
        return "whole" if not tile else "rows" if codec.tile == "auto" else f"tiled {tile}"
    if half == "encode":
        blocks = codec.model.encoder_plan()[0]
        streams = codec._streams(blocks, x.shape)
    else:
        _, blocks, _, streams = codec._decoder_plan(1, x.shape[-2:])
    return "streamed" if streams else "banded" if codec._banded(blocks) else "whole"


def run_case(name: str, half: str, size: int, codecs: dict, n_rounds: int, spin: bool = False) -> dict:
    gen = torch.Generator().manual_seed(size)
    spec = REGISTRY[name]
    f32 = codecs["fp32"]
    if half == "encode":
        x = torch.rand(1, 3, size, size, generator=gen)
    elif getattr(f32.model, "encoder", None) is not None:
        # A decoder's input is what the encoder makes of an image, not noise: realistic latent statistics.
        img = torch.rand(1, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            z = f32.encode_raw(img, False, None)
        x = z.clone(memory_format=torch.contiguous_format)  # outside inference mode: the exporter traces with it
    else:
        x = torch.randn(1, spec.latent_channels, size // spec.spatial_factor, size // spec.spatial_factor,
                        generator=gen)
    inputs = {dt: x.to(c.dtype).contiguous(memory_format=c.memory_format) for dt, c in codecs.items()}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        session, exporter = ort_session(Half(f32.model, half).eval(), x, Path(tmp), spin)
    feed = {"x": x.contiguous().numpy()}

    def vaecli_fn(dt: str):
        c, inp = codecs[dt], inputs[dt]
        return (lambda: c.encode_raw(inp, False, None)) if half == "encode" else (lambda: c.decode_raw(inp))

    fns = {f"vaecli_{dt}": (vaecli_fn(dt), 1) for dt in codecs}
    fns["ort_fp32"] = (lambda: session.run(None, feed)[0], 1)
    n = PEAK_GEMM
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    fns["sgemm"] = (lambda: torch.mm(a, b, out=c), 1)
    with torch.inference_mode():
        ref = torch.from_numpy(fns["ort_fp32"][0]())
        diffs = {k: (fns[k][0]().float() - ref).abs().max().item() for k in fns if k.startswith("vaecli")}
        times = rounds(fns, n_rounds)
    sgemm = times.pop("sgemm")
    # The reference graph's convolutions, as ORT runs them (traced: vaecli's own fused and phased calls stay out).
    flops = int(conv_flops(f32.model, lambda: torch.jit.trace(Half(f32.model, half).eval(), x, check_trace=False))) \
        if spec.family == "tiny" else 0
    return {"model": name, "half": half, "size": size, "path": vaecli_path(f32, half, x), "exporter": exporter,
            "rounds": n_rounds, "best": {k: min(v) for k, v in times.items()},
            "median": {k: statistics.median(v) for k, v in times.items()}, "max_abs_diff_vs_ort": diffs,
            "gflop": flops / 1e9, "ort_gflops": flops / 1e9 / min(times["ort_fp32"]) if flops else None,
            "sgemm_peak_gflops": 2 * n ** 3 / 1e9 / min(sgemm)}


def machine() -> dict:
    import onnxruntime as ort

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
            "python": platform.python_version()}


def table(results: list[dict], dtypes: list[str]) -> str:
    def cell(r, key):
        return f"{r['best'][key]:.3f} / {r['median'][key]:.3f}"

    def ratio(r, key):
        return f"{r['best'][key] / r['best']['ort_fp32']:.2f} ({r['median'][key] / r['median']['ort_fp32']:.2f})"

    sides = [f"vaecli_{dt}" for dt in dtypes]
    head = ["case", "vaecli path"] + [f"{s.replace('_', ' ')} s best / median" for s in sides + ["ort_fp32"]]
    head += [f"{s.replace('_', ' ')} / ORT (median)" for s in sides] + [f"max abs diff {dt} vs ORT" for dt in dtypes]
    head += ["ORT fp32 GFLOP/s (sgemm peak)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        row = [f"{r['model']} {r['half']} {r['size']}", r["path"]] + [cell(r, s) for s in sides + ["ort_fp32"]]
        row += [ratio(r, s) for s in sides] + [f"{r['max_abs_diff_vs_ort'][s]:.1e}" for s in sides]
        row += [f"{r['ort_gflops'] or 0:.0f} ({r['sgemm_peak_gflops']:.0f})"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(HALVES), default=list(HALVES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024],
                        help="image sides (sd15 runs only those up to 512)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default: 5 up to 512, 3 above)")
    parser.add_argument("--tile", choices=["auto", "off"], default="auto",
                        help="vaecli's --tile: 'auto' (the vae command's default) or 'off' (whole, like ORT)")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 only (glibc's defaults for every run)")
    parser.add_argument("--ort-spin", action="store_true", help="let ORT's idle workers spin (its default)")
    parser.add_argument("--threads", type=int, help="torch's threads, and so ORT's (default: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = ["fp32"] if args.no_bf16 else ["fp32", "bf16"]
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    results = []
    for name in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            files = weights(name, Path(tmp))
            roles = ("encoder", "decoder") if "encode" in HALVES[name] else ("decoder",)
            codecs = {dt: load_codec(name, files, roles=roles, device="cpu", dtype=dt,
                                         tile=None if args.tile == "off" else "auto") for dt in dtypes}
        for size in [s for s in args.sizes if s <= MAX_SIZE.get(name, s)]:
            for half in HALVES[name]:
                r = run_case(name, half, size, codecs, args.rounds or (5 if size <= 512 else 3), args.ort_spin)
                print(json.dumps(r), flush=True)
                results.append(r)
        del codecs
    print()
    print(table(results, dtypes))
    out = {"bench": "ort", "machine": info, "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
