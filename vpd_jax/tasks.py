"""What differs between the VPD tasks, behind one interface the train and eval libraries use.

A `Task` holds the model, its frozen constants (class embeddings), and knows how to run the model on a batch
of its input pipeline, its loss, and the per-batch metric statistics of evaluation (summed over batches on the
host; the statistics of a global batch are already global, so every host holds the same totals).

Text inputs (spec/vpd.md 1.5):
  seg     `config.model.class_embeddings`: a .npy / VPD .pth file of (num_classes, D) pooled CLIP features,
          or 'random' (fixed Gaussian vectors: for scratch runs of the tiny architecture, which has no CLIP);
  depth   the same for the 27 NYU scenes (class ids come from the pipeline's scene_class);
  refer   CLIP token ids from `config.model.tokenizer` (a CLIP tokenizer folder, or 'hash' for a
          WordHashTokenizer when there is none) through the frozen CLIP text encoder `text_encoder`.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpd_jax import inference, losses, metrics
from vpd_jax.class_embeddings import load_class_embeddings
from vpd_jax.models.presets import Architecture
from vpd_jax.models.tokenizer import WordHashTokenizer, load_tokenizer
from vpd_jax.models.vpd import VPDDepth, VPDRefer, VPDSeg

Batch = dict[str, Any]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# UNet parameters of a pretrained SD checkpoint that VPD never uses (it stops before the output head,
# spec/vpd.md 1.2 item 5); everything else must match the model exactly.
UNUSED_PRETRAINED_UNET = ("conv_norm_out", "conv_out")


def compute_kwargs(model: ml_collections.ConfigDict) -> dict:
    """How every task model computes its UNet (not what it computes): remat, attention query chunks, dtype."""
    if model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={model.dtype!r}; supported: {sorted(DTYPES)}")
    if model.attention_query_chunk < 0:
        raise ValueError(f"config.model.attention_query_chunk={model.attention_query_chunk} must be >= 0 "
                         "(0: all queries at once)")
    return dict(remat_policy=model.remat_policy or None, attention_query_chunk=model.attention_query_chunk,
                dtype=DTYPES[model.dtype])


def _common_model_kwargs(model: ml_collections.ConfigDict, arch: Architecture) -> dict:
    return dict(
        unet=arch.unet, vae=arch.vae, timestep=model.timestep, latent_scale=model.latent_scale,
        use_attn=model.use_attn, attn_max_queries=model.attn_max_queries if model.attn_max_queries > 0 else None,
        stop_grad_attn=model.stop_grad_attn, gamma_init=model.gamma_init, **compute_kwargs(model))


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


def _class_embeddings(model: ml_collections.ConfigDict, count: int, dim: int) -> np.ndarray:
    source = model.class_embeddings
    if not source:
        raise ValueError("config.model.class_embeddings is empty: give a .npy / VPD .pth file of pooled CLIP class "
                         "embeddings (python -m vpd_jax.class_embeddings computes them), or 'random' for a scratch "
                         "run without CLIP")
    if source == "random":
        return np.random.default_rng(model.class_embeddings_seed).standard_normal((count, dim)).astype(np.float32)
    embeddings = np.asarray(load_class_embeddings(source), np.float32)
    if embeddings.shape != (count, dim):
        raise ValueError(f"config.model.class_embeddings={source!r} holds {embeddings.shape}, the model needs "
                         f"({count}, {dim}) (classes x the UNet's cross_attention_dim)")
    return embeddings


class Task(abc.ABC):
    """The model and its task-specific pieces. Subclasses set `model` and `constants` in __init__."""

    name: str
    model: nn.Module
    constants: dict[str, np.ndarray]
    tokenizer: Callable | None = None
    frozen_subtrees: tuple[str, ...] = ("vae",)  # loaded from config.init, never trained

    def __init__(self, config: ml_collections.ConfigDict, arch: Architecture):
        self.config = config
        self.arch = arch

    @abc.abstractmethod
    def model_args(self, batch: Batch, constants: dict) -> tuple:
        """The model's positional inputs for a batch."""

    @abc.abstractmethod
    def loss(self, output: jax.Array, batch: Batch) -> jax.Array:
        """Scalar training loss."""

    @abc.abstractmethod
    def eval_statistics(self, variables: dict, batch: Batch, constants: dict) -> Any:
        """Summable metric statistics of an eval batch (padding examples have batch['valid'] False)."""

    @abc.abstractmethod
    def new_metric(self):
        """A host accumulator with update(statistics) and result() -> dict."""

    def pretrained_params(self, unet: dict, vae: dict, text_encoder: dict | None
                          ) -> tuple[dict, Callable[[tuple[str, ...]], bool]]:
        """For trainer.load_pretrained: the model parameter subtrees that the SD UNet / VAE (/ CLIP) trees of
        config.init give, and a predicate on model parameter paths (in those subtrees) that keep their
        initialisation. VPD: the UNet without its unused output head, the VAE, CLIP when the task has it."""
        params = {"unet": {k: v for k, v in unet.items() if k not in UNUSED_PRETRAINED_UNET}, "vae": vae}
        if text_encoder is not None:
            params["text_encoder"] = text_encoder
        return params, lambda path: False

    def init_variables(self, rng: jax.Array, batch: Batch, constants: dict) -> dict:
        return self.model.init(rng, *self.model_args(batch, constants), train=False)

    def apply(self, variables: dict, batch: Batch, constants: dict, *, train: bool, rng: jax.Array | None = None):
        """(output, updated batch_stats or None)."""
        if not train:
            return self.model.apply(variables, *self.model_args(batch, constants), train=False), None
        output, updates = self.model.apply(variables, *self.model_args(batch, constants), train=True,
                                           rngs={"dropout": rng}, mutable=["batch_stats"])
        return output, updates.get("batch_stats")


