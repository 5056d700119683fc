"""Per-task train and eval transforms, faithful to the reference data pipelines.

Pure TensorFlow, graph-mode safe, for `tf.data.Dataset.map`. Random transforms take a per-element
`seed` (int32/int64, shape (2,)) and use only stateless random ops derived from it, so the same seed
gives bit-identical outputs and the pipeline's iterator can be checkpointed (see random_ops.py).
Each task has a frozen config dataclass whose defaults are the reference values.
Call the transforms directly inside `Dataset.map`: wrapping them in a `tf.function` puts a
(stateful) function-call op into the map, and the iterator can then no longer be checkpointed.

The references, by their section titles in docs/reference.md:
- ADE20K segmentation, mmseg 0.30 ("Segmentation training data", "Segmentation test protocol"): `seg_train`,
  `seg_eval`.
- NYUv2 depth, GLPDepth code as VPD uses it ("Depth training data", "Depth test protocol"): `depth_train`,
  `depth_eval`, `cut_depth`.
- RefCOCO referring segmentation, LAVT-style ("Referring data"): `refer`.
- PhraseCut, LD-ZNet / CLIPSeg dataset ("PhraseCut training data", "Prompt templates", "PhraseCut test protocol"):
  `phrasecut_train`, `phrasecut_eval`, `phrasecut_prompt`.

Where an op approximates OpenCV/PIL rather than reproducing it bit for bit, `image_ops` says so and
the tests measure the gap.
"""
import dataclasses
from typing import Optional

import tensorflow as tf

from vpd_jax.data import image_ops, photometric, random_ops
from vpd_jax.data.photometric import AlbumentationsPhotometricConfig, MMSegPhotometricConfig
from vpd_jax.data.validation import check_ordered_pair, check_positive_pair, check_probabilities

# The transforms use explicit tf.cond / tf.while_loop and Python branches on static config only,
# so AutoGraph conversion (which tf.data.map and tf.function apply by default) adds nothing but
# tracing time; it is switched off for them and everything they call.
_graph_function = tf.autograph.experimental.do_not_convert

__all__ = [
    "SegAugConfig", "DepthAugConfig", "ReferConfig", "PhraseCutConfig",
    "MMSegPhotometricConfig", "AlbumentationsPhotometricConfig", "PHRASECUT_TEMPLATES",
    "reduce_zero_label", "seg_train", "seg_eval", "cut_depth", "depth_train", "depth_eval", "refer",
    "phrasecut_train", "phrasecut_eval", "phrasecut_prompt",
]


def _image_u8(image, name="image") -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise TypeError(f"{name} must be uint8 (H, W, 3), got dtype {image.dtype.name}")
    if image.shape.rank != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}")
    return image


def _map_2d(x, name) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 2:
        raise ValueError(f"{name} must have shape (H, W), got {x.shape}")
    return x


def _assert_same_hw(a, b, what):
    return tf.debugging.assert_equal(tf.shape(a)[:2], tf.shape(b)[:2],
                                     message=f"{what}: image and map sizes differ")


# --------------------------------------------------------------------------------------------------
# Segmentation (ADE20K, mmseg 0.30)
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SegAugConfig:
    """mmseg ADE20K train/test pipeline (docs/reference.md, "Segmentation training data", "Segmentation test
    protocol"). Sizes are (height, width) except img_scale, which is mmseg's (long edge, short edge)."""
    img_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75     # >= 1 disables the class-ratio retries
    crop_max_tries: int = 10
    ignore_index: int = 255          # excluded from the class-ratio rule; the label pad value
    reduce_zero_label: bool = True
    flip_prob: float = 0.5
    photometric: MMSegPhotometricConfig = MMSegPhotometricConfig()

    def __post_init__(self):
        check_positive_pair(self, "img_scale")
        check_positive_pair(self, "crop_size")
        check_ordered_pair(self, "ratio_range", low=1e-6)
        if self.cat_max_ratio <= 0:
            raise ValueError(f"SegAugConfig.cat_max_ratio must be > 0, got {self.cat_max_ratio}")
        if self.crop_max_tries < 1:
            raise ValueError(f"SegAugConfig.crop_max_tries must be >= 1, got {self.crop_max_tries}")
        check_probabilities(self, "flip_prob")


