"""Zero-shot text-vs-null noise-difference maps from a Stable Diffusion UNet (docs/reference.md, "Zero-shot
noise-difference maps").

LD-ZNet's motivating observation: where an image matches a phrase, the noise SD predicts for the noisy latent
changes when the phrase is given instead of the empty prompt. The map of a phrase is

  z0      = latent_scale x VAE posterior mean (or a sample) of the image
  z_t     = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps_k          for each timestep t and noise draw k
  eps_u, eps_c = UNet([z_t, z_t], t, [CLIP(null prompt), CLIP(prompt)])   (one batched call)
  D_tk    = || eps_c - eps_u ||_2 over the latent channels, per latent pixel
  map     = mean over (t, k) of minmax(D_tk), bilinearly upsampled to the image, then min-max normalised again
            so that every map spans [0, 1] (a map whose differences are all zero stays 0 everywhere).

The reference repository has no code for this, so every parameter is OUR choice (`ZeroShotConfig`; docs/fidelity.md):
timesteps (300, 400, 500) (the range LD-ZNet's frozen branch draws from, plus its upper bound; docs/reference.md,
"Frozen SD branch"), 4 noise draws from fixed seeds (draw k uses the same eps at every t, so the timesteps differ only
in t), the posterior mean (deterministic), the raw phrase as prompt ("{}") against "" (SD's unconditional prompt), and a
working size with the aspect kept and area ~ 512^2, each side floored to a multiple of 64 (the rule of LD-ZNet's
inference script, docs/reference.md "LD-ZNet inference script", at SD v1's native resolution). Guidance scale 1: any
other scale only rescales D.

`noise_difference_maps` is the jit-friendly core (the full UNet runs for the eps output; nothing else is kept);
`ZeroShotMapper` holds a loaded SD folder and maps an image of any size and a phrase to a map of the image's size;
`score` runs the maps over (image, phrase, mask) examples and returns the PhraseCut metrics (docs/reference.md,
"PhraseCut metrics"), and `eval_examples` reads such examples from the phrasecut evaluation pipeline.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vpd_jax import metrics
from vpd_jax.models import resize
from vpd_jax.models.diffusion import LATENT_SCALE, NoiseSchedule, q_sample
from vpd_jax.models.unet import UNet2DConditionModel

# A difference map whose range is at most this fraction of the largest |eps_u| of its image is float32 noise
# (identical prompts can differ by rounding in a batched call): it counts as no difference at all.
FLAT_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """Our choices for the noise-difference maps (the reference has no code for them and fixes none).

    timesteps       SD timesteps the maps are averaged over
    num_draws       noise draws K per timestep, from jax.random.key(seed) (the same draws for every image)
    seed            of the noise draws (and of the VAE sample when sample_latent)
    sample_latent   VAE posterior sample instead of its mean
    latent_scale    SD v1 / v2's VAE scale factor
    image_size      working resolution: with keep_aspect, area ~ image_size^2 with each side floored to the model's
                    multiple (64 for SD: VAE 8x, UNet 8x), at least one multiple; else image_size x image_size
    keep_aspect     see image_size
    prompt_template the text prompt, with one "{}" for the phrase
    null_prompt     the unconditional prompt
    """

    timesteps: tuple[int, ...] = (300, 400, 500)
    num_draws: int = 4
    seed: int = 0
    sample_latent: bool = False
    latent_scale: float = LATENT_SCALE
    image_size: int = 512
    keep_aspect: bool = True
    prompt_template: str = "{}"
    null_prompt: str = ""

    def check(self, num_train_timesteps: int) -> None:
        if not self.timesteps or not all(0 <= t < num_train_timesteps for t in self.timesteps):
            raise ValueError(f"ZeroShotConfig.timesteps={self.timesteps} must be non-empty, each in "
                             f"[0, {num_train_timesteps})")
        if self.num_draws < 1:
            raise ValueError(f"ZeroShotConfig.num_draws={self.num_draws} must be >= 1")
        if self.image_size < 1:
            raise ValueError(f"ZeroShotConfig.image_size={self.image_size} must be >= 1")
        if self.prompt_template.count("{}") != 1:
            raise ValueError(f"ZeroShotConfig.prompt_template={self.prompt_template!r} needs exactly one '{{}}'")


# ------------------------------------------------------------------------------------------------- the core


def normalize_per_image(maps: jax.Array, flat: jax.Array | None = None) -> jax.Array:
    """(B, H, W) -> (maps - min) / (max - min) per image, exactly 0 at the minimum and 1 at the maximum (XLA may
    divide through a reciprocal); images with max == min (or `flat` True) become 0."""
    low, high = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    span = high - low
    flat = span <= 0 if flat is None else (span <= 0) | flat.reshape(-1, 1, 1)
    scaled = jnp.where(maps >= high, 1.0, jnp.clip((maps - low) / jnp.where(flat, 1.0, span), 0.0, 1.0))
    return jnp.where(flat, 0.0, scaled)


def difference_norm(unet: UNet2DConditionModel, params: Any, z_t: jax.Array, t: jax.Array, null_context: jax.Array,
                    text_context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(||eps_c - eps_u|| over channels (B, h, w), max |eps_u| per image (B,)) from one UNet call on the batch
    [z_t, z_t] with contexts [null, text]."""
    batch = z_t.shape[0]
    eps = unet.apply({"params": params}, jnp.concatenate([z_t, z_t]), jnp.full((2 * batch,), t, jnp.int32),
                     jnp.concatenate([null_context, text_context])).sample.astype(jnp.float32)
    eps_u, eps_c = eps[:batch], eps[batch:]
    return jnp.linalg.norm(eps_c - eps_u, axis=-1), jnp.abs(eps_u).max(axis=(1, 2, 3))


