"""Per (task, dataset family) adapters from TFDS examples to one canonical element per task.

Images and masks are read with `SkipDecoding` and stay encoded until `decode`, which runs inside the parallel map
(smaller shuffle buffers, iterator checkpoints and in-memory examples). A source may `flatten` one TFDS example
into several elements (RefCOCO: one per ref for training, one per (ref, sentence) for evaluation; PhraseCut and
vpd_shapes: one per phrase): its `select` then returns the example's elements stacked on a leading axis, every
field, the (encoded) image and `image_id` included, so `element(items, j)` is the j-th of them.

Canonical decoded elements (before the task transform):
  seg        image uint8 (H, W, 3), label uint8 (H, W) raw, id string
  depth      image uint8 (H, W, 3), depth float32 (H, W) metres, scene_class int32, id string
  refer      image, mask int32 (H, W) {0,1}, ref_id int64, image_id int64, and
               train: sentences string (n,)      eval: text string, sentence_id int64
             (sentences as `data.refer_text` says, vpd_jax/data/refer_text.py)
  phrasecut  image, mask int32 (H, W) {0,1}, phrase string, id string, image_id int64
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import tensorflow as tf
import tensorflow_datasets as tfds

from vpd_jax.data import refer_text
from vpd_jax.data.config import family

_SKIP = tfds.decode.SkipDecoding()


@dataclasses.dataclass(frozen=True)
class Source:
    decoders: dict
    select: Callable[[dict], dict]  # TFDS example -> encoded element; when `flattens`, its elements stacked
    decode: Callable[[dict], dict]  # encoded element -> canonical decoded element
    flattens: bool = False


def get_source(task: str, name: str, *, train: bool, scene_class_fallback: Optional[int] = None,
               text: Optional[refer_text.TextFn] = None) -> Source:
    """The source of (pipeline `task`, TFDS dataset `name`); `text` maps referring sentences (refer_text.text_fn;
    default: unchanged)."""
    text = text or (lambda ids, raw: raw)
    key = (task, family(name))
    if key == ("depth", "nyu_depth_v2"):
        return _tfds_nyu_depth(scene_class_fallback)
    factories = {
        ("seg", "ade20k"): _seg, ("seg", "vpd_shapes"): _seg,
        ("depth", "nyu_depth_v2_bts"): _depth_mm, ("depth", "vpd_shapes"): _depth_metres,
        ("refer", "ref_coco"): lambda: _refer(train, text), ("refer", "vpd_shapes"): lambda: _refer(train, text),
        ("phrasecut", "phrasecut"): _phrasecut, ("phrasecut", "vpd_shapes"): _shapes_phrases,
    }
    if key not in factories:
        supported = sorted(f"{t}:{f}" for t, f in factories) + ["depth:nyu_depth_v2"]
        raise ValueError(f"no {task!r} pipeline for dataset {name!r}; supported task:family pairs: {supported}")
    return factories[key]()


def elements(source: Source, examples: tf.data.Dataset) -> tf.data.Dataset:
    """The encoded elements of a dataset of TFDS examples, in order."""
    select = tf.autograph.experimental.do_not_convert(source.select)
    if source.flattens:
        return examples.flat_map(lambda ex: tf.data.Dataset.from_tensor_slices(select(ex)))
    return examples.map(select)


def element(items: dict, j: tf.Tensor) -> dict:
    """The j-th of a flattening source's stacked elements (`select`'s output)."""
    return {key: value[j] for key, value in items.items()}


def num_elements(items: dict) -> tf.Tensor:
    """How many elements a flattening source's `select` output stacks."""
    return tf.shape(items["image_id"], out_type=tf.int64)[0]


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode_binary_mask(encoded: tf.Tensor) -> tf.Tensor:
    """Any non-zero pixel of a PNG (ref_coco: 3-channel {0,255}; ours: 1-channel {0,1}) is foreground."""
    return tf.cast(tf.io.decode_png(encoded, channels=1)[..., 0] > 0, tf.int32)


def _seg() -> Source:
    return Source(
        decoders={"image": _SKIP, "label": _SKIP},
        select=lambda ex: {"image": ex["image"], "label": ex["label"], "id": ex["file_name"]},
        decode=lambda el: {"image": decode_image(el["image"]), "label": tf.io.decode_png(el["label"], channels=1)[..., 0],
                           "id": el["id"]},
    )


def _depth_select(ex):
    return {"image": ex["image"], "depth": ex["depth"], "scene_class": ex["scene_class"], "id": ex["file_name"]}


