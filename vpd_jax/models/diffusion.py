"""Stable Diffusion's forward (noising) process, shared by LD-ZNet, the feature probes and the zero-shot maps.

Facts of SD v1 / v2: the latent is the VAE posterior times LATENT_SCALE; training noises it
with the 'scaled_linear' schedule (ldm's 'linear') over 1,000 steps.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

LATENT_SCALE = 0.18215  # SD v1's VAE scale factor


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """SD's training schedule: ldm 'linear' = diffusers 'scaled_linear', betas = linspace(sqrt(b0), sqrt(b1), T)^2
    in float64."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def alphas_cumprod(self) -> np.ndarray:
        betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_train_timesteps,
                            dtype=np.float64) ** 2
        return np.cumprod(1.0 - betas)


def draw_timesteps(keys: jax.Array, low: int, high: int) -> jax.Array:
    """One t ~ U{low, ..., high - 1} per key (torch.randint(low, high): 300..499 for LD-ZNet's (300, 500))."""
    return jax.vmap(lambda k: jax.random.randint(k, (), low, high))(keys)


def q_sample(schedule: NoiseSchedule, z0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise, t (B,) ints (ldm `q_sample`)."""
    abar = jnp.asarray(schedule.alphas_cumprod(), jnp.float32)[t].reshape(-1, *([1] * (z0.ndim - 1)))
    return jnp.sqrt(abar) * z0 + jnp.sqrt(1.0 - abar) * noise