def noise_difference_maps(unet: UNet2DConditionModel, params: Any, z0: jax.Array, null_context: jax.Array,
                          text_context: jax.Array, timesteps: jax.Array, noise: jax.Array,
                          schedule: NoiseSchedule = NoiseSchedule()) -> jax.Array:
    """The latent-resolution maps (B, h, w) in [0, 1]: the mean over timesteps x draws of the per-image min-max
    normalised difference norms.

    z0 (B, h, w, C) scaled latents; null_context (1 or B, L, D); text_context (B, L, D); timesteps (T,) ints;
    noise (K, B, h, w, C): draw k is used at every timestep. The T x K UNet calls run in a `lax.map` (one
    compiled UNet, memory of one call). Jit it with the module closed over:
    `jax.jit(functools.partial(noise_difference_maps, unet))(params, z0, ...)`."""
    timesteps = jnp.asarray(timesteps, jnp.int32).reshape(-1)
    draws = noise.shape[0]
    null_context = jnp.broadcast_to(null_context, text_context.shape).astype(text_context.dtype)

    def one(args):
        t, k = args
        z_t = q_sample(schedule, z0.astype(jnp.float32), jnp.full((z0.shape[0],), t), noise[k].astype(jnp.float32))
        d, eps_scale = difference_norm(unet, params, z_t, t, null_context, text_context)
        span = d.max(axis=(1, 2)) - d.min(axis=(1, 2))
        return normalize_per_image(d, flat=span <= FLAT_TOLERANCE * eps_scale)

    ts = jnp.repeat(timesteps, draws)
    ks = jnp.tile(jnp.arange(draws), timesteps.shape[0])
    return jax.lax.map(one, (ts, ks)).mean(axis=0)