def _depth_element(el, depth_m):
    return {"image": decode_image(el["image"]), "depth": depth_m, "scene_class": tf.cast(el["scene_class"], tf.int32),
            "id": el["id"]}


def _depth_mm() -> Source:
    """nyu_depth_v2_bts: uint16 millimetre PNGs (0 = no measurement)."""
    return Source(
        decoders={"image": _SKIP, "depth": _SKIP},
        select=_depth_select,
        decode=lambda el: _depth_element(
            el, tf.cast(tf.io.decode_png(el["depth"], channels=1, dtype=tf.uint16)[..., 0], tf.float32) / 1000.0),
    )


def _depth_metres() -> Source:
    return Source(decoders={"image": _SKIP}, select=_depth_select,
                  decode=lambda el: _depth_element(el, tf.cast(el["depth"], tf.float32)))


def _tfds_nyu_depth(scene_class_fallback: Optional[int]) -> Source:
    """TFDS nyu_depth_v2: float16 metres and no file names, so no scene class; one must be configured."""
    if scene_class_fallback is None:
        raise ValueError(
            "TFDS nyu_depth_v2 has no scene names, so VPD's scene class cannot be derived; set "
            "data.scene_class_fallback to the class id every image should use, or use nyu_depth_v2_bts"
        )
    fallback = int(scene_class_fallback)

    def select(ex):
        return {"image": ex["image"], "depth": ex["depth"], "scene_class": tf.constant(fallback, tf.int64),
                "id": tf.constant("", tf.string)}

    return Source(decoders={"image": _SKIP}, select=select,
                  decode=lambda el: _depth_element(el, tf.cast(el["depth"], tf.float32)))


def _with_image(elements: dict, image: tf.Tensor, image_id: tf.Tensor) -> dict:
    """`elements` (stacked) with the example's encoded image and id repeated for each."""
    n = tf.shape(elements["mask"])[:1]
    return {**elements, "image": tf.fill(n, image), "image_id": tf.fill(n, image_id)}


def _refer(train: bool, text: refer_text.TextFn) -> Source:
    """ref_coco and vpd_shapes `objects`: training yields one element per ref, evaluation one per sentence."""

    def select(ex):
        objects, refexp = ex["objects"], ex["objects"]["refexp"]
        sentences = refexp["raw"].with_flat_values(text(refexp["refexp_id"].flat_values, refexp["raw"].flat_values))
        if train:
            elements = {"mask": objects["mask"], "sentences": sentences, "ref_id": objects["id"]}
        else:
            rows = sentences.value_rowids()
            elements = {"mask": tf.gather(objects["mask"], rows), "ref_id": tf.gather(objects["id"], rows),
                        "text": sentences.flat_values, "sentence_id": refexp["refexp_id"].flat_values}
        return _with_image(elements, ex["image"], ex["image/id"])

    def decode(el):
        out = dict(el, image=decode_image(el["image"]), mask=decode_binary_mask(el["mask"]))
        if train:
            tf.debugging.assert_positive(tf.size(el["sentences"]), message="a ref has no sentences")
        return out

    return Source(decoders={"image": _SKIP, "objects": {"mask": _SKIP}}, select=select, decode=decode,
                  flattens=True)


def _phrasecut_decode(el):
    return dict(el, image=decode_image(el["image"]), mask=decode_binary_mask(el["mask"]))


def _phrasecut() -> Source:
    """PhraseCut (one TFDS example per image, builders/phrasecut.py): one element per phrase, id = its task id."""
    def select(ex):
        phrases = ex["phrases"]
        elements = {"mask": phrases["mask"], "phrase": phrases["phrase"], "id": phrases["task_id"]}
        return _with_image(elements, ex["image"], ex["image_id"])

    return Source(decoders={"image": _SKIP, "phrases": {"mask": _SKIP}}, select=select, decode=_phrasecut_decode,
                  flattens=True)


def _shapes_phrases() -> Source:
    def select(ex):
        phrases = ex["phrases"]
        ids = tf.strings.join([ex["file_name"], tf.strings.as_string(tf.range(tf.size(phrases["raw"])))], ":")
        return _with_image({"mask": phrases["mask"], "phrase": phrases["raw"], "id": ids}, ex["image"],
                           ex["image/id"])

    return Source(decoders={"image": _SKIP, "phrases": {"mask": _SKIP}}, select=select, decode=_phrasecut_decode,
                  flattens=True)
