"""`python -m bench.attention_kernels`: every attention kernel this platform has, at the attention shapes of the SD
UNet, forward + backward, in float32 and bfloat16: time, achieved FLOP/s, MFU and device memory.

For an accelerator (issue 22 item 4: no kernel becomes a default before it is measured faster on its platform).
Per case (architecture, image size, UNet level, self- or cross-attention, dtype, kernel) it jits the gradient of
<output, w> (+ <map, w'> for the layers that record a map) with respect to q, k, v, as the train step needs it,
and prints one JSON line: compile seconds, median step seconds, the model FLOPs of attention (forward 4 B H Lq Lk
D, backward twice that; a kernel's recomputation is not counted), achieved TFLOP/s, MFU against `--peak-tflops`
(or, on a device kind listed in PEAK_BF16_TFLOPS, its dense bfloat16 peak, for either dtype), XLA's memory
analysis of the compiled step, and the device's peak memory in use so far where it reports one. A case whose
kernel fails prints its error and the run goes on.

  python -m bench.attention_kernels --out attention.jsonl                 # SD1.5 + SD2, 256 and 512 px
  python -m bench.attention_kernels --arch sd15 --px 512 --batch 4 --reps 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import machine
from bench.backbone_jax import memory_analysis
from vpd_jax.models.attention import multi_head_attention
from vpd_jax.models.compute import ATTENTION_KERNELS, MAP_ATTENTION_KERNELS, PallasOptions

CONTEXT = 77  # CLIP text tokens: the keys of SD's cross-attention
# (head width, heads) of UNet levels 0-3 (latent, /2, /4, /8).
ARCHS = {"sd15": ((40, 8), (80, 8), (160, 8), (160, 8)), "sd2": ((64, 5), (64, 10), (64, 20), (64, 20))}
# Dense bfloat16 peak TFLOP/s per chip from the vendors' data sheets, by the start of jax's device_kind.
PEAK_BF16_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0,
                    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def kernels_here(platform: str) -> list[tuple[str, bool]]:
    """(kernel, records a map) for every kernel this platform has."""
    return ([(name, False) for name, needs in ATTENTION_KERNELS.items() if needs in (None, platform)]
            + [(name, True) for name, needs in MAP_ATTENTION_KERNELS.items() if needs in (None, platform)])


def cases(archs, sizes, levels):
    for arch in archs:
        for px in sizes:
            for level in levels:
                width, heads = ARCHS[arch][level]
                tokens = (px // 8 // 2 ** level) ** 2
                for attention, keys in (("self", tokens), ("cross", CONTEXT)):
                    yield dict(arch=arch, px=px, level=level, attention=attention, queries=tokens, keys=keys,
                               heads=heads, head_dim=width)


def gradient_step(case: dict, kernel: str, maps: bool, options: PallasOptions):
    heads = case["heads"]

    def loss(q, k, v, w_out, w_map):
        if maps:
            out, probs = multi_head_attention(q, k, v, heads, return_probs=True, map_implementation=kernel,
                                              pallas=options)
            return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(probs * w_map)
        out, _ = multi_head_attention(q, k, v, heads, implementation=kernel, pallas=options)
        return jnp.sum(out.astype(jnp.float32) * w_out)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def inputs(case: dict, batch: int, dtype, device):
    rng = np.random.default_rng(0)
    width = case["heads"] * case["head_dim"]
    q = rng.standard_normal((batch, case["queries"], width))
    k, v = (rng.standard_normal((batch, case["keys"], width)) for _ in range(2))
    w_out = rng.standard_normal((batch, case["queries"], width))
    w_map = rng.standard_normal((batch, case["queries"], case["keys"]))
    arrays = [jnp.asarray(t, dtype) for t in (q, k, v)] + [jnp.asarray(t, jnp.float32) for t in (w_out, w_map)]
    return [jax.device_put(t, device) for t in arrays]


def attention_flops(case: dict, batch: int) -> float:
    forward = 4.0 * batch * case["heads"] * case["queries"] * case["keys"] * case["head_dim"]
    return 3 * forward


def peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for kind, peak in PEAK_BF16_TFLOPS.items() if device.device_kind.startswith(kind)), None)


def measure(case: dict, kernel: str, maps: bool, dtype: str, args, device) -> dict:
    row = dict(case, kernel=kernel, records_map=maps, dtype=dtype, batch=args.batch, device=device.device_kind)
    try:
        step = gradient_step(case, kernel, maps, PallasOptions(args.block_q, args.block_kv))
        arrays = inputs(case, args.batch, DTYPES[dtype], device)
        start = time.perf_counter()
        compiled = step.lower(*arrays).compile()
        row["compile_s"] = time.perf_counter() - start
        row["memory"] = memory_analysis(compiled)
        jax.block_until_ready(compiled(*arrays))
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*arrays))
            times.append(time.perf_counter() - start)
        row["median_s"] = statistics.median(times)
        row["tflops"] = attention_flops(case, args.batch) / row["median_s"] / 1e12
        peak = peak_tflops(device, args.peak_tflops)
        row["mfu"] = row["tflops"] / peak if peak else None
        stats = device.memory_stats() or {}
        row["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    except Exception as err:  # a kernel that cannot take a shape is a result too; the next case runs
        row["error"] = f"{type(err).__name__}: {err}"[:500]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--px", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--levels", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--kernels", nargs="+", help="only these kernels (default: all this platform has)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--block-q", type=int, default=512)
    parser.add_argument("--block-kv", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, help="the chip's peak TFLOP/s for MFU")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    kernels = [(k, maps) for k, maps in kernels_here(device.platform) if not args.kernels or k in args.kernels]
    header = dict(platform=device.platform, device=device.device_kind, devices=jax.device_count(),
                  versions=machine.versions(), time=machine.now(), kernels=kernels)
    out = open(args.out, "a") if args.out else None

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit(header)
    for case in cases(args.arch, args.px, args.levels):
        for dtype in args.dtype:
            for kernel, maps in kernels:
                emit(measure(case, kernel, maps, dtype, args, device))
    if out:
        out.close()
    print("[bench.attention_kernels] done", file=sys.stderr)


if __name__ == "__main__":
    main()