@functools.partial(jax.jit, static_argnums=1)
def to_image_size(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w) latent maps -> (B, H, W): bilinear (PyTorch align_corners=False), then min-max normalised."""
    up = resize.bilinear(maps[..., None].astype(jnp.float32), size)[..., 0]
    return normalize_per_image(up)


# ------------------------------------------------------------------------------------------ the SD wrapper


def working_size(height: int, width: int, config: ZeroShotConfig, multiple: int) -> tuple[int, int]:
    """The (height, width) the image is resized to: the rule of LD-ZNet's inference script (aspect kept, area ~
    image_size^2, each side floored to `multiple`, at least `multiple`; docs/reference.md, "LD-ZNet inference
    script"), or a square of image_size rounded down to `multiple`."""
    if not config.keep_aspect:
        side = max(multiple, config.image_size // multiple * multiple)
        return side, side
    aspect = height / width
    new_w = int(math.sqrt(config.image_size ** 2 / aspect))
    new_h = int(aspect * new_w)
    return tuple(max(multiple, s // multiple * multiple) for s in (new_h, new_w))


class ZeroShotMapper:
    """Noise-difference maps of phrases in images with a loaded SD UNet, VAE encoder, CLIP text encoder and
    tokenizer. `mapper(image, phrase)`: image uint8 (H, W, 3) of any size -> float32 (H, W) map in [0, 1].

    The image is resized (PIL Lanczos, as LD-ZNet's inference script) to `working_size`, mapped at that size, and the
    latent map is upsampled straight to the original (H, W). One program is compiled per working size."""

    def __init__(self, unet, unet_params, vae, vae_params, text_encoder, text_params, tokenizer,
                 config: ZeroShotConfig = ZeroShotConfig(), schedule: NoiseSchedule = NoiseSchedule()):
        config.check(schedule.num_train_timesteps)
        if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
            raise ValueError(f"the text encoder's width {text_encoder.config.hidden_size} differs from the UNet's "
                             f"cross_attention_dim {unet.config.cross_attention_dim}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}
        self.config, self.schedule = config, schedule
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.text_length = text_encoder.config.max_position_embeddings
        self._latent_maps = jax.jit(self._latent_maps_fn)
        self._encode_text = jax.jit(lambda params, ids: text_encoder.apply({"params": params}, ids).last_hidden_state)
        self._null_context = None

    @classmethod
    def from_pretrained(cls, path: str, config: ZeroShotConfig = ZeroShotConfig(), dtype=jnp.float32,
                        schedule: NoiseSchedule = NoiseSchedule()) -> "ZeroShotMapper":
        """From a diffusers pipeline root (unet/, vae/, text_encoder/, tokenizer/)."""
        from vpd_jax.weights import load_text_encoder, load_tokenizer, load_unet, load_vae

        unet, unet_params = load_unet(path, dtype=dtype)
        vae, vae_params = load_vae(path, dtype=dtype)
        text_encoder, text_params = load_text_encoder(path, dtype=dtype)
        return cls(unet, unet_params, vae, vae_params, text_encoder, text_params, load_tokenizer(path), config,
                   schedule)

    def tokens(self, texts: list[str]) -> np.ndarray:
        return self.tokenizer(texts, self.text_length)

    def encode_text(self, texts: list[str]) -> jax.Array:
        """CLIP last_hidden_state (N, L, D) of the texts (SD's conditioning)."""
        return self._encode_text(self.params["text_encoder"], jnp.asarray(self.tokens(texts)))

    def latents(self, params, images: jax.Array) -> jax.Array:
        """latent_scale x the VAE posterior mean (or a sample) of images (B, H, W, 3) in [-1, 1]."""
        posterior = self.vae.apply({"params": params}, images)
        z = posterior.mean
        if self.config.sample_latent:
            z = posterior.sample(jax.random.fold_in(jax.random.key(self.config.seed), self.config.num_draws))
        return z.astype(jnp.float32) * self.config.latent_scale

    def noise(self, latent_shape: tuple[int, ...]) -> jax.Array:
        """(K, *latent_shape) fixed noise draws."""
        keys = jax.random.split(jax.random.key(self.config.seed), self.config.num_draws)
        return jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(keys)

    def _latent_maps_fn(self, params, images, text_ids, null_context):
        z0 = self.latents(params["vae"], images)
        text_context = self.text_encoder.apply({"params": params["text_encoder"]}, text_ids).last_hidden_state
        return noise_difference_maps(self.unet, params["unet"], z0, null_context, text_context,
                                     jnp.asarray(self.config.timesteps), self.noise(z0.shape), self.schedule)

    @property
    def null_context(self) -> jax.Array:
        if self._null_context is None:
            self._null_context = self.encode_text([self.config.null_prompt])
        return self._null_context

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (h, w, 3) in [-1, 1] at the working size."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
        h, w = working_size(*image.shape[:2], self.config, self.multiple)
        if (h, w) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.LANCZOS))
        return image.astype(np.float32) / 127.5 - 1.0

    def latent_map(self, image: np.ndarray, phrase: str) -> jax.Array:
        """The (1, h, w) latent-resolution map of a uint8 image (any size) before upsampling."""
        ids = self.tokens([self.config.prompt_template.replace("{}", phrase)])
        return self._latent_maps(self.params, jnp.asarray(self.prepare(image))[None], jnp.asarray(ids),
                                 self.null_context)

    def __call__(self, image: np.ndarray, phrase: str) -> np.ndarray:
        return np.asarray(to_image_size(self.latent_map(image, phrase), tuple(np.shape(image)[:2]))[0])


# ------------------------------------------------------------------------------------------------- scoring


def score(mapper, examples: Iterable[tuple[np.ndarray, str, np.ndarray]], max_examples: int = 0) -> dict[str, float]:
    """PhraseCut metrics (mIoU@0.3, IoU_FG@0.3, IoU_FG@0.5, AP; docs/reference.md, "PhraseCut metrics") of the maps
    `mapper(image, phrase)` taken as foreground probabilities against the masks (H, W) (> 0.5 = foreground), for (image,
    phrase, mask) examples; the same numbers as `metrics.phrasecut_scores` on the list of maps, accumulated one at a
    time."""
    metric = metrics.PhraseCutMetric()
    for count, (image, phrase, mask) in enumerate(examples, 1):
        prob = np.asarray(mapper(image, phrase), np.float32)
        mask = np.asarray(mask)
        mask = mask[..., 0] if mask.ndim == 3 else mask
        metric.update(*metrics.phrasecut_counts(prob[None], mask[None]))
        if max_examples and count >= max_examples:
            break
    return metric.result()


def eval_examples(data) -> Iterator[tuple[np.ndarray, str, np.ndarray]]:
    """(uint8 image, prompt text, mask) of every example of a phrasecut evaluation pipeline (`data` = a config.data
    section with task 'phrasecut'; the image is squashed to data.aug.size as the test protocol does; docs/reference.md,
    "PhraseCut test protocol"). Set data.aug.fixed_template='{}' to get the raw phrases (the pipeline otherwise draws a
    template)."""
    from vpd_jax import visualize
    from vpd_jax.data import pipelines

    if data.task != "phrasecut":
        raise ValueError(f"eval_examples reads the 'phrasecut' pipeline, got data.task={data.task!r}")
    for batch in pipelines.make_eval_dataset(data).as_numpy_iterator():
        for i in np.flatnonzero(batch["valid"]):
            yield visualize.to_uint8(batch["image"][i]), batch["text"][i].decode("utf-8"), batch["mask"][i, ..., 0]
