"""BENCHMARKS.md from the results of `python -m bench.run` (the dict it writes to results.json)."""
from __future__ import annotations

from typing import Iterable, Sequence

from bench import machine
from bench.cases import AGREEMENT_TOLERANCE

GIB = 2 ** 30

METHOD = """\
**Backbone, JAX vs PyTorch.** Both sides do VPD's backbone work (bench/cases.py): the SD UNet at t = 1 on the
latent of the input size, 150 context tokens, read out at VPD's four taps with the head-averaged cross-attention
maps of VPD's layers averaged per resolution and concatenated (no gradient through the maps); nothing after the
last tap is computed. JAX: our Flax UNet (`taps`, `attn_maps`, `output_sample=False`), jitted, train step with
parameters and optimizer state donated. PyTorch: diffusers' `UNet2DConditionModel` with its output head removed,
forward hooks for the taps and an attention processor recording the maps at VPD's layers (every other layer
keeps diffusers' default `scaled_dot_product_attention`). *forward*: the four features without gradient;
*train*: loss = sum of mean(feature^2), gradient for every UNet parameter, one AdamW update (lr 1e-5, weight
decay 0.01). bfloat16 means bf16 compute with fp32 parameters and optimizer state (JAX: the model's `dtype`;
PyTorch: `torch.autocast`). *JAX query chunk N*: the same case with the UNet's `attention_query_chunk` = N
(attention layers that record no map attend N queries at a time, the same values; the configs' default is all
at once, as the references); PyTorch has no such setting, so its numbers there are those of the case without it.
*JAX conv xla*: the same case with `compute.conv='xla'`, XLA's convolution for every conv layer; the other JAX rows
run the default 'auto', which on XLA:CPU computes the 1x1 convolutions and those of the two lowest UNet levels as
matrix products (vpd_jax/models/convolution.py); PyTorch's numbers are again those of the case without it.

Fairness: the same shapes, dtype and random weights (generated from each parameter's PyTorch name, so both hold
identical values, bench/weights.py) and the same parameters (the output head exists on neither side). Each case
runs in a fresh process per framework, JAX first, then PyTorch, back to back; each process is pinned to the same
CPUs, with the OpenMP/MKL pools and `torch.set_num_threads` set to that count (XLA:CPU sizes its pool from the
affinity mask). Each case is called `warmup` times untimed (JAX compilation, PyTorch allocator warm-up), then
`reps` times; the tables give the median per image. JAX's tracing + compilation is timed on its own and never
inside the timed calls. Wall time is what counts; process CPU time is shown beside it because it stretches
less when other jobs share the machine. Peak RSS is the process's high-water mark over warm-up and timed calls
(reset before the case), so it includes the weights, the framework and, for JAX, memory the compiler left in
the allocator; XLA's own compiled memory analysis is given beside it. Both frameworks' features are compared
(max difference of 512 strided samples per feature / max magnitude; train: the first loss) and must agree
within {tolerances}.

**Compiled cost.** FLOPs from XLA's cost analysis of the compiled programs (abstract inputs, nothing runs) next
to an analytic count written from the architecture (bench/flops.py: convolutions, linear layers and the two
attention matmuls at 2 FLOPs per multiply-add; XLA's count also has the elementwise work, so it lands a few per
cent above). **Memory** is XLA's compiled per-device memory of the real VPD-seg train step (`Trainer.train_step`
as train.py jits it: sharded, state donated): arguments + temporaries + outputs not aliased to a donated
argument, on XLA:CPU with 8 fake devices for the meshes and its concurrency-optimised scheduler off (that
scheduler buys parallelism on a CPU with a quarter more peak memory; TPU and GPU schedule differently, so a
TPU/GPU buffer assignment differs somewhat). A step's peak is the larger of the activations, which grow with the
batch, and the optimizer update (parameters, gradients, both moments and the guard's candidate at once), which
does not: *fixed* and *per example* are the straight line through the two largest batches, a smaller batch that
compiles above that line (marked †) is bound by the update, and the largest per-device batch under a capacity
is where the line reaches it, or 0 where the update does not fit (rows marked * take the slope of their 1-device
row). The line is an estimate from the compiled sizes, not a run. bfloat16 comes out above float32 at batch
1 on XLA:CPU: it adds bf16 copies of the weights, and the per-example activations barely shrink (XLA:CPU
computes bf16 matmuls in float32); that row describes XLA:CPU only, not bf16 on a TPU or GPU. *query chunk* is
`compute.attention_query_chunk` (queries per attention chunk, none = all at once); *non-finite check* is
`config.nonfinite_check` ('gradients', the default, or 'updates', which also checks the update itself, so that
it has to exist beside the old state).

**Input pipeline.** The real training pipelines on synthetic full-size images written in the datasets' layouts;
img/s/core is images per CPU-second of the whole process (all tf.data threads)."""


def table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _gib(n: float | None) -> str:
    return "–" if n is None else f"{n / GIB:.2f}"


