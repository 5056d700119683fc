"""What `compute.matmul_precision` costs: the SD v1.5 VPD backbone (taps + maps, bench/backbone_jax.py) forward and
AdamW train step under jax's 'default' and 'highest' matmul precision, timed the same way as `make bench`.

The paper configs use 'highest' (full float32, as the originals' fp32 runs). On the CPU XLA computes float32
matmuls and convolutions in float32 under either setting, so the two should cost the same here; on TPUs ('default':
bfloat16 passes) and Ampere/Hopper GPUs ('default': TF32) the difference is real and wants measuring there. The
features of the two runs are compared too (max relative difference).

  python -m bench.matmul_precision [--image 256] [--batch 1] [--reps 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from bench import cases as cases_lib
from bench import machine, timing
from bench.backbone_jax import Backbone, _compile, bench_adamw, bench_params
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import UNetConfig
from vpd_jax.models.vpd import feature_spec

PRECISIONS = ("default", "highest")


def measure(image: int, batch: int, reps: int) -> dict:
    config = UNetConfig()  # SD v1.5
    device = jax.devices("cpu")[0]
    params = bench_params(UNet2DConditionModel(config), device)
    spec = feature_spec(config, (image, image), use_attn=True)
    backbone = Backbone(config, spec.taps, spec.attn_layers, "float32")
    case = cases_lib.Case(image=image, batch=batch, mode="forward", dtype="float32", reps=reps)
    latent, context = (jax.device_put(a, device) for a in cases_lib.inputs(case, config.cross_attention_dim))
    tx = bench_adamw()
    result = dict(image=image, batch=batch, threads=len(machine.available_cpus()), machine=machine.describe(),
                  load_average=machine.load_average(), rows={})
    features = {}
    for precision in PRECISIONS:
        with jax.default_matmul_precision(precision):
            forward, info = _compile(jax.jit(backbone.features), params, latent, context)
            features[precision] = [np.asarray(f) for f in forward(params, latent, context)]
            row = {"forward": {**timing.run_case(lambda: jax.block_until_ready(forward(params, latent, context)),
                                                 warmup=1, reps=reps), "compile_s": info["compile_s"]}}
            state = {"params": jax.tree.map(lambda x: x.copy(), params)}
            state["opt_state"] = jax.jit(tx.init)(state["params"])
            train, info = _compile(backbone.train_step(tx), state["params"], state["opt_state"], latent, context)

            def step():
                state["params"], state["opt_state"], _ = jax.block_until_ready(
                    train(state["params"], state["opt_state"], latent, context))

            row["train"] = {**timing.run_case(step, warmup=1, reps=reps), "compile_s": info["compile_s"]}
        result["rows"][precision] = row
    result["highest_over_default"] = {mode: result["rows"]["highest"][mode]["median_wall_s"]
                                      / result["rows"]["default"][mode]["median_wall_s"] for mode in ("forward", "train")}
    result["feature_max_relative_difference"] = max(
        float(np.abs(h - d).max() / np.abs(d).max()) for h, d in zip(features["highest"], features["default"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args()
    result = measure(args.image, args.batch, args.reps)
    for precision, row in result["rows"].items():
        print(f"{precision:8s} forward {row['forward']['median_wall_s']:.3f} s   train step "
              f"{row['train']['median_wall_s']:.3f} s   (compile {row['forward']['compile_s']:.0f} s / "
              f"{row['train']['compile_s']:.0f} s)")
    ratio = result["highest_over_default"]
    print(f"highest / default: forward {ratio['forward']:.3f}x, train {ratio['train']:.3f}x; features differ by "
          f"{result['feature_max_relative_difference']:.2e} (relative to their largest value)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
