"""The interface every task implements, and the helpers the task families share.

A `Task` is everything that differs between VPD segmentation, depth, referring segmentation, LD-ZNet and the
feature probes, so that the run layer (vpd_jax/run) and the applications (vpd_jax/apps) never ask for a task by
name. It owns:
  what it needs of a config   `model_config()` / `eval_config()`: the default config.model / config.eval sections;
                              `pipeline` (the data pipeline its batches come from, vpd_jax.data.config.PIPELINES)
                              and `optim_preset` (vpd_jax.run.optim.default_optim_config)
  its model                   built in __init__ from config.model, config.compute and the architecture
  example inputs              `example_batch()`: zeros shaped as a training batch, for init and compilation
  training                    `apply` (output and updated BatchNorm statistics) and `loss`
  evaluation                  `eval_statistics` (summable per batch), `new_metric` (the host accumulator) and
                              `best_metric` (what vpd_jax/run/best.py keeps the best checkpoint by)
  frozen parts                `frozen_subtrees`, and `pretrained_params` (what config.init provides)
  predictions                 `predict`: named outputs for one image (vpd_jax/apps/predict.py writes them)

Constants (class embeddings) live in `constants`, a dict of host arrays the jitted steps take as an argument.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vpd_jax.models.compute import Compute
from vpd_jax.models.presets import Architecture
from vpd_jax.models.tokenizer import WordHashTokenizer, load_tokenizer
from vpd_jax.models.unet_config import OUTPUT_HEAD_PARAMS
from vpd_jax.weights.class_embeddings import load_class_embeddings

Batch = dict[str, Any]


class Task(abc.ABC):
    """The model and its task-specific pieces. Subclasses set `model` and `constants` in __init__."""

    name: ClassVar[str]
    pipeline: ClassVar[str]
    optim_preset: ClassVar[str]
    frozen_subtrees: ClassVar[tuple[str, ...]] = ("vae",)  # loaded from config.init, never trained
    predict_inputs: ClassVar[tuple[str, ...]] = ()  # what `predict` needs besides the image: 'text', 'scene'
    best_metric: ClassVar[tuple[str, str] | None] = None  # (eval metric, 'max' | 'min') the best checkpoint keeps
    model: nn.Module
    constants: dict[str, np.ndarray]
    tokenizer: Callable | None = None

    def __init__(self, config: ml_collections.ConfigDict, arch: Architecture):
        self.config = config
        self.arch = arch
        self.compute = Compute.from_config(config.compute)

    # ------------------------------------------------------------------------------------------ config

    @staticmethod
    def model_config() -> ml_collections.ConfigDict:
        """The default config.model section (every field, so overrides are type checked)."""
        return ml_collections.ConfigDict()

    @staticmethod
    def eval_config() -> ml_collections.ConfigDict:
        """The default config.eval section."""
        return ml_collections.ConfigDict()

    @classmethod
    def uses_text_encoder(cls) -> bool:
        """Whether the model holds a (frozen) CLIP text encoder, whose architecture config.init's folder gives."""
        return "text_encoder" in cls.frozen_subtrees

    # ------------------------------------------------------------------------------------------ the model

    def image_size(self) -> tuple[int, int]:
        """(height, width) of the training pipeline's images."""
        aug = self.config.data.aug
        return tuple(aug.crop_size) if "crop_size" in aug else (aug.size, aug.size)

    def example_batch(self, batch_size: int = 1) -> Batch:
        """A batch of zeros with the keys, shapes and dtypes of the training pipeline's batches (its text as
        token ids): the model's inputs and the loss's targets."""
        batch = {"image": np.zeros((batch_size, *self.image_size(), 3), np.float32)}
        if self.tokenizer is not None:
            batch["tokens"] = np.zeros((batch_size, self.config.data.text_max_length), np.int32)
        return {**batch, **self.example_targets(batch_size)}

    @abc.abstractmethod
    def example_targets(self, batch_size: int) -> Batch:
        """The targets of `example_batch` (zeros), as the task's pipeline gives them."""

    @abc.abstractmethod
    def model_args(self, batch: Batch, constants: dict) -> tuple:
        """The model's positional inputs for a batch."""

    def init_variables(self, rng: jax.Array, batch: Batch, constants: dict) -> dict:
        with self.compute.trace_scope():
            return self.model.init(rng, *self.model_args(batch, constants), train=False)

    def apply(self, variables: dict, batch: Batch, constants: dict, *, train: bool, rng: jax.Array | None = None):
        """(output, updated batch_stats or None)."""
        args = self.model_args(batch, constants)
        with self.compute.trace_scope():
            if not train:
                return self.model.apply(variables, *args, train=False), None
            output, updates = self.model.apply(variables, *args, train=True, rngs={"dropout": rng},
                                               mutable=["batch_stats"])
        return output, updates.get("batch_stats")

    @abc.abstractmethod
    def loss(self, output: jax.Array, batch: Batch) -> jax.Array:
        """Scalar training loss."""

    # ------------------------------------------------------------------------------------------ evaluation

    @abc.abstractmethod
    def eval_statistics(self, variables: dict, batch: Batch, constants: dict) -> Any:
        """Summable metric statistics of an eval batch (padding examples have batch['valid'] False)."""

    def eval_predictions(self, variables: dict, batch: Batch, constants: dict) -> jax.Array | None:
        """The per-example predictions that `eval_statistics` scores, through the task's test protocol (label maps
        at the label's padded size, depth at the image's, masks), for pictures of the evaluation; None where the
        task does not separate them (the pictures then show the plain forward)."""
        return None

    @abc.abstractmethod
    def new_metric(self) -> "Accumulator":
        """A host accumulator with update(statistics) and result() -> dict."""

    # ------------------------------------------------------------------------------------------ weights

    def pretrained_params(self, unet: dict, vae: dict, text_encoder: dict | None
                          ) -> tuple[dict, Callable[[tuple[str, ...]], bool]]:
        """The model parameter subtrees that the SD UNet / VAE (/ CLIP) trees of config.init give, and a
        predicate on model parameter paths (in those subtrees) that keep their initialisation. VPD: the UNet
        without the output head it never runs, the VAE, CLIP when the task has it."""
        params = {"unet": {k: v for k, v in unet.items() if k not in OUTPUT_HEAD_PARAMS}, "vae": vae}
        if text_encoder is not None:
            params["text_encoder"] = text_encoder
        return params, lambda path: False

    # ------------------------------------------------------------------------------------------ predictions

    def predict(self, variables: dict, constants: dict, image: np.ndarray, **inputs) -> dict[str, np.ndarray]:
        """Named outputs for one RGB uint8 image (H, W, 3) of any size, at that size; `inputs` holds what
        `predict_inputs` names. vpd_jax/apps/predict.py writes each output kind."""
        raise ValueError(f"task {self.name!r} makes no predictions for images")