def _part_header(title: str, part: dict, machine_now: str) -> list[str]:
    """When and from which commit a part was measured, and on which machine if not the header's (an `--only` run
    keeps the other parts of an earlier one)."""
    code = f"commit {part['code']}" if "code" in part else "a commit that run did not record"
    if "machine" not in part:
        where = " on a machine that run did not record"
    else:
        where = "" if part["machine"] == machine_now else f" **on another machine: {part['machine']}**"
    return [f"## {title}", "", f"Measured {part.get('started', '?')} in {part.get('elapsed_s', 0):.0f} s from {code}"
            f"{where}; load average {part.get('load_average_at_start')} at the start, "
            f"{part.get('load_average_at_end')} at the end.", ""]


def _errors(items: Iterable[tuple[str, dict]]) -> list[str]:
    """The rows that did not run, under "Skipped:" (a reason starting with 'skipped') or "Failed:"."""
    items, out = list(items), []
    for heading, skipped in (("Failed:", False), ("Skipped:", True)):
        lines = [f"- **{name}**: {row['error']}" for name, row in items
                 if "error" in row and row["error"].startswith("skipped") == skipped]
        out += ["", heading, "", *lines] if lines else []
    return out


def _backbone(part: dict, machine_now: str) -> list[str]:
    out = _part_header("1. Backbone: JAX vs PyTorch", part, machine_now)
    out.append(f"Device `{part['device']}`, {part['threads']} threads per framework, median of `reps` timed calls "
               "after `warmup`; seconds per image.")
    out.append("")
    rows, memory = [], []
    for r in part["cases"]:
        j, t, c, batch = r["jax"], r["pytorch"], r["comparison"], r["case"]["batch"]
        per_image = lambda row, key: row[key] / batch if key in row else None  # noqa: E731
        agree = "–" if c["agree"] is None else f"{'yes' if c['agree'] else '**NO**'} ({c['difference']:.1e})"
        rows.append([r["name"], r["case"]["reps"], _num(per_image(j, "median_wall_s")),
                     _num(per_image(t, "median_wall_s")), _num(c["wall_ratio"]), _num(per_image(j, "median_cpu_s")),
                     _num(per_image(t, "median_cpu_s")), _num(c["cpu_ratio"]),
                     _num(j.get("lower_s", 0) + j["compile_s"]) if "compile_s" in j else "–", agree])
        xla = j.get("xla_memory", {})
        memory.append([r["name"], _gib(j.get("peak_rss_bytes")), _gib(t.get("peak_rss_bytes")),
                       _gib(xla.get("argument_size_in_bytes")), _gib(xla.get("temp_size_in_bytes")),
                       _gib(xla.get("output_size_in_bytes", 0) - xla.get("alias_size_in_bytes", 0)) if xla else "–",
                       _gib(j.get("device_peak_bytes")), _gib(t.get("device_peak_bytes"))])
    out.append(table(["case", "reps", "JAX s/img", "PyTorch s/img", "JAX / PyTorch", "JAX CPU s/img",
                      "PyTorch CPU s/img", "CPU ratio", "JAX trace + compile s", "same features (max rel. diff)"],
                     rows))
    out += ["", "Memory (GiB): peak RSS per process; XLA's compiled memory analysis of the JAX program; device peak "
            "on an accelerator.", ""]
    out.append(table(["case", "JAX peak RSS", "PyTorch peak RSS", "XLA arguments", "XLA temporaries",
                      "XLA outputs (not aliased)", "JAX device peak", "PyTorch device peak"], memory))
    first = next((r for r in part["cases"] if "parameters" in r["jax"] and "parameters" in r["pytorch"]), None)
    if first:
        out += ["", f"UNet parameters: JAX {first['jax']['parameters']:,}, PyTorch {first['pytorch']['parameters']:,}; "
                f"weight set-up {first['jax']['setup_s']:.1f} s (JAX), {first['pytorch']['setup_s']:.1f} s (PyTorch), "
                "outside every timing."]
    out += _errors([(f"{r['name']} ({side})", r[side]) for r in part["cases"] for side in ("jax", "pytorch")])
    return out


