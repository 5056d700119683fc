"""The three VPD tasks: semantic segmentation, monocular depth, referring segmentation (the originals' recipes and
test protocols: docs/reference.md, "VPD").

Text inputs (docs/reference.md, "Text adapter", "Class embeddings"):
  seg     `config.model.class_embeddings`: a .npy / VPD .pth file of (num_classes, D) pooled CLIP features,
          or 'random' (fixed Gaussian vectors: for scratch runs of the tiny architecture, which has no CLIP);
  depth   the same for the 27 NYU scenes (class ids come from the pipeline's scene_class);
  refer   CLIP token ids from `config.model.tokenizer` (a CLIP tokenizer folder, or 'hash' for a
          WordHashTokenizer when there is none) through the frozen CLIP text encoder `text_encoder`.

Predictions for an image of any size (`predict`): it is prepared as the task's evaluation pipeline prepares its
inputs (seg: keep-ratio resize to the run's img_scale, then slide inference at config.eval's ratios and flip;
depth: resized to the training crop height with the width rounded to a multiple of 32; refer: squashed to the
square training size), and every output is mapped back to the image's size.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpd_jax import inference, losses, metrics
from vpd_jax.data.class_names import segmentation_class_names
from vpd_jax.data.config import transform_config
from vpd_jax.models import resize
from vpd_jax.models.vpd import IMAGE_SIDE_MULTIPLE, VPDDepth, VPDRefer, VPDSeg
from vpd_jax.tasks.base import Accumulator, Task, class_embeddings, scalars_and_lists, text_tokenizer


def vpd_model_config(task: str) -> ml_collections.ConfigDict:
    """The config.model section of the VPD tasks (one section for all three; each reads its fields)."""
    return ml_collections.ConfigDict(dict(
        arch="init", text_encoder="", tokenizer="", class_embeddings="", class_embeddings_seed=0,
        num_classes={"seg": 150, "depth": 27, "refer": 2}[task],
        timestep=1, latent_scale=1.0, use_attn=task != "depth", attn_max_queries=-1, stop_grad_attn=True,
        train_vae=False, gamma_init=1e-4,
        # seg head / loss
        fpn_channels=256, dropout_ratio=0.1, avg_non_ignore=False,
        # depth head
        max_depth=10.0, depth_fusion_channels=1536, depth_num_filters=(32, 32, 32), depth_decoder_channels=192,
    ))


def vpd_eval_config(task: str) -> ml_collections.ConfigDict:
    """The config.eval section of the VPD tasks: the test protocols of the originals' test scripts.

      seg_crop, seg_stride   mmseg slide windows (512 / 341); the crop's sides are multiples of 64
                             (check_slide_windows)
      seg_ratios             mmseg aug_test img_ratios applied to data.aug.img_scale: (1.0,) is the single-scale
                             test; inference.AUG_TEST_RATIOS (1.0 ... 1.5) with flip=True is `--aug-test`
      flip                   seg: each ratio also on the flipped image (aug_test); depth: the flip test of the
                             original (on by default); refer: not part of its protocol, an error when set
      depth_window, depth_shift_size   shift-window test: windows of this width (0: the image height) at
                             shift_size offsets
      min_depth, depth_crop  depth metrics: valid gt in (min_depth, max_depth), 'eigen' crop or none ('')
      chunk_size             windows per model call (0: all at once)
    """
    return ml_collections.ConfigDict(dict(
        seg_crop=(512, 512), seg_stride=(341, 341), seg_ratios=(1.0,), chunk_size=0,
        depth_window=0, depth_shift_size=2, flip=task == "depth", min_depth=1e-3, depth_crop="eigen",
    ))


def check_slide_windows(eval_config: ml_collections.ConfigDict) -> None:
    """The segmentation test's windows (config.eval.seg_crop, seg_stride) are ones the model takes: checked when the
    task is built, so train.py and eval.py refuse them at start rather than at the first evaluation."""
    crop, stride = tuple(eval_config.seg_crop), tuple(eval_config.seg_stride)
    if len(crop) != 2 or any(side <= 0 or side % IMAGE_SIDE_MULTIPLE for side in crop):
        raise ValueError(f"config.eval.seg_crop={crop}: (height, width), each a positive multiple of "
                         f"{IMAGE_SIDE_MULTIPLE} (the VPD backbone's input)")
    if len(stride) != 2 or any(step <= 0 for step in stride):
        raise ValueError(f"config.eval.seg_stride={stride}: (height, width), each positive")


class _VPDTask(Task):
    """What the three VPD tasks share: the config sections, the model's common fields, the jitted forward."""

    @classmethod
    def model_config(cls) -> ml_collections.ConfigDict:
        return vpd_model_config(cls.name)

    @classmethod
    def eval_config(cls) -> ml_collections.ConfigDict:
        return vpd_eval_config(cls.name)

    def _model_kwargs(self) -> dict:
        m, arch = self.config.model, self.arch
        return dict(unet=arch.unet, vae=arch.vae, timestep=m.timestep, latent_scale=m.latent_scale,
                    use_attn=m.use_attn, attn_max_queries=m.attn_max_queries if m.attn_max_queries > 0 else None,
                    stop_grad_attn=m.stop_grad_attn, train_vae=m.train_vae, gamma_init=m.gamma_init,
                    compute=self.compute)

    def _class_embeddings(self) -> np.ndarray:
        m = self.config.model
        return class_embeddings(m, m.num_classes, self.arch.unet.cross_attention_dim)

    @functools.cached_property
    def _forward(self):
        """The model's inference forward, jitted once per task (predictions)."""
        def forward(variables, *args):
            with self.compute.trace_scope():
                return self.model.apply(variables, *args, train=False)
        return jax.jit(forward)