@_graph_function
def reduce_zero_label(label) -> tf.Tensor:
    """mmseg reduce_zero_label on uint8 labels: 0 -> 255, k -> k - 1, and (uint8 wrap) 255 -> 255. int32 out."""
    label = tf.cast(label, tf.int32)
    return tf.where((label == 0) | (label == 255), 255, label - 1)


def _seg_labels(label, cfg: SegAugConfig) -> tf.Tensor:
    label = _map_2d(label, "label")
    return reduce_zero_label(label) if cfg.reduce_zero_label else tf.cast(label, tf.int32)


def _class_ratio_ok(label_crop, cfg: SegAugConfig) -> tf.Tensor:
    """mmseg RandomCrop accept rule: > 1 distinct non-ignored class and the largest covers < cat_max_ratio."""
    classes, _, counts = tf.unique_with_counts(tf.reshape(label_crop, [-1]))
    counts = tf.boolean_mask(counts, classes != cfg.ignore_index)
    total = tf.cast(tf.reduce_sum(counts), tf.float64)
    largest = tf.cast(tf.reduce_max(tf.concat([counts, [0]], 0)), tf.float64)
    return (tf.size(counts) > 1) & (largest / tf.maximum(total, 1.0) < cfg.cat_max_ratio)


def _seg_crop_offset(label, seed, cfg: SegAugConfig):
    """mmseg RandomCrop offsets: draw one; while the rule fails (at most crop_max_tries checks) draw
    again; after crop_max_tries failures the last draw is kept unchecked."""
    crop_h, crop_w = cfg.crop_size
    h, w = tf.shape(label)[0], tf.shape(label)[1]
    n = cfg.crop_max_tries + 1
    ys = random_ops.randint(random_ops.sub_seed(seed, "crop_y"), 0, tf.maximum(h - crop_h, 0) + 1, [n])
    xs = random_ops.randint(random_ops.sub_seed(seed, "crop_x"), 0, tf.maximum(w - crop_w, 0) + 1, [n])
    if cfg.cat_max_ratio >= 1.0:
        return ys[0], xs[0]

    def rejected(i):
        crop = label[ys[i]:ys[i] + crop_h, xs[i]:xs[i] + crop_w]
        return tf.logical_not(_class_ratio_ok(crop, cfg))

    (i,) = tf.while_loop(lambda i: (i < cfg.crop_max_tries) & rejected(i), lambda i: (i + 1,), (tf.constant(0),))
    return ys[i], xs[i]


@_graph_function
def seg_train(image, label, seed, cfg: SegAugConfig = SegAugConfig()) -> dict:
    """ADE20K training sample: ratio-range keep-ratio resize, class-ratio random crop, flip,
    PhotoMetricDistortion, normalise, pad.

    image: uint8 (H, W, 3) RGB. label: uint8/int32 (H, W) raw ADE labels (0 = other, 1..150).
    Returns {"image": float32 (crop_h, crop_w, 3) in [-1, 1] (pad 0), "label": int32 (crop_h, crop_w)
    (reduced labels, pad and ignore = ignore_index)}.
    """
    image = _image_u8(image)
    label = _seg_labels(label, cfg)
    seed = random_ops.check_seed(seed)
    with tf.control_dependencies([_assert_same_hw(image, label, "seg_train")]):
        height, width = tf.shape(image)[0], tf.shape(image)[1]

    ratio = random_ops.uniform(random_ops.sub_seed(seed, "resize_ratio"), *cfg.ratio_range)
    long_edge = tf.floor(cfg.img_scale[0] * ratio)     # mmseg: int(img_scale * ratio)
    short_edge = tf.floor(cfg.img_scale[1] * ratio)
    size = image_ops.keep_ratio_size(height, width, tf.maximum(long_edge, short_edge),
                                     tf.minimum(long_edge, short_edge))
    image = image_ops.resize_bilinear_uint8(image, size)
    label = image_ops.resize_nearest(label, size, "opencv")

    y0, x0 = _seg_crop_offset(label, seed, cfg)
    crop_h, crop_w = cfg.crop_size
    image = image[y0:y0 + crop_h, x0:x0 + crop_w]
    label = label[y0:y0 + crop_h, x0:x0 + crop_w]

    flip = random_ops.bernoulli(random_ops.sub_seed(seed, "flip"), cfg.flip_prob)
    image, label = tf.cond(flip, lambda: (image_ops.flip_left_right(image), image_ops.flip_left_right(label)),
                           lambda: (image, label))

    image = photometric.mmseg_photometric_distortion(image, random_ops.sub_seed(seed, "photometric"),
                                                     cfg.photometric)
    return {
        "image": image_ops.pad_bottom_right(image_ops.to_signed_unit(image), crop_h, crop_w, 0.0),
        "label": image_ops.pad_bottom_right(label, crop_h, crop_w, cfg.ignore_index),
    }


