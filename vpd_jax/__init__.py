"""vpd_jax: VPD and LD-ZNet in JAX/Flax, with Stable Diffusion as a perception backbone."""
