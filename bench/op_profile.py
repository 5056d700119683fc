"""Where the time of the backbone's train step goes on the CPU: one step of bench's train case under JAX's profiler,
its XLA operations summed by kind (3x3 convolution, weight-gradient convolution, dot, transpose/copy, elementwise,
reduction, ...). The step is `bench.backbone_jax.Backbone.train_step` on bench's weights, the one `make bench`
times against PyTorch.

  python -m bench.op_profile [--image 512] [--query_chunk 128] [--arch sd15|tiny] [--conv auto|xla|matmul] [--top 20]
  python -m bench.op_profile --framework pytorch [--image 512] [--arch sd15|tiny] [--top 20]

Times are summed over XLA:CPU's worker threads (CPU seconds, not wall time). A convolution is named by its window:
'conv 3x3' is a forward or input-gradient convolution, a window as large as an activation ('conv 64x64') is the
weight gradient of a 3x3 convolution at that resolution, which XLA computes as a convolution of the activation with
the output gradient.

`--framework pytorch` profiles the same step as `make bench` times it in PyTorch (bench/backbone_torch.py) with
torch.profiler: each operator's self time on the calling thread (an operator's own worker threads run inside it),
summed by kind: convolutions (forward and backward, all kernel sizes), matrix products, attention
(scaled_dot_product_attention's kernels, forward and backward), the AdamW update (everything under
`optimizer.step` and `zero_grad`), and everything else by operator name.
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile

import jax

from bench import cases as cases_lib
from bench import plan as plan_lib
from bench.backbone_jax import Backbone, bench_adamw, bench_params
from vpd_jax.models.convolution import CONV_IMPLEMENTATIONS
from vpd_jax.models.unet import UNet2DConditionModel
from vpd_jax.models.unet_config import UNetConfig

ARCHS = {"sd15": cases_lib.SD15_UNET, "tiny": cases_lib.TINY_UNET}
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)


def _conv_kind(text: str) -> str:
    window = re.search(r"window=\{size=([0-9x]+)", text)
    return f"conv {window.group(1) if window else '?'}"


def operation_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (kind, result shape) for every instruction of a compiled module's text; a fusion gets
    the kind of the heaviest operation it calls (convolution, dot, reduction, transpose / copy, else elementwise)."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
    kinds = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, op = m.groups()
        kind = op
        if op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = bodies.get(called.group(1), "") if called else ""
            if " convolution(" in body:
                kind = _conv_kind(body)
            elif " dot(" in body:
                kind = "dot"
            elif " reduce(" in body or " reduce-window(" in body:
                kind = "reduction"
            elif " transpose(" in body or " copy(" in body:
                kind = "transpose/copy"
            else:
                kind = "elementwise"
        elif op == "convolution":
            kind = _conv_kind(line)
        kinds[name] = (kind, shape)
    return kinds


def operation_seconds(trace_dir: str) -> collections.Counter:
    """Seconds per XLA operation name, summed over the XLA:CPU worker threads of the trace in `trace_dir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TensorFlow is a dependency (tf.data)

    paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: the profiler wrote no trace")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    seconds = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads
                continue
            for event in line.events:
                seconds[names.get(event.metadata_id, "?")] += event.duration_ps / 1e12
    return seconds


def profile_train_step(arch: str = "sd15", image: int = 512, query_chunk: int = 128, conv: str = "auto") -> dict:
    """{'kinds': {kind: CPU seconds}, 'operations': [(seconds, kind, shape, name)], 'other_events_s'} of one
    profiled train step (after a warm-up step). Other events are the trace's spans that are no operation of the
    compiled step: the executor's spans around the operations, thread-pool waits, while loops around their bodies'
    operations; they overlap the operations and are not part of any kind."""
    unet = ARCHS[arch]
    config = UNetConfig.from_dict(unet)
    device = jax.devices("cpu")[0]
    params = bench_params(UNet2DConditionModel(config), device)
    readout = plan_lib.readouts(unet, {image})[str(image)]
    case = cases_lib.Case(image, 1, "train", "float32", 1, query_chunk=query_chunk, conv=conv)
    backbone = Backbone(config, readout["taps"], readout["attn_layers"], "float32", query_chunk, conv)
    latent, context = (jax.device_put(a, device) for a in cases_lib.inputs(case, config.cross_attention_dim))
    tx = bench_adamw()
    opt_state = jax.jit(tx.init)(params)
    step = backbone.train_step(tx).lower(params, opt_state, latent, context).compile()
    params, opt_state, _ = jax.block_until_ready(step(params, opt_state, latent, context))  # warm-up
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(step(params, opt_state, latent, context))
        seconds = operation_seconds(trace_dir)
    kinds = operation_kinds(step.as_text())
    by_kind, operations, other = collections.Counter(), [], 0.0
    for name, s in seconds.items():
        if name not in kinds or kinds[name][0] == "while":
            other += s
            continue
        kind, shape = kinds[name]
        by_kind[kind] += s
        operations.append((s, kind, shape, name))
    return dict(kinds=dict(by_kind.most_common()), operations=sorted(operations, reverse=True),
                other_events_s=other)


_TORCH_MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})
_TORCH_NAME_FRAGMENTS = (("conv", "conv"), ("scaled_dot_product", "attention"))


def torch_kind(operator: str, under_optimizer: bool) -> str:
    """The kind of a PyTorch operator's self time: 'AdamW' for anything the optimizer runs, else by name."""
    if under_optimizer:
        return "AdamW"
    if operator in _TORCH_MATMULS:
        return "dot"
    return next((kind for fragment, kind in _TORCH_NAME_FRAGMENTS if fragment in operator), operator)


def profile_torch_train_step(arch: str = "sd15", image: int = 512) -> dict:
    """{'kinds': {kind: seconds}, 'operations': [(seconds, kind, operator)]} of one PyTorch train step of bench's
    case (after a warm-up step), from torch.profiler's self CPU times."""
    import torch

    from bench import backbone_torch

    unet = ARCHS[arch]
    device = torch.device("cpu")
    model = backbone_torch.build_unet(unet, device)
    readout = backbone_torch.VPDReadout(model)
    names = plan_lib.readouts(unet, {image})[str(image)]
    readout.select(tuple(names["taps"]), tuple(names["attn_layers"]))
    case = cases_lib.Case(image, 1, "train", "float32", 1)
    inputs = backbone_torch.case_inputs(case, unet, device)
    model.train()
    optimizer = backbone_torch.bench_adamw(model)
    backbone_torch.train_step(readout, optimizer, *inputs, "float32", device)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        backbone_torch.train_step(readout, optimizer, *inputs, "float32", device)
    by_kind, by_operator = collections.Counter(), collections.Counter()
    for event in prof.events():
        root = event
        while root.cpu_parent is not None:
            root = root.cpu_parent
        kind = torch_kind(event.name, root.name.startswith("Optimizer."))
        by_kind[kind] += event.self_cpu_time_total / 1e6
        by_operator[(kind, event.name)] += event.self_cpu_time_total / 1e6
    operations = sorted(((s, kind, name) for (kind, name), s in by_operator.items()), reverse=True)
    return dict(kinds=dict(by_kind.most_common()), operations=operations)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    parser.add_argument("--image", type=int, default=512)
    parser.add_argument("--query_chunk", type=int, default=128, help="0: whole-query attention")
    parser.add_argument("--conv", choices=CONV_IMPLEMENTATIONS, default="auto", help="compute.conv")
    parser.add_argument("--top", type=int, default=20, help="single operations listed")
    parser.add_argument("--framework", choices=("jax", "pytorch"), default="jax")
    args = parser.parse_args(argv)
    if args.framework == "pytorch":
        result = profile_torch_train_step(args.arch, args.image)
        title = f"{args.arch} PyTorch train step, {args.image} px: {{total:.2f}} s of operators' self time"
        rows = [f"{s:9.4f} s  {kind:16s} {name}" for s, kind, name in result["operations"][:args.top]]
        # Every operator that is no kind of its own is a kind: only the --top largest are printed.
        kinds = list(result["kinds"].items())[:args.top]
    else:
        result = profile_train_step(args.arch, args.image, args.query_chunk, args.conv)
        title = (f"{args.arch} train step, {args.image} px, query chunk {args.query_chunk}, conv {args.conv}: "
                 "{total:.2f} CPU s in XLA operations (summed over XLA:CPU's threads)")
        rows = [f"{s:9.4f} s  {kind:16s} {shape:28s} {name}"
                for s, kind, shape, name in result["operations"][:args.top]]
        kinds = list(result["kinds"].items())
    total = sum(result["kinds"].values())
    print(title.format(total=total))
    for kind, s in kinds:
        print(f"  {s:9.3f} s {100 * s / total:5.1f} %  {kind}")
    print(f"top {args.top} operations:")
    for row in rows:
        print(f"  {row}")


if __name__ == "__main__":
    main()
