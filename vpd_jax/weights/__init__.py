"""Loading Stable Diffusion / CLIP checkpoints into the Flax models (formats: docs/architecture.md, "Weight formats").

    from vpd_jax.weights import load_unet, load_vae, load_text_encoder, load_tokenizer
    unet, unet_params = load_unet("path/to/stable-diffusion-v1-5")          # pipeline root, model folder or file
    vae, vae_params = load_vae("path/to/v1-5-pruned-emaonly.safetensors")   # CompVis single file
"""
from vpd_jax.weights.convert import WeightLoadingError, convert_state_dict
from vpd_jax.weights.io import read_state_dict
from vpd_jax.weights.loaders import load_text_encoder, load_tokenizer, load_unet, load_vae

__all__ = [
    "WeightLoadingError",
    "convert_state_dict",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_vae",
    "read_state_dict",
]
