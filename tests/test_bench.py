"""The benchmark harness (bench/, issue 8) end to end on the tiny UNet: `python -m bench.run --quick`.

No timing targets: speed targets are not asserted in tests; timings belong in bench/ and BENCHMARKS.md. The run must
measure every case in both frameworks, find that they computed the same features, count compiled FLOPs close to the
analytic count, and write the report's tables.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bench import cases, machine, report
from bench.compiled_jobs import GIB, assemble, fit_batches, jobs, step_key, variant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA's count of the tiny forward programs over the analytic one: XLA adds the elementwise work (norms,
# activations, softmax) that bench/flops.py leaves out, about 9 % at the tiny UNet's 32-64 channels (about 1 % at
# SD1.5 size). Below 1, the analytic count has dense work XLA did not compile (a layer counted twice, or missing
# from the model); above the bound, XLA compiled dense work the analytic count leaves out.
FORWARD_FLOPS_RATIO = (1.0, 1.15)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return results, (out / "BENCHMARKS.md").read_text(), done.stdout


@pytest.mark.slow
def test_every_case_is_timed_in_both_frameworks_on_the_same_parameters(quick_run):
    results, _, _ = quick_run
    part = results["parts"]["backbone"]
    assert [r["name"] for r in part["cases"]] == [c.name for c in cases.tiny_cases()]
    for r in part["cases"]:
        jax_row, torch_row = r["jax"], r["pytorch"]
        assert "error" not in jax_row and "error" not in torch_row, (jax_row.get("error"), torch_row.get("error"))
        for row in (jax_row, torch_row):
            assert row["median_wall_s"] > 0 and row["median_cpu_s"] > 0 and row["peak_rss_bytes"] > 0
            assert len(row["wall_s"]) == r["case"]["reps"]
        assert jax_row["compile_s"] > 0 and jax_row["xla_memory"]["argument_size_in_bytes"] > 0
        assert jax_row["parameters"] == torch_row["parameters"]
        assert jax_row["threads"] == torch_row["threads"] == part["threads"]
        assert r["comparison"]["wall_ratio"] > 0


@pytest.mark.slow
def test_both_frameworks_compute_the_same_features(quick_run):
    results, _, _ = quick_run
    tolerance = {"float32": 1e-4, "bfloat16": 5e-2}
    for r in results["parts"]["backbone"]["cases"]:
        c = r["comparison"]
        assert c["difference"] is not None and c["difference"] <= tolerance[r["case"]["dtype"]], r["name"]
        assert c["agree"]
        if r["case"]["mode"] == "forward":  # four features, the maps concatenated after the 1/2 and 1/4 levels
            shapes = [d["shape"] for d in r["jax"]["digest"]]
            assert shapes == [d["shape"] for d in r["pytorch"]["digest"]]
            assert [s[1] for s in shapes] == [8, 4, 2, 1] and shapes[1][3] > 32 and shapes[2][3] > 64


@pytest.mark.slow
def test_compiled_flops_match_the_analytic_count_and_skip_unneeded_work(quick_run):
    results, _, _ = quick_run
    cost = results["parts"]["compiled"]["cost"]
    programs = {p["key"]: p for p in cost["programs"]}
    low, high = FORWARD_FLOPS_RATIO
    for key in ("backbone", "no_maps", "full", "seg_forward"):
        ratio = programs[key]["flops"] / programs[key]["analytic_flops"]
        assert low <= ratio <= high, (key, ratio)
    assert all(f["holds"] for f in cost["findings"]), cost["findings"]
    assert "memory" not in results["parts"]["compiled"]  # quick mode compiles no train step


@pytest.mark.slow
def test_input_pipelines_are_measured(quick_run):
    results, _, _ = quick_run
    pipelines = results["parts"]["input"]["rows"]
    assert len(pipelines) == 2 and all(p["img/s"] > 0 and p["img/s/core"] > 0 for p in pipelines)


@pytest.mark.slow
def test_report_has_the_machine_and_every_table(quick_run):
    results, report, stdout = quick_run
    assert report in stdout
    assert results["machine"]["cpu_model"] in report and "jax " + jax.__version__ in report
    for heading in ("## Machine", "## Method", "## 1. Backbone: JAX vs PyTorch", "### Compiled FLOPs vs analytic",
                    "## 4. Input pipeline"):
        assert heading in report
    for header in ("| case | reps | JAX s/img | PyTorch s/img | JAX / PyTorch |", "| program | XLA | analytic |",
                   "| pipeline | crop | images | img/s | img/s/core |"):
        assert header in report
    for r in results["parts"]["backbone"]["cases"]:
        assert f"| {r['name']} |" in report
    assert "Failed" not in report and "DOES NOT HOLD" not in report


def test_jax_only_variants_are_named_and_share_the_pytorch_case():
    plain = cases.Case(512, 1, "train", "float32", 2)
    variant = cases.Case(512, 1, "train", "float32", 2, query_chunk=128, conv="xla")
    assert variant.name == "train float32 512px b1, JAX query chunk 128, JAX conv xla"
    assert plain.name == "train float32 512px b1"
    assert variant.pytorch_case == plain.pytorch_case == plain
    assert sum(c.conv == "xla" for c in cases.default_cases()) == 1


def test_pytorch_bfloat16_is_skipped_only_on_a_cpu_that_would_emulate_it():
    from bench.plan import make_plan
    from bench.run import pytorch_skip_reason

    default, quick = make_plan("default"), make_plan("quick")
    bf16 = next(c for c in default.cases if c.dtype == "bfloat16")
    fp32 = next(c for c in default.cases if c.dtype == "float32")
    avx2, avx512_bf16 = ["avx2", "fma"], ["avx2", "fma", "avx512f", "avx512_bf16"]
    reason = pytorch_skip_reason(default, bf16, "cpu", avx2)
    assert reason and "avx512_bf16" in reason and "emulated" in reason
    assert pytorch_skip_reason(default, bf16, "cpu", avx512_bf16) is None
    assert pytorch_skip_reason(default, bf16, "cpu", ["avx2", "amx_bf16"]) is None
    assert pytorch_skip_reason(default, fp32, "cpu", avx2) is None
    assert pytorch_skip_reason(default, bf16, "accelerator", avx2) is None
    tiny_bf16 = next(c for c in quick.cases if c.dtype == "bfloat16")
    assert pytorch_skip_reason(quick, tiny_bf16, "cpu", avx2) is None


def test_report_lists_skipped_cases_apart_from_failed_ones():
    lines = report._errors([("a (pytorch)", dict(error="skipped: no native bfloat16")), ("b (jax)", dict(x=1)),
                            ("c (jax)", dict(error="bench.worker jax was killed by signal 9"))])
    assert lines == ["", "Failed:", "", "- **c (jax)**: bench.worker jax was killed by signal 9",
                     "", "Skipped:", "", "- **a (pytorch)**: skipped: no native bfloat16"]
    assert report._errors([("a (pytorch)", dict(error="skipped: no native bfloat16"))])[1] == "Skipped:"


def test_fit_batches_gives_the_largest_batch_under_each_capacity():
    fit = fit_batches([(1, 5 * GIB), (2, 7 * GIB)], [16, 80])  # 3 GiB fixed + 2 GiB per example
    assert fit["fixed_bytes"] == pytest.approx(3 * GIB) and fit["per_example_bytes"] == pytest.approx(2 * GIB)
    assert fit["max_batch"] == {"16": 6, "80": 38}
    assert fit["plateau_batches"] == [] and fit["plateau_bytes"] is None


def test_a_batch_bound_by_the_update_is_a_plateau_not_a_point_of_the_line():
    # 12 GiB fixed + 2 GiB per example from batch 4 on; at batch 1 the update's 17 GiB is the peak (line: 14)
    fit = fit_batches([(8, 28 * GIB), (1, 17 * GIB), (4, 20 * GIB)], [16, 18, 80])
    assert fit["fixed_bytes"] == pytest.approx(12 * GIB) and fit["per_example_bytes"] == pytest.approx(2 * GIB)
    assert fit["plateau_batches"] == [1] and fit["plateau_bytes"] == 17 * GIB
    assert fit["max_batch"] == {"16": 0, "18": 3, "80": 34}  # under 16 GiB the update itself does not fit
    # a smaller batch below the line is no plateau; how far it is off is the residual
    fit = fit_batches([(1, 13.5 * GIB), (4, 20 * GIB), (8, 28 * GIB)], [80])
    assert fit["plateau_batches"] == [] and fit["max_residual_bytes"] == pytest.approx(0.5 * GIB)
    assert fit["max_batch"] == {"80": 34}

    points = [dict(per_device_batch=b, per_device_bytes=y * GIB, argument_size_in_bytes=9 * GIB)
              for b, y in ((1, 17), (4, 20), (8, 28))]
    row = dict(variant(attention_query_chunk=128), devices=1, points=points,
               **fit_batches([(1, 17 * GIB), (4, 20 * GIB), (8, 28 * GIB)], [16, 80]))
    text = report.render(dict(command="python -m bench.run", mode="default", device="cpu", machine=machine.describe(),
                              parts={"compiled": dict(memory=dict(arch="sd15", image=512, capacities_gib=[16, 80],
                                                                  rows=[row]))}))
    assert "| batch 1 | batch 4 | batch 8 |" in text
    assert "| 1 device | float32 | none | 128 | gradients | 17.00† | 20.00 | 28.00 | 9.00 | 12.00 | 2.00 | 0 | 34 |" \
        in text
    assert "† above the line through the larger batches" in text


def _fake_step(key: dict) -> dict:
    """A train-step job result whose bytes are 3 GiB + 2 GiB per example per device (+ 4 GiB under the
    'updates' non-finite check)."""
    per_device = key["global_batch"] // max(1, int(np.prod(list(key["mesh"].values()) or [1])))
    extra = 4 if key["nonfinite_check"] == "updates" else 0
    memory = dict(argument_size_in_bytes=2 * GIB, temp_size_in_bytes=(1 + extra + 2 * per_device) * GIB,
                  output_size_in_bytes=2 * GIB, alias_size_in_bytes=2 * GIB)
    return dict(compile_s=1.0, flops=6.0e12 * key["global_batch"], bytes_accessed=1.0, xla_memory=memory)


COMPILED_SPEC = dict(cost=dict(arch="sd15", image=512, batch=1, train_remats=[None, "nothing_saveable"]),
                     memory=dict(arch="sd15", image=512, per_device_batches=[1, 2], capacities_gib=[16, 80],
                                 variants=[variant(), variant(remat="nothing_saveable"),
                                           variant(nonfinite_check="updates"), variant({"fsdp": 8})]))


def test_compiled_jobs_compile_each_train_step_once():
    job_list = jobs(COMPILED_SPEC)
    assert job_list[0] == dict(job="programs", cost=COMPILED_SPEC["cost"])
    keys = [j["key"] for j in job_list[1:]]
    # the cost section's two steps are the memory section's batch-1 points of the first two variants
    assert keys == [step_key("sd15", 512, variant(), 1),
                    step_key("sd15", 512, variant(remat="nothing_saveable"), 1),
                    step_key("sd15", 512, variant(), 2),
                    step_key("sd15", 512, variant(remat="nothing_saveable"), 2),
                    step_key("sd15", 512, variant(nonfinite_check="updates"), 1),
                    step_key("sd15", 512, variant(nonfinite_check="updates"), 2),
                    step_key("sd15", 512, variant({"fsdp": 8}), 8),
                    step_key("sd15", 512, variant({"fsdp": 8}), 16)]
    assert keys[0] == dict(arch="sd15", image=512, global_batch=1, mesh={}, dtype="float32", remat=None,
                           nonfinite_check="gradients", attention_query_chunk=0)


def _fake_programs() -> dict:
    names = ("full", "backbone", "no_maps", "all_maps", "unused_tail", "seg_forward")
    flops = dict(full=5.0, backbone=4.0, no_maps=3.9, all_maps=4.2, unused_tail=4.0, seg_forward=4.5)
    return dict(programs=[dict(key=k, name=k, compile_s=1.0, analytic_flops=4.4 if k == "seg_forward" else 4.0,
                               note="", flops=flops[k], bytes_accessed=1.0, xla_memory={}) for k in names],
                train_analytic_flops={"none": 5.9e12, "nothing_saveable": 7.8e12}, decoder_flops=1.0)


def test_compiled_sections_are_assembled_from_the_job_results():
    job_list = jobs(COMPILED_SPEC)
    results = [_fake_programs()] + [_fake_step(j["key"]) for j in job_list[1:]]
    out = assemble(COMPILED_SPEC, results)
    train = {p["key"]: p for p in out["cost"]["programs"]}
    assert train["train_none"]["flops"] == 6.0e12 and train["train_none"]["analytic_flops"] == 5.9e12
    assert train["train_nothing_saveable"]["analytic_flops"] == 7.8e12
    assert all(f["holds"] for f in out["cost"]["findings"])
    rows = out["memory"]["rows"]
    assert [(r["devices"], r["nonfinite_check"]) for r in rows] == [(1, "gradients"), (1, "gradients"),
                                                                    (1, "updates"), (8, "gradients")]
    for r in rows[:2] + rows[3:]:
        assert [p["per_device_bytes"] for p in r["points"]] == [5 * GIB, 7 * GIB]
        assert r["fixed_bytes"] == pytest.approx(3 * GIB) and r["max_batch"] == {"16": 6, "80": 38}
    assert [p["per_device_bytes"] for p in rows[2]["points"]] == [9 * GIB, 11 * GIB]
    assert [p["global_batch"] for p in rows[3]["points"]] == [8, 16]


def test_a_failed_job_fails_only_the_sections_that_need_it():
    job_list = jobs(COMPILED_SPEC)
    results = [_fake_programs()] + [_fake_step(j["key"]) for j in job_list[1:]]
    results[-1] = dict(error="bench.worker compiled was killed by signal 9")  # fsdp=8 at per-device batch 2
    out = assemble(COMPILED_SPEC, results)
    assert out["memory"] == dict(error="bench.worker compiled was killed by signal 9")
    assert "programs" in out["cost"]


def test_meshes_compiled_at_one_batch_take_the_slope_of_their_one_device_row():
    spec = dict(COMPILED_SPEC, memory=dict(COMPILED_SPEC["memory"], mesh_per_device_batches=[1]))
    job_list = jobs(spec)
    assert [j["key"] for j in job_list[1:] if j["key"]["mesh"]] == [step_key("sd15", 512, variant({"fsdp": 8}), 8)]

    def step(key):  # the mesh's fixed part is 1 GiB smaller than the 1-device row's (3 GiB)
        result = _fake_step(key)
        result["xla_memory"]["temp_size_in_bytes"] -= GIB if key["mesh"] else 0
        return result

    memory = assemble(spec, [_fake_programs()] + [step(j["key"]) for j in job_list[1:]])["memory"]
    rows = memory["rows"]
    mesh = rows[3]
    assert [p["per_device_bytes"] for p in mesh["points"]] == [4 * GIB]
    assert mesh["per_example_from"] == "1 device" and rows[0]["per_example_from"] == "fit"
    assert mesh["per_example_bytes"] == pytest.approx(2 * GIB) and mesh["fixed_bytes"] == pytest.approx(2 * GIB)
    assert mesh["max_batch"] == {"16": 7, "80": 39}
    text = report.render(dict(command="python -m bench.run", mode="default", device="cpu", machine=machine.describe(),
                              parts={"compiled": dict(memory=memory)}))
    assert "| fsdp=8 | float32 | none | none | gradients | 4.00 | – | 2.00 | 2.00 | 2.00* | 7 | 39 |" in text
    assert "\\* compiled at one per-device batch" in text

    lonely = dict(spec["memory"], variants=[variant(), variant({"fsdp": 8}, remat="nothing_saveable")])
    with pytest.raises(ValueError, match="nothing_saveable"):
        jobs(dict(memory=lonely))


def test_report_memory_table():
    """The memory section as the default mode writes it (its train steps are too slow to compile in a test)."""
    points = [dict(per_device_batch=b, per_device_bytes=(3 + 2 * b) * GIB, argument_size_in_bytes=2 * GIB)
              for b in (1, 2)]
    rows = [dict(variant(mesh, "bfloat16", nonfinite_check=check, attention_query_chunk=chunk), devices=8,
                 points=points, **fit_batches([(1, 5 * GIB), (2, 7 * GIB)], [16, 80]))
            for mesh, check, chunk in (({}, "gradients", 0), ({"data": 2, "fsdp": 4}, "updates", 1024))]
    results = dict(command="python -m bench.run", mode="default", device="cpu", machine=machine.describe(),
                   parts={"compiled": dict(memory=dict(arch="sd15", image=512, capacities_gib=[16, 80], rows=rows))})
    text = report.render(results)
    assert "| mesh | compute | remat | query chunk | non-finite check | batch 1 | batch 2 | of which arguments (b1) " \
           "| fixed | per example | max batch 16 GiB | max batch 80 GiB |" in text
    assert "| 1 device | bfloat16 | none | none | gradients | 5.00 | 7.00 | 2.00 | 3.00 | 2.00 | 6 | 38 |" in text
    assert "| data=2 x fsdp=4 | bfloat16 | none | 1024 | updates |" in text


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an accelerator is present")
def test_device_mode_stops_without_an_accelerator(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.run", "--device", "--only", "backbone", "--output",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "no accelerator found" in done.stderr
    assert not (tmp_path / "results.json").exists()


def test_code_version_names_the_commit_and_uncommitted_changes(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert machine.code_version(str(tmp_path)) == "unknown (not a git checkout)"
    git("init", "-q")
    (tmp_path / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "f")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert machine.code_version(str(tmp_path)) == head
    (tmp_path / "f.py").write_text("x = 2\n")
    assert machine.code_version(str(tmp_path)) == f"{head} + uncommitted changes"


def test_report_names_each_parts_commit_and_a_different_machine():
    here = machine.describe()
    elsewhere = machine.fingerprint(dict(here, cpu_model="Other CPU"))
    parts = {"input": dict(rows=[], cores=2, batch_size=8, code="abc1234", machine=elsewhere),
             "compiled": dict(code="def5678 + uncommitted changes", machine=machine.fingerprint(here))}
    text = report.render(dict(command="python -m bench.run", mode="default", device="cpu", machine=here, parts=parts))
    compiled_header = text[text.index("## 2-3."):text.index("## 4.")]
    assert "from commit def5678 + uncommitted changes; load" in compiled_header
    assert f"from commit abc1234 **on another machine: {elsewhere}**" in text[text.index("## 4."):]


HLO_SNIPPET = """HloModule step

