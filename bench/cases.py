"""What the backbone comparison measures: the UNet, the VPD read-out, and the grid of cases.

The work in both frameworks is VPD's backbone (docs/reference.md, "VPD backbone", "VPD taps", "VPD attention maps"): the
SD UNet at t = 1 on a (B, S/8, S/8, 4) latent with a 150-token context (VPD-seg's class embeddings), read out at the
four VPD taps, with the head-averaged cross-attention maps of the ten VPD layers averaged per resolution and
concatenated after the feature of that resolution (no gradient through the maps, as in the reference). Nothing after the
last tap is computed.

  forward  the four features, no gradient
  train    loss = sum over the four features of mean(feature ** 2); gradient w.r.t. every UNet parameter; one
           AdamW update (lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.01; PyTorch's defaults otherwise)

Dtypes: float32, or bfloat16 compute with float32 parameters and optimizer state (JAX: the model's `dtype`;
PyTorch: `torch.autocast(dtype=torch.bfloat16)`).
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

# diffusers `UNet2DConditionModel` config dicts (both workers build their UNet from the same dict).
SD15_UNET: dict = dict(cross_attention_dim=768, attention_head_dim=8)  # diffusers' defaults are SD1.x's
TINY_UNET: dict = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=2,
                       cross_attention_dim=32, norm_num_groups=8)

CONTEXT_TOKENS = 150  # VPD-seg: the 150 adapted ADE20K class embeddings
# compute.attention_query_chunk of the JAX cases that set one: on XLA:CPU, 128-query chunks of the 64x64 latent's
# self-attention are the fastest (measured 64-1024 at 512 px) and need a fraction of the memory.
QUERY_CHUNK = 128
TIMESTEP = 1  # VPD's
ADAMW = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


@dataclasses.dataclass(frozen=True)
class Case:
    image: int  # square input image side; the UNet sees image // 8
    batch: int
    mode: str  # "forward" | "train"
    dtype: str  # "float32" | "bfloat16"
    reps: int  # timed repetitions (median reported)
    warmup: int = 1
    # JAX only: the UNet's compute.attention_query_chunk (0: all queries at once, the configs' default). PyTorch
    # runs the same case as without it (its scaled_dot_product_attention is its own); the run reuses that result.
    query_chunk: int = 0
    # JAX only: the model's compute.conv (vpd_jax/models/convolution.py); 'auto' is the configs' default.
    conv: str = "auto"

    @property
    def name(self) -> str:
        chunk = f", JAX query chunk {self.query_chunk}" if self.query_chunk else ""
        conv = f", JAX conv {self.conv}" if self.conv != "auto" else ""
        return f"{self.mode} {self.dtype} {self.image}px b{self.batch}{chunk}{conv}"

    @property
    def pytorch_case(self) -> "Case":
        """What PyTorch runs for this case: the same, without the JAX-only settings."""
        return dataclasses.replace(self, query_chunk=0, conv="auto")

    @property
    def latent(self) -> int:
        return self.image // 8


def default_cases(reps: int = 3) -> list[Case]:
    """What fits the time budget of a 2-core CPU beside the compile-only part: 256 px forward in both dtypes and
    at batch 2, 512 px forward with and without JAX's query chunks, float32 train at 256 px and at 512 px (the
    papers' crop; JAX with query chunks only: without them its process peaks near 22 GB, too close to a 24 GiB
    machine's RAM), and the 512 px train step again with XLA's convolution for every conv layer (compute.conv
    'xla' instead of 'auto'). No bfloat16 train: PyTorch's autocast train step at 256 px takes minutes on a CPU
    (`--full` has it)."""
    return [
        Case(256, 1, "forward", "float32", reps),
        Case(256, 2, "forward", "float32", reps),
        Case(256, 1, "forward", "bfloat16", reps),
        Case(512, 1, "forward", "float32", max(1, reps - 1)),
        Case(512, 1, "forward", "float32", max(1, reps - 1), query_chunk=QUERY_CHUNK),
        Case(256, 1, "train", "float32", reps),
        Case(512, 1, "train", "float32", max(1, reps - 1), query_chunk=QUERY_CHUNK),
        Case(512, 1, "train", "float32", max(1, reps - 1), query_chunk=QUERY_CHUNK, conv="xla"),
    ]


def full_cases(reps: int = 3) -> list[Case]:
    """The issue's whole grid: 512/256 px x batch 1/2 x forward/train x float32/bfloat16, and the 512 px float32
    cases again with JAX's query chunks."""
    grid = [Case(image, batch, mode, dtype, reps) for mode, dtype, image, batch in
            itertools.product(("forward", "train"), ("float32", "bfloat16"), (512, 256), (1, 2))]
    return grid + [dataclasses.replace(c, query_chunk=QUERY_CHUNK) for c in grid
                   if c.image == 512 and c.dtype == "float32"]