@_graph_function
def seg_eval(image, label, cfg: SegAugConfig = SegAugConfig()) -> dict:
    """ADE20K evaluation sample: keep-ratio resize to img_scale (short side 512 unless the long side
    would pass 2048), normalise, no pad. The label stays at the original size (reduced, 255 ignore)
    because mmseg scores at the original resolution.
    Returns {"image": float32 (h', w', 3) in [-1, 1], "label": int32 (H, W)}."""
    image = _image_u8(image)
    label = _seg_labels(label, cfg)
    with tf.control_dependencies([_assert_same_hw(image, label, "seg_eval")]):
        size = image_ops.keep_ratio_size(tf.shape(image)[0], tf.shape(image)[1], max(cfg.img_scale),
                                         min(cfg.img_scale))
    image = image_ops.resize_bilinear_uint8(image, size)
    return {"image": image_ops.to_signed_unit(image), "label": label}


# --------------------------------------------------------------------------------------------------
# Depth (NYUv2, GLPDepth/VPD)
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DepthAugConfig:
    """GLPDepth/VPD NYUv2 training augmentation (docs/reference.md, "Depth training data").

    cutdepth_prob: the reference applies CutDepth on every 4th sample of a worker (a counter);
      here each sample flips a stateless coin with this probability instead.
    cutdepth_strip_p: the `p` of the strip-width rule w = int(max((W - l) * beta * p, 1)).
    cutdepth_uint8_wrap: True (faithful) writes int(depth_mm) mod 256 into the strip, what numpy's
      unsafe float->uint8 cast does in the reference; False writes depth scaled to 0..255 by
      max_depth (round(clip(depth_m / max_depth, 0, 1) * 255)), the evident intent.
    crop_size: (height, width) of the random crop; albumentations RandomCrop offsets
      (int((H - h) * u), int((W - w) * u)).
    """
    crop_size: tuple[int, int] = (480, 480)
    flip_prob: float = 0.5
    cutdepth_prob: float = 0.25
    cutdepth_strip_p: float = 0.75
    cutdepth_uint8_wrap: bool = True
    max_depth: float = 10.0
    photometric: AlbumentationsPhotometricConfig = AlbumentationsPhotometricConfig()

    def __post_init__(self):
        check_positive_pair(self, "crop_size")
        check_probabilities(self, "flip_prob", "cutdepth_prob", "cutdepth_strip_p")
        if self.max_depth <= 0:
            raise ValueError(f"DepthAugConfig.max_depth must be > 0, got {self.max_depth}")


def _depth_inputs(image, depth_m, what):
    image = _image_u8(image)
    depth_m = tf.convert_to_tensor(depth_m)
    if depth_m.dtype != tf.float32:
        raise TypeError(f"depth_m must be float32 metres (H, W), got dtype {depth_m.dtype.name}")
    depth_m = _map_2d(depth_m, "depth_m")
    with tf.control_dependencies([_assert_same_hw(image, depth_m, what)]):
        return tf.identity(image), depth_m


