"""The compile-only part (issue items 2 and 3) as independent jobs, and how their results become its two sections.

A VPD-seg train step of SD1.5 size takes XLA:CPU about five minutes to compile, single-threaded, so bench/run.py
compiles each one in its own worker process (`train_step` job), as many at a time as the machine has cores,
beside the one `programs` job that compiles the forward programs of the cost section. `assemble` then joins the
job results into the `cost` and `memory` sections the report reads. Imports no framework.
"""
from __future__ import annotations

import numpy as np

GIB = 2 ** 30
# A batch whose compiled size lies this fraction above the line through the larger batches is bound by the
# optimizer update, not by its activations (fit_batches).
PLATEAU_MARGIN = 0.01


def devices_of(mesh: dict) -> int:
    return int(np.prod(list(mesh.values()) or [1]))


def variant(mesh: dict | None = None, dtype: str = "float32", remat: str | None = None,
            nonfinite_check: str = "gradients", attention_query_chunk: int = 0) -> dict:
    """How a train step is compiled: the mesh axis sizes ({} = 1 device), compute dtype, compute.remat_policy,
    config.nonfinite_check and compute.attention_query_chunk (defaults: the configs' defaults)."""
    return dict(mesh=dict(sorted((mesh or {}).items())), dtype=dtype, remat=remat, nonfinite_check=nonfinite_check,
                attention_query_chunk=attention_query_chunk)


VARIANT_FIELDS = ("mesh", "dtype", "remat", "nonfinite_check", "attention_query_chunk")


def step_key(arch: str, image: int, how: dict, global_batch: int) -> dict:
    """One compiled train step (`how`: a `variant`): what `bench.compiled.compile_train_step` builds and the
    results are looked up by."""
    return dict(arch=arch, image=image, global_batch=global_batch, **variant(**how))


def _cost_keys(cost: dict) -> list[dict]:
    return [step_key(cost["arch"], cost["image"], variant(remat=remat), cost["batch"]) for remat in cost["train_remats"]]


def _per_device_batches(memory: dict, how: dict) -> list[int]:
    """The per-device batches a memory variant is compiled at: `per_device_batches`, or on a mesh
    `mesh_per_device_batches` where the spec gives it (one batch: the per-example slope is then the 1-device
    twin's, `_one_device_twin`)."""
    return memory.get("mesh_per_device_batches", memory["per_device_batches"]) if how["mesh"] else \
        memory["per_device_batches"]


def _variant_of(row: dict) -> dict:
    return variant(**{k: row[k] for k in VARIANT_FIELDS})


def _one_device_twin(how: dict) -> dict:
    """The same variant on one device."""
    return variant(**dict(how, mesh={}))


def _memory_keys(memory: dict, how: dict) -> list[dict]:
    devices = devices_of(how["mesh"])
    return [step_key(memory["arch"], memory["image"], how, per_device * devices)
            for per_device in _per_device_batches(memory, how)]


def _check_memory_spec(memory: dict) -> None:
    """A variant compiled at one batch needs its 1-device twin among the variants (for the slope)."""
    variants = [variant(**how) for how in memory["variants"]]
    for how in variants:
        if len(_per_device_batches(memory, how)) < 2 and _one_device_twin(how) not in variants:
            raise ValueError(f"memory variant {how} is compiled at one per-device batch only; its per-example "
                             f"slope needs the variant {_one_device_twin(how)} in the spec's variants")


def jobs(spec: dict) -> list[dict]:
    """The worker specs of a compiled-part spec (plan.Plan.compiled): the forward programs first, then one job per
    distinct train step, the cost section's and the memory section's shared."""
    if "memory" in spec:
        _check_memory_spec(spec["memory"])
    out = [dict(job="programs", cost=spec["cost"])] if "cost" in spec else []
    keys = _cost_keys(spec["cost"]) if "cost" in spec else []
    for how in spec.get("memory", {}).get("variants", []):
        keys += _memory_keys(spec["memory"], how)
    unique = [key for i, key in enumerate(keys) if key not in keys[:i]]
    return out + [dict(job="train_step", key=key) for key in unique]


def _lookup(steps: list[dict], key: dict) -> dict:
    for step in steps:
        if step.get("key") == key:
            return step
    raise KeyError(f"no train step compiled for {key}")


def per_device_bytes(memory: dict) -> int:
    """Arguments + temporaries + outputs that do not reuse (alias) a donated argument."""
    return (memory["argument_size_in_bytes"] + memory["temp_size_in_bytes"] + memory["output_size_in_bytes"]
            - memory["alias_size_in_bytes"])


def fit_batches(points: list[tuple[int, int]], capacities_gib: list[float], per_example: float | None = None
                ) -> dict:
    """The compiled size of a train step against its per-device batch, and the largest batch under each capacity.

    The step's peak is the larger of two: the activations, `fixed + per_example * batch`, and the optimizer update
    (parameters, gradients, moments and the guard's candidate at once), which does not grow with the batch. So the
    line goes through the two largest batches, and a smaller batch that compiles above that line (by more than
    `PLATEAU_MARGIN`) is bound by the update: its size is the plateau, listed in `plateau_batches`. With
    `per_example` given (a mesh row compiled at one batch), it is the line of that slope through the points. The
    largest batch under a capacity is 0 where the plateau or the state does not fit."""
    points = sorted(points)
    b = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    if per_example is None:
        per_example = float((y[-1] - y[-2]) / (b[-1] - b[-2]))
        fixed = float(y[-1] - per_example * b[-1])
    else:
        fixed = float(np.mean(y - per_example * b))
    above = y - (fixed + per_example * b)
    on_plateau = above > PLATEAU_MARGIN * y
    plateau = float(np.max(y[on_plateau])) if on_plateau.any() else None
    residual = float(np.max(np.abs(above[~on_plateau]))) if len(points) > 2 else 0.0

    def largest_batch(cap: float) -> int | None:
        if per_example <= 0:
            return None
        if plateau is not None and plateau > cap * GIB:
            return 0
        return max(0, int(np.floor((cap * GIB - fixed) / per_example)))

    return dict(fixed_bytes=float(fixed), per_example_bytes=float(per_example), max_residual_bytes=residual,
                plateau_bytes=plateau, plateau_batches=[int(x) for x in b[on_plateau]],
                max_batch={f"{cap:g}": largest_batch(cap) for cap in capacities_gib})