class SegTask(Task):
    name = "seg"

    def __init__(self, config, arch):
        super().__init__(config, arch)
        m = config.model
        self.num_classes = m.num_classes
        self.model = VPDSeg(**_common_model_kwargs(m, arch), num_classes=m.num_classes, fpn_channels=m.fpn_channels,
                            dropout_ratio=m.dropout_ratio)
        self.constants = {"class_embeddings": _class_embeddings(m, m.num_classes, arch.unet.cross_attention_dim)}

    def model_args(self, batch, constants):
        return batch["image"], constants["class_embeddings"]

    def loss(self, output, batch):
        return losses.segmentation_loss(output, batch["label"], avg_non_ignore=self.config.model.avg_non_ignore)

    def eval_statistics(self, variables, batch, constants):
        e = self.config.eval

        def predict(crops):
            return self.model.apply(variables, crops, constants["class_embeddings"], train=False)

        preds = inference.segment_padded(predict, batch["image"], batch["image_hw"], batch["label_hw"],
                                         batch["label"].shape[1:3], self.num_classes, crop=tuple(e.seg_crop),
                                         stride=tuple(e.seg_stride), chunk_size=e.chunk_size or None)
        return metrics.segmentation_areas(preds, batch["label"], self.num_classes, example_mask=batch["valid"])

    def new_metric(self):
        metric = metrics.SegmentationMetric(self.num_classes)
        return _Accumulator(metric.update, lambda: _scalars(metric.result()))


class DepthTask(Task):
    name = "depth"

    def __init__(self, config, arch):
        super().__init__(config, arch)
        m = config.model
        self.model = VPDDepth(**_common_model_kwargs(m, arch), max_depth=m.max_depth,
                              fusion_channels=m.depth_fusion_channels, num_filters=tuple(m.depth_num_filters),
                              decoder_channels=m.depth_decoder_channels)
        self.constants = {"class_embeddings": _class_embeddings(m, m.num_classes, arch.unet.cross_attention_dim)}

    def model_args(self, batch, constants):
        return batch["image"], batch["scene_class"], constants["class_embeddings"]

    def loss(self, output, batch):
        return losses.silog_loss(output, batch["depth"])

    def eval_statistics(self, variables, batch, constants):
        e, m = self.config.eval, self.config.model

        def predict(images, class_ids):
            return self.model.apply(variables, images, class_ids, constants["class_embeddings"], train=False)

        preds = inference.depth_shift_window_flip(
            predict, batch["image"], batch["scene_class"], window=e.depth_window or None,
            shift_size=e.depth_shift_size, flip=e.flip, min_depth=e.min_depth, max_depth=m.max_depth,
            chunk_size=e.chunk_size or None)
        return metrics.depth_image_metrics(preds, batch["depth"], e.min_depth, m.max_depth,
                                           crop=e.depth_crop or None, example_mask=batch["valid"])

    def new_metric(self):
        metric = metrics.DepthMetric()
        return _Accumulator(lambda s: metric.update(*s), metric.result)


class ReferTask(Task):
    name = "refer"
    frozen_subtrees = ("vae", "text_encoder")

    def __init__(self, config, arch):
        super().__init__(config, arch)
        m = config.model
        self.model = VPDRefer(**_common_model_kwargs(m, arch), text=arch.text)
        self.tokenizer = text_tokenizer(config, arch)
        self.constants = {}

    def model_args(self, batch, constants):
        return batch["image"], batch["tokens"]

    def loss(self, output, batch):
        return losses.referring_loss(output, batch["mask"])

    def eval_statistics(self, variables, batch, constants):
        logits = self.model.apply(variables, batch["image"], batch["tokens"], train=False)
        return metrics.referring_counts(jnp.argmax(logits, -1), batch["mask"], example_mask=batch["valid"])

    def new_metric(self):
        metric = metrics.ReferringMetric()
        return _Accumulator(lambda s: metric.update(*s), metric.result)


TASKS: dict[str, type[Task]] = {"seg": SegTask, "depth": DepthTask, "refer": ReferTask}


def make_task(config: ml_collections.ConfigDict, arch: Architecture) -> Task:
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r}; tasks are {sorted(TASKS)}")
    return TASKS[config.task](config, arch)


@dataclasses.dataclass
class _Accumulator:
    update: Callable[[Any], None]
    result: Callable[[], dict]


def _scalars(result: dict) -> dict:
    """Scalar metrics, plus per-class arrays as lists (for the JSON report)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}


from vpd_jax import ldznet_task  # noqa: E402,F401  (registers 'ldznet'; imported last: it subclasses Task)