%fused_conv (p0: f32[1,8,8,4], p1: f32[3,3,4,4]) -> f32[1,8,8,4] {
  %p0 = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,4,4]{3,2,1,0} parameter(1)
  ROOT %c = f32[1,8,8,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_dot (p0: f32[64,4], p1: f32[4,8]) -> f32[64,8] {
  %p0 = f32[64,4]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  ROOT %d = f32[64,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_t (p0: f32[4,8]) -> f32[8,4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{1,0} transpose(%p0), dimensions={1,0}
}

ENTRY %main (a: f32[1,8,8,4], k: f32[3,3,4,4], x: f32[64,4], w: f32[4,8]) -> f32[1,8,8,4] {
  %a = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %k = f32[3,3,4,4]{3,2,1,0} parameter(1)
  %x = f32[64,4]{1,0} parameter(2)
  %w = f32[4,8]{1,0} parameter(3)
  %ynn_fusion.1 = f32[1,8,8,4]{3,2,1,0} fusion(%a, %k), kind=kCustom, calls=%fused_conv
  %ynn_fusion.2 = f32[64,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %transpose_fusion = f32[8,4]{1,0} fusion(%w), kind=kLoop, calls=%fused_t
  %gradient = f32[3,3,4,4]{3,2,1,0} convolution(%a, %a), window={size=8x8 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf
  ROOT %n = f32[1,8,8,4]{3,2,1,0} negate(%ynn_fusion.1)
}
"""


def test_op_profile_names_each_operation_by_its_heaviest_work():
    from bench.op_profile import operation_kinds

    kinds = operation_kinds(HLO_SNIPPET)
    assert kinds["ynn_fusion.1"] == ("conv 3x3", "f32[1,8,8,4]{3,2,1,0}")
    assert kinds["ynn_fusion.2"] == ("dot", "f32[64,8]{1,0}")
    assert kinds["transpose_fusion"][0] == "transpose/copy"
    assert kinds["gradient"][0] == "conv 8x8"  # a window as large as the activation: a weight gradient
    assert kinds["n"][0] == "negate"


@pytest.mark.slow
def test_op_profile_of_the_tiny_train_step():
    """One profiled train step of the tiny UNet at 64 px: its time is attributed to the operations of the compiled
    step, among them dots, 3x3 convolutions and the 8x8-window weight gradients of the 8x8 latent's convolutions."""
    from bench.op_profile import profile_train_step

    result = profile_train_step("tiny", 64, 0)
    kinds = result["kinds"]
    assert {"dot", "conv 3x3", "conv 8x8"} <= set(kinds) and all(s >= 0 for s in kinds.values())
    assert sum(kinds.values()) > 0
    assert sum(s for s, *_ in result["operations"]) == pytest.approx(sum(kinds.values()))
    assert all(kind in kinds for _, kind, _, _ in result["operations"])


@pytest.mark.slow
def test_op_profile_of_the_tiny_pytorch_train_step():
    """The same step in PyTorch, profiled: convolutions (of every kernel size, forward and backward), matrix
    products and the AdamW update each get their operators' self time, and the kinds add up to the operators."""
    from bench.op_profile import profile_torch_train_step, torch_kind

    result = profile_torch_train_step("tiny", 64)
    kinds = result["kinds"]
    assert {"conv", "dot", "AdamW"} <= set(kinds) and all(s > 0 for s in (kinds["conv"], kinds["dot"], kinds["AdamW"]))
    assert sum(s for s, *_ in result["operations"]) == pytest.approx(sum(kinds.values()))
    assert {kind for _, kind, _ in result["operations"]} == set(kinds)
    assert torch_kind("aten::_slow_conv2d_backward", False) == "conv" and torch_kind("aten::mm", False) == "dot"
    assert torch_kind("aten::mm", True) == "AdamW" and torch_kind("aten::mmx", False) == "aten::mmx"