def _findings(rows: dict, decoder_flops: float) -> list[dict]:
    """What the XLA counts show about work that is not compiled, each as (claim, holds, numbers)."""
    f = {key: row["flops"] for key, row in rows.items()}
    seg = rows["seg_forward"]
    excess = seg["flops"] - seg["analytic_flops"]
    return [
        dict(claim="the unused output head (conv_norm_out, conv_out) is not compiled: the read-out that also "
                   "computes the full output but does not return it costs the same as the backbone",
             holds=f["unused_tail"] <= f["backbone"], detail=f"{f['unused_tail']:.4g} vs {f['backbone']:.4g}"),
        dict(claim="stopping at the last tap saves work: the full noise prediction costs more than the backbone",
             holds=f["full"] > f["backbone"], detail=f"{f['full']:.4g} vs {f['backbone']:.4g}"),
        dict(claim="attention maps cost only where asked for: no maps <= the VPD maps <= all maps",
             holds=f["no_maps"] <= f["backbone"] <= f["all_maps"],
             detail=f"{f['no_maps']:.4g} <= {f['backbone']:.4g} <= {f['all_maps']:.4g}"),
        dict(claim="the VAE decoder is not compiled: the VPDSeg forward exceeds its analytic count (which has no "
                   "decoder) by less than the decoder's FLOPs",
             holds=excess < decoder_flops, detail=f"excess {excess:.4g} vs decoder {decoder_flops:.4g}"),
    ]


def _cost(spec: dict, programs: dict, steps: list[dict]) -> dict:
    rows = {row["key"]: row for row in programs["programs"]}
    for remat, key in zip(spec["train_remats"], _cost_keys(spec)):
        step = _lookup(steps, key)
        name = f"train_{remat or 'none'}"
        rows[name] = dict(key=name, name=f"VPD-seg train step, remat {remat or 'none'}", compile_s=step["compile_s"],
                          analytic_flops=programs["train_analytic_flops"][remat or "none"],
                          note="forward + backward + AdamW", flops=step["flops"],
                          bytes_accessed=step["bytes_accessed"], xla_memory=step["xla_memory"])
    return dict(arch=spec["arch"], image=spec["image"], batch=spec["batch"], programs=list(rows.values()),
                findings=_findings(rows, programs["decoder_flops"]),
                not_compiled=[dict(name="VAE decoder + post_quant_conv (deleted by VPD)",
                                   analytic_flops=programs["decoder_flops"])])


def _memory(spec: dict, steps: list[dict]) -> dict:
    rows = []
    for how in spec["variants"]:
        points = []
        for per_device, key in zip(_per_device_batches(spec, how), _memory_keys(spec, how)):
            step = _lookup(steps, key)
            memory = step["xla_memory"]
            points.append(dict(per_device_batch=per_device, global_batch=key["global_batch"],
                               compile_s=step["compile_s"], per_device_bytes=per_device_bytes(memory), **memory))
        rows.append(dict(how, devices=devices_of(how["mesh"]), points=points))
    # Fitted rows first: the rows of one batch take their slope from their 1-device twin.
    for row in sorted(rows, key=lambda r: len(r["points"]) < 2):
        xy = [(p["per_device_batch"], p["per_device_bytes"]) for p in row["points"]]
        twin = None if len(xy) > 1 else next(r for r in rows if _variant_of(r) == _one_device_twin(_variant_of(row)))
        row.update(fit_batches(xy, spec["capacities_gib"], twin and twin["per_example_bytes"]),
                   per_example_from="1 device" if twin else "fit")
    return dict(arch=spec["arch"], image=spec["image"], capacities_gib=spec["capacities_gib"], rows=rows)


def _section_keys(spec: dict, section: str) -> list[dict]:
    if section == "cost":
        return _cost_keys(spec["cost"])
    return [key for how in spec["memory"]["variants"] for key in _memory_keys(spec["memory"], how)]


def assemble(spec: dict, results: list[dict]) -> dict:
    """The `cost` and `memory` sections from the results of `jobs(spec)` (in that order); a section any of whose
    jobs failed carries the first error instead."""
    job_list = jobs(spec)
    programs = next((r for j, r in zip(job_list, results) if j["job"] == "programs"), None)
    steps = [dict(r, key=j["key"]) for j, r in zip(job_list, results) if j["job"] == "train_step"]
    out = {}
    for section in ("cost", "memory"):
        if section not in spec:
            continue
        keys = _section_keys(spec, section)
        needed = ([programs] if section == "cost" else []) + [s for s in steps if s["key"] in keys]
        failed = next((r for r in needed if "error" in r), None)
        if failed is not None:
            out[section] = dict(error=failed["error"])
        elif section == "cost":
            out[section] = _cost(spec["cost"], programs, steps)
        else:
            out[section] = _memory(spec["memory"], steps)
    return out