@_graph_function
def cut_depth(image, depth_m, seed, cfg: DepthAugConfig = DepthAugConfig()) -> tf.Tensor:
    """CutDepth (GLPDepth): with probability cutdepth_prob, overwrite all 3 channels of a vertical
    strip of the uint8 image with depth values. alpha, beta ~ U(0, 1); l = int(alpha * W);
    w = int(max((W - alpha * W) * beta * p, 1)); columns [l, l + w) (clipped to the image).
    Returns the uint8 image; depth is not changed."""
    image, depth_m = _depth_inputs(image, depth_m, "cut_depth")
    seed = random_ops.check_seed(seed)
    width = tf.cast(tf.shape(image)[1], tf.float64)
    alpha = random_ops.uniform(random_ops.sub_seed(seed, "cutdepth_alpha"), 0.0, 1.0)
    beta = random_ops.uniform(random_ops.sub_seed(seed, "cutdepth_beta"), 0.0, 1.0)
    left = tf.floor(alpha * width)
    strip_w = tf.floor(tf.maximum((width - alpha * width) * beta * cfg.cutdepth_strip_p, 1.0))
    cols = tf.range(tf.shape(image)[1], dtype=tf.float64)
    in_strip = (cols >= left) & (cols < left + strip_w)
    apply = random_ops.bernoulli(random_ops.sub_seed(seed, "cutdepth_apply"), cfg.cutdepth_prob)

    depth64 = tf.cast(depth_m, tf.float64)
    if cfg.cutdepth_uint8_wrap:
        depth_mm = tf.cast(tf.round(depth64 * 1000.0), tf.int64)   # the reference's integer millimetres
        values = tf.cast(tf.math.floormod(depth_mm, 256), tf.uint8)
    else:
        values = image_ops.round_to_uint8(tf.clip_by_value(depth64 / cfg.max_depth, 0.0, 1.0) * 255.0)
    mask = (in_strip & apply)[tf.newaxis, :, tf.newaxis]
    return tf.where(mask, values[:, :, tf.newaxis], image)


@_graph_function
def depth_train(image, depth_m, seed, cfg: DepthAugConfig = DepthAugConfig()) -> dict:
    """NYUv2 training sample: CutDepth, HorizontalFlip, RandomCrop, brightness/contrast, gamma, HSV.

    image: uint8 (H, W, 3) RGB; depth_m: float32 (H, W) metres, 0 = missing.
    Returns {"image": float32 (crop_h, crop_w, 3) in [-1, 1], "depth": float32 (crop_h, crop_w) metres}.
    Flip and crop move depth with the image; nothing else touches depth.
    """
    seed = random_ops.check_seed(seed)
    image = cut_depth(image, depth_m, random_ops.sub_seed(seed, "cutdepth"), cfg)
    depth_m = tf.convert_to_tensor(depth_m)

    flip = random_ops.bernoulli(random_ops.sub_seed(seed, "flip"), cfg.flip_prob)
    image, depth_m = tf.cond(flip, lambda: (image_ops.flip_left_right(image), image_ops.flip_left_right(depth_m)),
                             lambda: (image, depth_m))

    crop_h, crop_w = cfg.crop_size
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    fits = tf.debugging.assert_greater_equal(
        tf.stack([height, width]), tf.constant([crop_h, crop_w]),
        message=f"depth_train: image smaller than crop_size {cfg.crop_size}")
    u = random_ops.uniform(random_ops.sub_seed(seed, "crop"), 0.0, 1.0, shape=[2])
    with tf.control_dependencies([fits]):
        y0 = tf.cast(tf.floor(tf.cast(height - crop_h, tf.float64) * u[0]), tf.int32)
        x0 = tf.cast(tf.floor(tf.cast(width - crop_w, tf.float64) * u[1]), tf.int32)
    image = image[y0:y0 + crop_h, x0:x0 + crop_w]
    depth_m = depth_m[y0:y0 + crop_h, x0:x0 + crop_w]

    image = photometric.albumentations_photometric(image, random_ops.sub_seed(seed, "photometric"), cfg.photometric)
    return {
        "image": tf.ensure_shape(image_ops.to_signed_unit(image), [crop_h, crop_w, 3]),
        "depth": tf.ensure_shape(depth_m, [crop_h, crop_w]),
    }


@_graph_function
def depth_eval(image, depth_m, cfg: DepthAugConfig = DepthAugConfig()) -> dict:
    """NYUv2 evaluation sample: the full image, normalised; depth unchanged (metres).
    `cfg` is accepted for a uniform signature; evaluation has no parameters."""
    del cfg
    image, depth_m = _depth_inputs(image, depth_m, "depth_eval")
    return {"image": image_ops.to_signed_unit(image), "depth": depth_m}


# --------------------------------------------------------------------------------------------------
# Referring segmentation (RefCOCO/+/g, LAVT-style)
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReferConfig:
    """VPD's referring input (docs/reference.md, "Referring data"): square resize that does not keep the aspect
    ratio; no augmentation."""
    size: int = 512

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"ReferConfig.size must be > 0, got {self.size}")