class SegTask(_VPDTask):
    name = "seg"
    pipeline = "seg"
    optim_preset = "vpd_seg"
    best_metric = ("mIoU", "max")  # mmseg's save_best; the original keeps every 8k-iteration checkpoint

    def __init__(self, config, arch):
        super().__init__(config, arch)
        check_slide_windows(config.eval)
        m = config.model
        self.num_classes = m.num_classes
        self.model = VPDSeg(**self._model_kwargs(), num_classes=m.num_classes, fpn_channels=m.fpn_channels,
                            dropout_ratio=m.dropout_ratio)
        self.constants = {"class_embeddings": self._class_embeddings()}

    def example_targets(self, batch_size):
        return {"label": np.zeros((batch_size, *self.image_size()), np.int32)}

    def model_args(self, batch, constants):
        return batch["image"], constants["class_embeddings"]

    def loss(self, output, batch):
        return losses.segmentation_loss(output, batch["label"], avg_non_ignore=self.config.model.avg_non_ignore)

    def _protocol(self) -> dict:
        """The keyword arguments of the test protocol (config.eval) for inference.segment / segment_padded."""
        e, img_scale = self.config.eval, tuple(transform_config(self.config.data).img_scale)
        return dict(scales=tuple(e.seg_ratios), flip=e.flip, img_scale=img_scale, crop=tuple(e.seg_crop),
                    stride=tuple(e.seg_stride), chunk_size=e.chunk_size or None)

    def eval_predictions(self, variables, batch, constants):
        def predict(crops):
            return self.model.apply(variables, crops, constants["class_embeddings"], train=False)

        with self.compute.trace_scope():
            return inference.segment_padded(predict, batch["image"], batch["image_hw"], batch["label_hw"],
                                            batch["label"].shape[1:3], self.num_classes, **self._protocol())

    def eval_statistics(self, variables, batch, constants):
        preds = self.eval_predictions(variables, batch, constants)
        return metrics.segmentation_areas(preds, batch["label"], self.num_classes, example_mask=batch["valid"])

    def new_metric(self):
        metric = metrics.SegmentationMetric(self.num_classes)
        names = segmentation_class_names(self.config.data.name, self.num_classes)
        # Per-class IoU / Acc as lists in class order, with the names they belong to (JSON, logs, TensorBoard).
        return Accumulator(metric.update, lambda: {**scalars_and_lists(metric.result()), "classes": names})

    @functools.cached_property
    def _features(self):
        """The four feature levels (with their attention maps), jitted: the maps for the prediction pictures."""
        def features(variables, images, embeddings):
            with self.compute.trace_scope():
                _, state = self.model.apply(variables, images, embeddings, train=False, mutable=["intermediates"])
            return state["intermediates"]["features"][0]
        return jax.jit(features)

    @functools.cached_property
    def _padded_probs(self):
        """The evaluation protocol on one padded image (as the eval pipeline pads), jitted: one program per padded
        image and label shape, so a folder of photos compiles a handful of times."""
        def probs(variables, embeddings, image, image_hw, label_hw, label_shape):
            def predict(crops):
                return self.model.apply(variables, crops, embeddings, train=False)

            with self.compute.trace_scope():
                return inference.segment_padded_probs(predict, image, image_hw, label_hw, label_shape,
                                                      self.num_classes, **self._protocol())
        return jax.jit(probs, static_argnums=(5,))

    def predict(self, variables, constants, image, **inputs):
        """{'labels': (H, W) class ids, 'attention': the per-class cross-attention maps (h, w, N) of the 1/16
        level over the resized image (absent without maps)}. The resized image and the label canvas are padded
        to multiples of data.seg_eval_pad_multiple, as in evaluation (the padding does not change the result)."""
        import tensorflow as tf

        from vpd_jax.data import transforms

        aug = transform_config(self.config.data)
        resized = transforms.seg_eval(tf.constant(image), tf.zeros(image.shape[:2], tf.uint8), aug)["image"].numpy()
        embeddings = constants["class_embeddings"]
        bucket = self.config.data.seg_eval_pad_multiple
        padded = _pad_to(resized[None], bucket)
        label_shape = tuple(-(-side // bucket) * bucket for side in image.shape[:2])
        probs = self._padded_probs(variables, embeddings, jnp.asarray(padded),
                                   jnp.asarray([resized.shape[:2]], jnp.int32),
                                   jnp.asarray([image.shape[:2]], jnp.int32), label_shape)
        outputs = {"labels": np.asarray(jnp.argmax(probs[0, :image.shape[0], :image.shape[1]], axis=-1))}
        if self.config.model.use_attn:
            features = self._features(variables, jnp.asarray(_pad_to(padded, IMAGE_SIDE_MULTIPLE)), embeddings)
            # The maps of the 1/16 level, cropped to the part that covers the image (not its padding).
            valid = [-(-side // 16) for side in resized.shape[:2]]
            outputs["attention"] = np.asarray(features[1][0, :valid[0], :valid[1], -self.num_classes:])
        return outputs


def _pad_to(images: np.ndarray, multiple: int) -> np.ndarray:
    """(B, H, W, C) zero-padded bottom / right to multiples of `multiple`."""
    height, width = images.shape[1:3]
    return np.pad(images, ((0, 0), (0, -height % multiple), (0, -width % multiple), (0, 0)))


class DepthTask(_VPDTask):
    name = "depth"
    pipeline = "depth"
    optim_preset = "vpd_depth"
    best_metric = ("rmse", "min")  # depth/train.py keeps best.ckpt by RMSE
    predict_inputs = ("scene",)

    def __init__(self, config, arch):
        super().__init__(config, arch)
        m = config.model
        self.model = VPDDepth(**self._model_kwargs(), max_depth=m.max_depth,
                              fusion_channels=m.depth_fusion_channels, num_filters=tuple(m.depth_num_filters),
                              decoder_channels=m.depth_decoder_channels)
        self.constants = {"class_embeddings": self._class_embeddings()}

    def example_targets(self, batch_size):
        return {"depth": np.zeros((batch_size, *self.image_size()), np.float32),
                "scene_class": np.zeros((batch_size,), np.int32)}  # an input, drawn with the targets

    def model_args(self, batch, constants):
        return batch["image"], batch["scene_class"], constants["class_embeddings"]

    def loss(self, output, batch):
        return losses.silog_loss(output, batch["depth"])

    def eval_predictions(self, variables, batch, constants):
        e, m = self.config.eval, self.config.model

        def predict(images, class_ids):
            return self.model.apply(variables, images, class_ids, constants["class_embeddings"], train=False)

        with self.compute.trace_scope():
            return inference.depth_shift_window_flip(
                predict, batch["image"], batch["scene_class"], window=e.depth_window or None,
                shift_size=e.depth_shift_size, flip=e.flip, min_depth=e.min_depth, max_depth=m.max_depth,
                chunk_size=e.chunk_size or None)

    def eval_statistics(self, variables, batch, constants):
        e, m = self.config.eval, self.config.model
        preds = self.eval_predictions(variables, batch, constants)
        return metrics.depth_image_metrics(preds, batch["depth"], e.min_depth, m.max_depth,
                                           crop=e.depth_crop or None, example_mask=batch["valid"])

    def new_metric(self):
        metric = metrics.DepthMetric()
        return Accumulator(lambda s: metric.update(*s), metric.result)

    def predict(self, variables, constants, image, *, scene: int, **inputs):
        """{'depth': (H, W) metres}; `scene` is the NYU scene class id. The image is resized to the training crop
        height, its width in proportion rounded to a multiple of 32 (the model pads it to 64 itself): photos of one
        aspect ratio share one compiled program. (Padding widths further would change the prediction: the UNet
        attends across the whole image.)"""
        import tensorflow as tf

        height = int(transform_config(self.config.data).crop_size[0])
        width = max(32, int(round(image.shape[1] * height / image.shape[0] / 32)) * 32)
        resized = tf.image.resize(tf.constant(image, tf.float32), (height, width), method="bilinear")
        x = jnp.asarray(resized.numpy() / 127.5 - 1.0, jnp.float32)[None]
        pred = self._forward(variables, x, jnp.asarray([scene], jnp.int32), constants["class_embeddings"])
        return {"depth": np.asarray(resize.bilinear(pred[..., None], image.shape[:2])[0, ..., 0])}


class ReferTask(_VPDTask):
    name = "refer"
    pipeline = "refer"
    optim_preset = "vpd_refer"
    best_metric = ("oIoU", "max")  # refer/train.py keeps model_best by overall IoU
    frozen_subtrees = ("vae", "text_encoder")
    predict_inputs = ("text",)

    def __init__(self, config, arch):
        if config.eval.flip:
            raise ValueError("config.eval.flip=True: the referring-segmentation test has no flip pass (refer/test.py "
                             "scores each sentence once at 512x512), and a mirrored image would contradict "
                             "expressions such as 'the man on the left'")
        super().__init__(config, arch)
        self.model = VPDRefer(**self._model_kwargs(), text=arch.text)
        self.tokenizer = text_tokenizer(config, arch)
        self.constants = {}

    def example_targets(self, batch_size):
        return {"mask": np.zeros((batch_size, *self.image_size()), np.int32)}

    def model_args(self, batch, constants):
        return batch["image"], batch["tokens"]

    def loss(self, output, batch):
        return losses.referring_loss(output, batch["mask"])

    def eval_predictions(self, variables, batch, constants):
        logits, _ = self.apply(variables, batch, constants, train=False)
        return jnp.argmax(logits, -1)

    def eval_statistics(self, variables, batch, constants):
        preds = self.eval_predictions(variables, batch, constants)
        return metrics.referring_counts(preds, batch["mask"], example_mask=batch["valid"])

    def new_metric(self):
        metric = metrics.ReferringMetric()
        return Accumulator(lambda s: metric.update(*s), metric.result)

    def predict(self, variables, constants, image, *, text: str, **inputs):
        """{'mask': (H, W) in {0, 1}} of the expression `text`."""
        import tensorflow as tf

        from vpd_jax.data import transforms

        aug = transform_config(self.config.data)
        sample = transforms.refer(tf.constant(image), tf.zeros(image.shape[:2], tf.int32), aug)
        tokens = self.tokenizer([text], self.config.data.text_max_length)
        logits = self._forward(variables, jnp.asarray(sample["image"].numpy())[None], jnp.asarray(tokens))
        mask = jnp.argmax(logits, -1)[..., None].astype(jnp.int32)
        return {"mask": np.asarray(resize.nearest(mask, image.shape[:2])[0, ..., 0])}