def tiny_cases() -> list[Case]:
    """For the harness test: a 64 px input through TINY_UNET, every mode and dtype once, and the float32 forward
    with JAX's query chunks (16 of the 8x8 latent's 64 queries)."""
    return [Case(64, 1, mode, dtype, reps=1) for mode in ("forward", "train") for dtype in ("float32", "bfloat16")] + [
        Case(64, 1, "forward", "float32", reps=1, query_chunk=16)]


def ordered(cases: list[Case]) -> list[Case]:
    """Forward cases first: a train case leaves the optimizer state allocated for the rest of the process."""
    return sorted(cases, key=lambda c: c.mode != "forward")


def digest(features: list, samples: int = 512) -> list[dict]:
    """Shape, mean, RMS and `samples` evenly strided values of each NHWC feature (numpy arrays): enough to check
    that the two frameworks computed the same features without shipping them between processes."""
    out = []
    for f in features:
        flat = np.asarray(f, np.float64).reshape(-1)
        stride = max(1, flat.size // samples)
        out.append(dict(shape=list(f.shape), mean=float(flat.mean()), rms=float(np.sqrt(np.mean(flat ** 2))),
                        samples=flat[::stride][:samples].tolist()))
    return out


def max_relative_difference(a: list[dict], b: list[dict]) -> float:
    """max |a - b| / max |b| over the sampled values of two digests of the same features (inf if shapes differ)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x["shape"] != y["shape"]:
            return float("inf")
        xs, ys = np.asarray(x["samples"]), np.asarray(y["samples"])
        worst = max(worst, float(np.abs(xs - ys).max() / max(np.abs(ys).max(), 1e-30)))
    return worst


# Largest relative difference between the frameworks that still counts as the same computation: of the sampled
# features (forward, `max_relative_difference`) or of the first training loss (train). float32 differs by
# summation order only; bfloat16 also by where each framework rounds (JAX: every layer's compute dtype, autocast:
# matmuls and convolutions only).
AGREEMENT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def compare(case: Case, jax_row: dict, torch_row: dict) -> dict:
    """Time ratios JAX / PyTorch and whether the two computed the same thing (None where a side failed)."""
    out: dict = dict(tolerance=AGREEMENT_TOLERANCE[case.dtype], wall_ratio=None, cpu_ratio=None, difference=None)
    if "median_wall_s" in jax_row and "median_wall_s" in torch_row:
        out["wall_ratio"] = jax_row["median_wall_s"] / torch_row["median_wall_s"]
        out["cpu_ratio"] = jax_row["median_cpu_s"] / torch_row["median_cpu_s"]
    if "digest" in jax_row and "digest" in torch_row:
        out["difference"] = max_relative_difference(jax_row["digest"], torch_row["digest"])
    elif "first_loss" in jax_row and "first_loss" in torch_row:
        out["difference"] = abs(jax_row["first_loss"] - torch_row["first_loss"]) / abs(torch_row["first_loss"])
    out["agree"] = None if out["difference"] is None else out["difference"] <= out["tolerance"]
    return out


def inputs(case: Case, context_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The case's latent (B, S/8, S/8, 4), NHWC, and context (B, CONTEXT_TOKENS, context_dim): standard normal,
    the same in both frameworks (PyTorch transposes the latent to NCHW)."""
    rng = np.random.default_rng(case.image * 10 + case.batch)
    latent = rng.standard_normal((case.batch, case.latent, case.latent, 4), dtype=np.float32)
    tokens = rng.standard_normal((CONTEXT_TOKENS, context_dim), dtype=np.float32)
    return latent, np.broadcast_to(tokens, (case.batch, *tokens.shape)).copy()