def _compiled(part: dict, machine_now: str) -> list[str]:
    out = _part_header("2-3. Compiled cost and memory (compile only)", part, machine_now)
    if "error" in part:
        return out + [f"Failed: {part['error']}"]
    if part.get("jobs"):
        rss = [j["peak_rss_bytes"] for j in part["jobs"] if "peak_rss_bytes" in j]
        out += [f"compile jobs: {len(part['jobs'])}, each in its own process, {part['parallel_jobs']} at a time"
                + (f"; peak RSS per job up to {_gib(max(rss))} GiB." if rss else "."), ""]
    cost = part.get("cost", {})
    if "error" in cost:
        out.append(f"Cost failed: {cost['error']}")
    elif cost:
        batch = cost["batch"]
        out += [f"### Compiled FLOPs vs analytic ({cost['arch']}, {cost['image']}x{cost['image']} input, batch "
                f"{batch}; GFLOP per image)", ""]
        out.append(table(["program", "XLA", "analytic", "XLA / analytic", "compile s", "note"],
                         [[p["name"], _num(p["flops"] / batch / 1e9, 4), _num(p["analytic_flops"] / batch / 1e9, 4),
                           _num(p["flops"] / p["analytic_flops"], 4), _num(p["compile_s"]), p["note"]]
                          for p in cost["programs"]]))
        out += ["", "Not compiled anywhere: " + "; ".join(f"{n['name']}: {n['analytic_flops'] / batch / 1e9:.4g} "
                                                          "GFLOP per image" for n in cost["not_compiled"]), ""]
        out += [f"- {'holds' if f['holds'] else '**DOES NOT HOLD**'}: {f['claim']} ({f['detail']})"
                for f in cost["findings"]]
    memory = part.get("memory")
    if memory is None:
        out += ["", "Memory: not run in this mode (no VPD-seg train step compiled)."]
    elif "error" in memory:
        out += ["", f"Memory failed: {memory['error']}"]
    else:
        caps = [f"{c:g}" for c in memory["capacities_gib"]]
        batches = sorted({p["per_device_batch"] for r in memory["rows"] for p in r["points"]})
        out += ["", f"### Per-device memory of the VPD-seg train step ({memory['arch']}, {memory['image']}x"
                f"{memory['image']} crops; GiB)", ""]
        rows, borrowed = [], False
        for r in memory["rows"]:
            mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items()) or "1 device"
            plateau = set(r.get("plateau_batches", ()))
            at = {}  # per-device batch -> its cell
            for p in r["points"]:
                b = p["per_device_batch"]
                at[b] = _gib(p["per_device_bytes"]) + ("†" if b in plateau else "")
            star = "*" if r.get("per_example_from") == "1 device" else ""
            borrowed |= bool(star)
            rows.append([mesh, r["dtype"], r["remat"] or "none", r["attention_query_chunk"] or "none",
                         r["nonfinite_check"], *(at.get(b, _gib(None)) for b in batches),
                         _gib(r["points"][0]["argument_size_in_bytes"]), _gib(r["fixed_bytes"]),
                         _gib(r["per_example_bytes"]) + star,
                         *("–" if r["max_batch"][c] is None else r["max_batch"][c] for c in caps)])
        out.append(table(["mesh", "compute", "remat", "query chunk", "non-finite check",
                          *(f"batch {b}" for b in batches), "of which arguments (b1)",
                          "fixed", "per example", *(f"max batch {c} GiB" for c in caps)], rows))
        if any(r.get("plateau_batches") for r in memory["rows"]):
            out += ["", "† above the line through the larger batches: the peak there is the optimizer update, not "
                    "the activations."]
        if borrowed:
            out += ["", "\\* compiled at one per-device batch; per example from the 1-device row of the same "
                    "dtype, remat and query chunk (the per-device activations do not depend on how the parameters "
                    "are sharded), fixed = the compiled size minus that. `--full` compiles every row at several "
                    "batches."]
    return out


def _input(part: dict, machine_now: str) -> list[str]:
    out = _part_header("4. Input pipeline", part, machine_now)
    if "error" in part:
        return out + [f"Failed: {part['error']}"]
    out.append(f"{part['cores']} CPU cores available, batch {part['batch_size']}.")
    out.append("")
    out.append(table(["pipeline", "crop", "images", "img/s", "img/s/core"],
                     [[r["pipeline"], r["shape"], r["images"], _num(r["img/s"]), _num(r["img/s/core"])]
                      for r in part["rows"]]))
    return out


def render(results: dict) -> str:
    m = results["machine"]
    ram = f"{m['ram_bytes'] / GIB:.0f} GiB RAM" if m.get("ram_bytes") else "RAM unknown (psutil not installed)"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    tolerances = " and ".join(f"{tol:g} ({dtype})" for dtype, tol in AGREEMENT_TOLERANCE.items())
    out = ["# Benchmarks", "",
           f"Written by `{results['command']}` (`make bench` runs the default mode) on {m['date']}; mode "
           f"`{results['mode']}`, device `{results['device']}`. Do not edit: rerun the command. Raw numbers: "
           f"{results.get('results_file', 'results.json')}.", "",
           "## Machine", "",
           f"{m['cpu_model']} ({', '.join(m['cpu_flags']) or 'no AVX2/AVX-512 flags'}), {m['logical_cpus']} logical "
           f"CPUs ({m['available_cpus']} available to the run), {ram}; {m['platform']}; load average "
           f"{m['load_average']} at the start.", "", f"Versions: {versions}.", "",
           "## Method", "", METHOD.format(tolerances=tolerances), ""]
    if results["mode"] == "quick":
        out += ["**Quick mode**: the tiny UNet, JAX compiled with XLA's fast-compile flags; it checks the harness and "
                "its times mean nothing.", ""]
    sections = {"backbone": _backbone, "compiled": _compiled, "input": _input}
    for name, render_part in sections.items():
        if name in results["parts"]:
            out += render_part(results["parts"][name], machine.fingerprint(m)) + [""]
    return "\n".join(out)