def _binary_mask(mask, what) -> tf.Tensor:
    mask = tf.cast(_map_2d(mask, "mask"), tf.int32)
    check = tf.debugging.assert_equal(tf.reduce_all((mask == 0) | (mask == 1)), True,
                                      message=f"{what}: mask values must be 0 or 1")
    with tf.control_dependencies([check]):
        return tf.identity(mask)


@_graph_function
def refer(image, mask, cfg: ReferConfig = ReferConfig()) -> dict:
    """torchvision Resize((size, size)) on PIL images: bilinear with antialiasing for the image
    (PIL BILINEAR), nearest for the 'P'-mode mask (PIL NEAREST), then [-1, 1].
    image: uint8 (H, W, 3); mask: (H, W) in {0, 1}.
    Returns {"image": float32 (size, size, 3), "mask": int32 (size, size)}."""
    image = _image_u8(image)
    mask = _binary_mask(mask, "refer")
    size = (cfg.size, cfg.size)
    with tf.control_dependencies([_assert_same_hw(image, mask, "refer")]):
        image = image_ops.resize_bilinear_antialias_uint8(image, size)
    return {
        "image": tf.ensure_shape(image_ops.to_signed_unit(image), [cfg.size, cfg.size, 3]),
        "mask": tf.ensure_shape(image_ops.resize_nearest(mask, size, "pil"), [cfg.size, cfg.size]),
    }


# --------------------------------------------------------------------------------------------------
# PhraseCut (LD-ZNet, CLIPSeg dataset code)
# --------------------------------------------------------------------------------------------------

PHRASECUT_TEMPLATES = (
    "a photo of a {}.", "a photograph of a {}.", "an image of a {}.", "{}.", "a cropped photo of a {}.",
    "a good photo of a {}.", "a photo of one {}.", "a bad photo of a {}.", "a photo of the {}.",
)


@dataclasses.dataclass(frozen=True)
class PhraseCutConfig:
    """LD-ZNet's PhraseCut inputs (docs/reference.md): "PhraseCut training data" (train crop + resize), "PhraseCut
    test protocol" (eval squash), "Prompt templates".

    crop_tries / crop_min_frac: the square crop of side min(H, W) is redrawn up to crop_tries times;
      the first with more than crop_min_frac * H * W foreground pixels (full-image area) wins, else
      the first crop with the most foreground.
    fixed_template: if set (a string with one "{}"), phrasecut_prompt always uses it (deterministic eval).
    """
    size: int = 384
    crop_tries: int = 50
    crop_min_frac: float = 0.05
    templates: tuple[str, ...] = PHRASECUT_TEMPLATES
    fixed_template: Optional[str] = None

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"PhraseCutConfig.size must be > 0, got {self.size}")
        if self.crop_tries < 1:
            raise ValueError(f"PhraseCutConfig.crop_tries must be >= 1, got {self.crop_tries}")
        if not 0.0 <= self.crop_min_frac <= 1.0:
            raise ValueError(f"PhraseCutConfig.crop_min_frac must be in [0, 1], got {self.crop_min_frac}")
        if not self.templates:
            raise ValueError("PhraseCutConfig.templates must not be empty")
        for template in self.templates + ((self.fixed_template,) if self.fixed_template is not None else ()):
            if template.count("{}") != 1:
                raise ValueError(f"PhraseCut template must contain exactly one '{{}}', got {template!r}")


def _phrasecut_inputs(image, mask, what):
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8 or image.shape.rank != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: image must be uint8 (H, W, 1 or 3), got {image.dtype.name} {image.shape}")
    if image.shape[-1] == 1:  # grayscale is replicated to 3 channels (np.dstack([img] * 3))
        image = tf.tile(image, [1, 1, 3])
    mask = _binary_mask(mask, what)
    with tf.control_dependencies([_assert_same_hw(image, mask, what)]):
        return tf.identity(image), mask


def _first_index(condition: tf.Tensor) -> tf.Tensor:
    """Index of the first True of a 1-D bool tensor (its length if none)."""
    positions = tf.range(tf.size(condition))
    return tf.reduce_min(tf.where(condition, positions, tf.size(condition)))