@dataclasses.dataclass
class Accumulator:
    """A host-side metric: update(statistics of one batch), result() -> dict."""

    update: Callable[[Any], None]
    result: Callable[[], dict]


def scalars_and_lists(result: dict) -> dict:
    """Scalar metrics, plus per-class arrays as lists (for the JSON report)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}


def text_tokenizer(config: ml_collections.ConfigDict, arch: Architecture):
    """config.model.tokenizer: 'hash' (WordHashTokenizer over the text encoder's vocabulary), a CLIP tokenizer
    folder, or empty for the `init` pipeline's."""
    m = config.model
    if m.tokenizer == "hash":
        return WordHashTokenizer(arch.text.vocab_size)
    if m.tokenizer or config.init:
        return load_tokenizer(m.tokenizer or config.init)
    raise ValueError("config.model.tokenizer and config.init are empty: give a CLIP tokenizer folder (or "
                     "'hash' for a model trained without CLIP weights)")


def class_embeddings(model: ml_collections.ConfigDict, count: int, dim: int) -> np.ndarray:
    """The (count, dim) class embeddings config.model.class_embeddings names: a file, or 'random' (fixed Gaussian
    vectors from class_embeddings_seed, for scratch runs without CLIP)."""
    source = model.class_embeddings
    if not source:
        raise ValueError("config.model.class_embeddings is empty: give a .npy / VPD .pth file of pooled CLIP class "
                         "embeddings (python -m vpd_jax.apps.class_embeddings computes them), or 'random' for a "
                         "scratch run without CLIP")
    if source == "random":
        return np.random.default_rng(model.class_embeddings_seed).standard_normal((count, dim)).astype(np.float32)
    embeddings = np.asarray(load_class_embeddings(source), np.float32)
    if embeddings.shape != (count, dim):
        raise ValueError(f"config.model.class_embeddings={source!r} holds {embeddings.shape}, the model needs "
                         f"({count}, {dim}) (classes x the UNet's cross_attention_dim)")
    return embeddings
