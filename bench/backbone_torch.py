"""The PyTorch side of the backbone comparison: diffusers' `UNet2DConditionModel` doing VPD's work (bench/cases.py).

As the reference does it: forward hooks read the four taps, an attention processor records the head-averaged
probabilities of the ten VPD layers (the parity tests' `RecordingAttnProcessor`; every other layer keeps diffusers'
default, `scaled_dot_product_attention`), and the output head (conv_norm_out, conv_act, conv_out), which VPD never
applies (docs/reference.md, "VPD backbone"), is removed. Runs in its own process (bench/worker.py); imports no JAX.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from bench import cases as cases_lib
from bench import machine, timing
from bench.weights import random_weight
from tests.models.unet_reference import RecordingAttnProcessor


def build_unet(unet_config: dict, device: torch.device) -> UNet2DConditionModel:
    """The diffusers UNet with the bench's deterministic weights (no default init: built on the meta device)."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**unet_config)
    model.conv_norm_out = None  # diffusers then skips conv_act too
    model.conv_out = torch.nn.Identity()
    model.to_empty(device=device)
    if list(model.named_buffers()):
        raise RuntimeError("the UNet has buffers, which the bench's weight generator does not fill")
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(torch.from_numpy(random_weight(name, tuple(tensor.shape))))
    return model


class VPDReadout:
    """Calls the UNet and returns VPD's four features (NCHW, finest first), maps concatenated without gradient."""

    def __init__(self, model: UNet2DConditionModel):
        self.model = model
        self.taps: dict[str, torch.Tensor] = {}
        self.maps: dict[str, torch.Tensor] = {}
        self.tap_names: tuple[str, ...] = ()
        self.map_names: tuple[str, ...] = ()
        self._handles: list = []

    def select(self, taps: tuple[str, ...], maps: tuple[str, ...]) -> None:
        """Read these taps and record these maps from now on; every other attention layer uses diffusers'
        default processor."""
        for handle in self._handles:
            handle.remove()
        modules = dict(self.model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in taps]
        self.tap_names, self.map_names = tuple(taps), tuple(maps)
        self.model.set_attn_processor({
            key: RecordingAttnProcessor(self.maps, key[: -len(".processor")])
            if key[: -len(".processor")] in maps else AttnProcessor2_0() for key in self.model.attn_processors})

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            self.taps[name] = getattr(output, "sample", output)
        return hook

    def __call__(self, latent: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        self.taps.clear()
        self.maps.clear()
        self.model(latent, timesteps, context)
        features = [self.taps[name] for name in self.tap_names]
        by_queries: dict[int, list[torch.Tensor]] = {}
        for name in self.map_names:
            by_queries.setdefault(self.maps[name].shape[1], []).append(self.maps[name])
        for queries, group in by_queries.items():
            mean = (sum(group[1:], group[0]) / len(group)).detach()  # no gradient through the maps, as VPD
            i = next(i for i, f in enumerate(features) if f.shape[2] * f.shape[3] == queries)
            batch, _, height, width = features[i].shape
            maps = mean.transpose(1, 2).reshape(batch, -1, height, width)
            features[i] = torch.cat([features[i], maps.to(features[i].dtype)], dim=1)
        return features


def case_inputs(case: cases_lib.Case, unet_config: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(latent NCHW, timesteps, context) of a case, the same values as JAX's (bench/cases.py `inputs`)."""
    latent, context = cases_lib.inputs(case, unet_config.get("cross_attention_dim", 768))
    latent = torch.from_numpy(latent).permute(0, 3, 1, 2).contiguous().to(device)
    timesteps = torch.full((case.batch,), cases_lib.TIMESTEP, dtype=torch.long, device=device)
    return latent, timesteps, torch.from_numpy(context).to(device)


def bench_adamw(model: UNet2DConditionModel) -> torch.optim.AdamW:
    """The optimizer of bench's train cases (bench/cases.py ADAMW)."""
    a = cases_lib.ADAMW
    return torch.optim.AdamW(model.parameters(), lr=a["lr"], betas=(a["b1"], a["b2"]), eps=a["eps"],
                             weight_decay=a["weight_decay"])


def train_step(readout: VPDReadout, optimizer: torch.optim.Optimizer, latent: torch.Tensor, timesteps: torch.Tensor,
               context: torch.Tensor, dtype: str, device: torch.device) -> float:
    """One step of bench's train case (bench/cases.py): the loss over VPD's four features, its gradient, one AdamW
    update. Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with _autocast(dtype, device):
        features = readout(latent, timesteps, context)
    loss = sum(f.float().square().mean() for f in features)
    loss.backward()
    optimizer.step()
    _sync(device)
    return float(loss.detach())


def _autocast(dtype: str, device: torch.device):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _nhwc(features: list[torch.Tensor]) -> list[np.ndarray]:
    return [f.detach().float().permute(0, 2, 3, 1).cpu().numpy() for f in features]


def run(spec: dict) -> dict:
    """Measure every case of `spec` (keys: device 'cpu' | 'accelerator' (CUDA), threads, unet, cases, readouts;
    see bench/worker.py and bench/plan.py); returns the JSON-able results."""
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu" if spec["device"] == "cpu" else "cuda")
    start = time.perf_counter()
    model = build_unet(spec["unet"], device)
    readout = VPDReadout(model)
    result = dict(framework="pytorch", setup_s=time.perf_counter() - start, threads=torch.get_num_threads(),
                  parameters=sum(p.numel() for p in model.parameters()), rss_after_setup_bytes=machine.rss_bytes(),
                  cases=[])
    optimizer = None
    for case in cases_lib.ordered([cases_lib.Case(**c) for c in spec["cases"]]):
        out = result["cases"]
        try:
            readout.select(*(tuple(spec["readouts"][str(case.image)][k]) for k in ("taps", "attn_layers")))
            latent, timesteps, context = case_inputs(case, spec["unet"], device)
            if case.mode == "forward":
                model.eval()

                def step():
                    with torch.no_grad(), _autocast(case.dtype, device):
                        readout(latent, timesteps, context)
                    _sync(device)
            else:
                model.train()
                optimizer = optimizer or bench_adamw(model)
                losses = []

                def step():
                    losses.append(train_step(readout, optimizer, latent, timesteps, context, case.dtype, device))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            row = dict(name=case.name, case=dataclasses.asdict(case), **timing.run_case(step, case.warmup, case.reps))
            if device.type == "cuda":
                row["device_peak_bytes"] = torch.cuda.max_memory_allocated()
            if case.mode == "forward":
                with torch.no_grad(), _autocast(case.dtype, device):
                    row["digest"] = cases_lib.digest(_nhwc(readout(latent, timesteps, context)))
            else:
                row["first_loss"] = losses[0]
            out.append(row)
        except Exception as err:  # one failing case (e.g. out of memory on a GPU) must not lose the others
            out.append(dict(name=case.name, case=dataclasses.asdict(case), error=f"{type(err).__name__}: {err}"))
    return result