def _phrasecut_crop_offset(mask, seed, cfg: PhraseCutConfig):
    """CLIPSeg find_crop for a square of side s = min(H, W): crop_tries offsets; foreground sums
    from a summed-area table; first crop with sum > min_frac * H * W, else the first with the
    largest sum. Returns (y0, x0, side)."""
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    side = tf.minimum(h, w)
    ys = random_ops.randint(random_ops.sub_seed(seed, "crop_y"), 0, h - side + 1, [cfg.crop_tries])
    xs = random_ops.randint(random_ops.sub_seed(seed, "crop_x"), 0, w - side + 1, [cfg.crop_tries])
    table = tf.pad(tf.cumsum(tf.cumsum(mask, axis=0), axis=1), [[1, 0], [1, 0]])

    def at(y, x):
        return tf.gather_nd(table, tf.stack([y, x], axis=1))

    sums = at(ys + side, xs + side) - at(ys, xs + side) - at(ys + side, xs) + at(ys, xs)
    min_sum = tf.cast(h * w, tf.float64) * cfg.crop_min_frac
    good = tf.cast(sums, tf.float64) > min_sum
    best = tf.equal(sums, tf.reduce_max(sums))
    i = tf.cond(tf.reduce_any(good), lambda: _first_index(good), lambda: _first_index(best))
    return ys[i], xs[i], side


def _phrasecut_resize(image, mask, cfg: PhraseCutConfig) -> dict:
    """F.interpolate bilinear align_corners=True (no antialias) for the image, legacy nearest for
    the mask, then img / 255 * 2 - 1."""
    size = (cfg.size, cfg.size)
    image = image_ops.resize_bilinear_align_corners(tf.cast(image, tf.float32), size)
    mask = image_ops.resize_nearest(mask, size, "torch")
    return {
        "image": tf.ensure_shape(image_ops.to_signed_unit(image), [cfg.size, cfg.size, 3]),
        "mask": tf.ensure_shape(tf.cast(mask, tf.float32)[:, :, tf.newaxis], [cfg.size, cfg.size, 1]),
    }


@_graph_function
def phrasecut_train(image, mask, seed, cfg: PhraseCutConfig = PhraseCutConfig()) -> dict:
    """PhraseCut training sample: square crop by the foreground rule, then the 384 resize.
    image: uint8 (H, W, 3) or (H, W, 1); mask: (H, W) union mask in {0, 1}.
    Returns {"image": float32 (size, size, 3) in [-1, 1], "mask": float32 (size, size, 1) in {0, 1}}.
    (The reference also crops its validation split this way; `phrasecut_eval` is the test protocol.)"""
    image, mask = _phrasecut_inputs(image, mask, "phrasecut_train")
    y0, x0, side = _phrasecut_crop_offset(mask, random_ops.check_seed(seed), cfg)
    return _phrasecut_resize(image[y0:y0 + side, x0:x0 + side], mask[y0:y0 + side, x0:x0 + side], cfg)


@_graph_function
def phrasecut_eval(image, mask, cfg: PhraseCutConfig = PhraseCutConfig()) -> dict:
    """PhraseCut test sample (CLIPSeg scorer, aug_crop=False): the whole image squashed to
    (size, size), aspect not kept. Same outputs as `phrasecut_train`."""
    image, mask = _phrasecut_inputs(image, mask, "phrasecut_eval")
    return _phrasecut_resize(image, mask, cfg)


@_graph_function
def phrasecut_prompt(phrase, seed, cfg: PhraseCutConfig = PhraseCutConfig()) -> tf.Tensor:
    """The phrase inside one of cfg.templates drawn uniformly (LD-ZNet `sample_prompts`), or inside
    cfg.fixed_template when set. phrase: tf.string scalar (a vector gets the same template).
    The phrase is inserted literally (no format-string interpretation of its braces)."""
    templates = (cfg.fixed_template,) if cfg.fixed_template is not None else cfg.templates
    prefixes, suffixes = zip(*(t.split("{}") for t in templates))
    if len(templates) == 1:
        i = 0
    else:
        i = random_ops.randint(random_ops.sub_seed(seed, "template"), 0, len(templates))
    return tf.strings.join([tf.gather(prefixes, i), phrase, tf.gather(suffixes, i)])
