"""PyTorch side of the UNet parity tests: tiny diffusers UNets, forward hooks for taps, recorded attention maps."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DConditionModel as TorchUNet

# Tiny configs covering the SD v1.x / v2.x family: conv vs linear projections, int vs per-block heads,
# upcast_attention, several transformer layers per block, per-block layer counts, both timestep layouts.
TINY_CONFIGS = {
    "sd1": dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, cross_attention_dim=16,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(
        block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=(2, 4, 4), cross_attention_dim=24,
        norm_num_groups=8, use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2,
        flip_sin_to_cos=False, freq_shift=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd1_uneven": dict(
        block_out_channels=(8, 16, 32), layers_per_block=(1, 2, 1), attention_head_dim=2, cross_attention_dim=12,
        norm_num_groups=4, in_channels=3, out_channels=5, norm_eps=1e-6,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")),
}


class RecordingAttnProcessor:
    """Classic attention (explicit softmax) that stores the head-averaged probabilities under `name`."""

    def __init__(self, store: dict, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)
        batch = hidden_states.shape[0]
        self.store[self.name] = probs.reshape(batch, attn.heads, *probs.shape[1:]).mean(1)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def make_tiny_unet(name: str, seed: int = 0) -> TorchUNet:
    torch.manual_seed(seed)
    model = TorchUNet(sample_size=16, **TINY_CONFIGS[name]).eval()
    # Random (not zero-initialised) weights everywhere, so that every path contributes to the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def run_with_taps(model: TorchUNet, sample, timesteps, context, taps, maps):
    """Forward with hooks; returns (sample NHWC, {tap: NHWC or token array}, {map: (B, Lq, Lk)}) as numpy."""
    maps_store: dict = {}
    model.set_attn_processor({n: RecordingAttnProcessor(maps_store, n[: -len(".processor")])
                              for n in model.attn_processors})
    modules = dict(model.named_modules())
    tap_store: dict = {}
    handles = []
    for name in taps:
        def hook(_module, _inputs, output, name=name):
            output = output[0] if isinstance(output, tuple) else output
            tap_store[name] = getattr(output, "sample", output).detach()
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                        torch.from_numpy(context)).sample
    finally:
        for h in handles:
            h.remove()
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.numpy()  # noqa: E731
    return nhwc(out), {k: nhwc(v) for k, v in tap_store.items()}, {k: v.numpy() for k, v in maps_store.items()}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
