"""VPD's residual text adapter and the three per-task cross-attention contexts (docs/reference.md, "Text adapter").

out = T + gamma * MLP(T), MLP = Linear(D, D) -> exact GELU -> Linear(D, D) with PyTorch's default Linear init and
gamma a learnable per-channel (D,) vector initialised to `gamma_init` (1e-4), so training starts from the frozen
CLIP embeddings. The parameter names mirror the reference (`fc.0`, `fc.2`; VPD keeps gamma on the task model, here
it lives with the adapter).

Context builders (the UNet's cross-attention input, (B, N_ctx, D)):
* `segmentation_context`: all N class tokens, adapted once and broadcast to every image -> (B, N, D);
* `depth_context`: the image's scene token, class_embeddings[class_id] adapted -> (B, 1, D);
* `referring_context`: CLIP token features (B, L, D), adapted token-wise (BOS and padding included).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.models.layers import Dense, gelu_exact

Dtype = Any


class TextAdapter(nn.Module):
    """T + gamma * (Linear -> GELU(erf) -> Linear)(T) over the last axis; any leading shape."""

    gamma_init: float = 1e-4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        dim = tokens.shape[-1]
        hidden = Dense(dim, axes=("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name="fc_0")(tokens)
        hidden = Dense(dim, axes=("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                       name="fc_2")(gelu_exact(hidden))
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.constant(self.gamma_init), ("norm",)),
                           (dim,), self.param_dtype)
        return (tokens.astype(self.dtype) + gamma.astype(self.dtype) * hidden).astype(self.dtype)


def segmentation_context(adapter: TextAdapter, class_embeddings: jax.Array, batch_size: int) -> jax.Array:
    """(N, D) frozen class embeddings -> (B, N, D): every image attends to all N adapted class tokens."""
    if class_embeddings.ndim != 2:
        raise ValueError(f"class_embeddings must be (num_classes, dim), got shape {class_embeddings.shape}")
    adapted = adapter(jax.lax.stop_gradient(class_embeddings))
    return jnp.broadcast_to(adapted[None], (batch_size, *adapted.shape))


def depth_context(adapter: TextAdapter, class_embeddings: jax.Array, class_ids: jax.Array) -> jax.Array:
    """(C, D) scene embeddings and (B,) scene ids -> (B, 1, D): one adapted scene token per image.

    Out-of-range ids raise when the ids are concrete; under jit they produce NaN tokens instead of a silent
    clamp to a wrong scene.
    """
    if class_embeddings.ndim != 2:
        raise ValueError(f"class_embeddings must be (num_scenes, dim), got shape {class_embeddings.shape}")
    if class_ids.ndim != 1:
        raise ValueError(f"class_ids must be (batch,), got shape {class_ids.shape}")
    if not isinstance(class_ids, jax.core.Tracer):
        ids = np.asarray(class_ids)
        bad = ids[(ids < 0) | (ids >= class_embeddings.shape[0])]
        if bad.size:
            raise ValueError(f"scene class ids {bad.tolist()} out of range [0, {class_embeddings.shape[0]})")
    tokens = jnp.take(jax.lax.stop_gradient(class_embeddings), class_ids, axis=0, mode="fill", fill_value=jnp.nan)
    return adapter(tokens)[:, None, :]


def referring_context(adapter: TextAdapter, token_features: jax.Array) -> jax.Array:
    """(B, L, D) CLIP last_hidden_state -> (B, L, D), adapted token-wise (no attention mask, as the reference)."""
    if token_features.ndim != 3:
        raise ValueError(f"token_features must be (batch, length, dim), got shape {token_features.shape}")
    return adapter(token_features)
