"""Port PyTorch reference heads to our Flax variable trees by renaming alone, and compare them.

Renaming rule (the one a checkpoint converter for the heads would use): split the torch key at '.', glue every
numeric index to the name before it with '_' (`scale_heads.2.2.conv.weight` -> `scale_heads_2_2/conv/...`);
`weight` becomes `kernel` (conv OIHW -> HWIO, ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out), Linear
transposed) or `scale` (norms); `running_mean`/`running_var` go to batch_stats `mean`/`var`.
"""
from __future__ import annotations

import jax
import numpy as np
import torch

_NORMS = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.SyncBatchNorm)


def _flax_path(torch_name: str) -> list[str]:
    path = []
    for part in torch_name.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return path


def _kernel(module: torch.nn.Module, weight: np.ndarray) -> np.ndarray:
    if isinstance(module, torch.nn.ConvTranspose2d):
        return weight.transpose(2, 3, 0, 1)
    if isinstance(module, torch.nn.Conv2d):
        return weight.transpose(2, 3, 1, 0)
    if isinstance(module, torch.nn.Linear):
        return weight.T
    raise TypeError(f"no kernel layout for {type(module).__name__}")


def torch_to_flax(model: torch.nn.Module) -> dict:
    """{'params': ..., 'batch_stats': ...} nested dicts holding `model`'s state under our names."""
    modules = dict(model.named_modules())
    out: dict = {"params": {}, "batch_stats": {}}
    for key, value in model.state_dict().items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules[owner_name]
        value = value.detach().cpu().numpy().copy()
        if leaf == "num_batches_tracked":
            continue
        if leaf == "weight":
            collection, leaf, value = "params", ("scale" if isinstance(owner, _NORMS) else "kernel"), (
                value if isinstance(owner, _NORMS) else _kernel(owner, value))
        elif leaf in ("running_mean", "running_var"):
            collection, leaf = "batch_stats", {"running_mean": "mean", "running_var": "var"}[leaf]
        else:
            collection = "params"
        node = out[collection]
        for part in _flax_path(owner_name):
            node = node.setdefault(part, {})
        node[leaf] = value
    return {k: v for k, v in out.items() if v}


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random norm affine parameters and BN running statistics (torch starts them at 1/0, which hides swaps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _NORMS):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def shapes(tree) -> dict:
    return jax.tree.map(lambda x: tuple(np.shape(x)), tree)


def rel_err(ours, reference) -> float:
    """max |ours - reference| / max |reference|: the parity measure (<= 1e-4 required)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def count(tree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
