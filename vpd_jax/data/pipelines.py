"""tf.data input pipelines for the four tasks over every supported source (see `sources.py`).

Both entry points take the data section of a config (`config.data`, built by `vpd_jax.data.config.data_config`)
and return a batched `tf.data.Dataset` of dicts with fixed shapes (NHWC); wrap it in
`vpd_jax.data.iterator.DataIterator` for numpy batches, host-side tokenisation and iterator checkpoints.

Train: per-host subsplit (`tfds.split_for_jax_process`) -> the host's elements (refs/phrases flattened) in
  `data.sample_order` (sample_order.py: 'permutation', a fresh permutation of all of them every epoch as the
  references' DistributedSampler; or 'shuffle_buffer') with their positions in the stream -> parallel
  map(decode + augmentation with a per-element stateless seed fold_in((seed, process_index), position)) ->
  batch(drop_remainder) -> prefetch. A batch is a function of (seed, process, position in the stream) only, so
  the same seed gives identical batches and a restored iterator continues the exact stream.

Eval: every example of the host's subsplit exactly once, in order, followed by padding elements with
  `valid = False`, cut to the same number of batches on every host (the largest host's count; all hosts
  compute every host's count, so no communication is needed).

Batch keys (B = batch_size_per_host or eval_batch_size_per_host; `text` becomes `tokens` int32 (B, L) in
DataIterator; eval batches also carry `valid` bool (B,)):
  seg        train image f32 (B, c, c, 3) in [-1, 1], label i32 (B, c, c) reduced labels, 255 = ignore
             eval  image f32 (B, Hp, Wp, 3), image_hw i32 (B, 2), label i32 (B, Lh, Lw) at the ORIGINAL size,
                   label_hw i32 (B, 2), id (file name)
  depth      train image (B, h, w, 3), depth f32 (B, h, w) metres (0 = no measurement), scene_class i32 (B,)
             eval  the same at full size, plus id
  refer      train image (B, S, S, 3), mask i32 (B, S, S) in {0, 1}, text (one of the ref's sentences), ref_id
             eval  the same per (ref, sentence), plus sentence_id, image_id
  phrasecut  train image (B, S, S, 3), mask f32 (B, S, S, 1), text (phrase in a random template)
             eval  the same (whole image squashed, template seeded by the example id), plus id, image_id

Segmentation eval shapes: images differ in size (keep-ratio resize to short side 512, long side <= 2048),
  and the label stays at the original size. Each image is padded bottom/right to the next multiple of
  `seg_eval_pad_multiple` (default 256; value 0) and each label likewise (value 255 = ignore); a batch is
  padded to its largest member. A jitted evaluator therefore compiles one program per padded shape, each
  side one of 512, 768, ..., 2048 on ADE20K, and in practice a handful. `image_hw` / `label_hw` give the
  valid sizes. To score at the original size, resize the valid logits to `label_hw` inside the static
  padded label shape (e.g. `jax.image.scale_and_translate`, whose scale may be traced); the 255 padding
  drops out of the metric.
"""
from __future__ import annotations

import math
from typing import Optional

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vpd_jax.data import prepare as preparation
from vpd_jax.data import refer_text, sample_order, sources, transforms
from vpd_jax.data.config import transform_config
from vpd_jax.data.iterator import DataIterator, TokenizeFn



def hide_accelerators_from_tf() -> None:
    """TF must never take GPU/TPU memory from JAX."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # already initialised, or no such device type: check instead
            if tf.config.get_visible_devices(kind):
                raise RuntimeError(f"TensorFlow was initialised with visible {kind}s before the input pipeline")


hide_accelerators_from_tf()


def load_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `data.name` (vpd_jax.data.prepare.load_builder)."""
    return preparation.load_builder(data.name, data.data_dir, data.on_bad_input)


def prepare(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Builds the dataset's TFRecords from `data.manual_dir` (a no-op when they exist; vpd_jax.data.prepare)."""
    return preparation.prepare_dataset(data.name, data.manual_dir, data.data_dir, data.on_bad_input)


def make_train_dataset(data: ml_collections.ConfigDict, *, builder: Optional[tfds.core.DatasetBuilder] = None,
                       process_index: Optional[int] = None, process_count: Optional[int] = None) -> tf.data.Dataset:
    """Infinite stream of per-host training batches (see the module docstring for the stages and keys)."""
    hide_accelerators_from_tf()
    builder = builder or load_builder(data)
    index, count = _process(process_index, process_count)
    source = _source(data, train=True)
    ds = sample_order.training_stream(data, builder, source, index, count, _options())
    train_fn = _train_fn(data.task, transform_config(data))
    base_seed = tf.constant([data.seed, index], tf.int64)

    def per_element(position, element):
        seed = tf.random.experimental.stateless_fold_in(base_seed, position)
        return train_fn(source.decode(element), seed)

    ds = ds.map(_graph_fn(per_element), num_parallel_calls=_parallel_calls(data))
    return ds.batch(data.batch_size_per_host, drop_remainder=True).prefetch(data.prefetch)


def make_eval_dataset(data: ml_collections.ConfigDict, *, builder: Optional[tfds.core.DatasetBuilder] = None,
                      process_index: Optional[int] = None, process_count: Optional[int] = None) -> tf.data.Dataset:
    """Finite per-host eval batches: every example once, then `valid = False` padding; same length on all hosts."""
    hide_accelerators_from_tf()
    builder = builder or load_builder(data)
    index, count = _process(process_index, process_count)
    source = _source(data, train=False)
    host_splits = [tfds.split_for_jax_process(data.eval_split, process_index=i, process_count=count)
                   for i in range(count)]
    batch_size = data.eval_batch_size_per_host
    num_batches = math.ceil(max(_host_counts(builder, source, data.eval_split, host_splits)) / batch_size)

    def read(split):
        return sources.elements(source, builder.as_dataset(split=split, shuffle_files=False,
                                                           decoders=source.decoders,
                                                           read_config=tfds.ReadConfig(options=_options())))

    # Padding elements are the split's first element, transformed like any other (so fixed shapes stay fixed)
    # and then zeroed with valid = False.
    real = read(host_splits[index]).map(lambda el: (el, True))
    padding = read(data.eval_split).take(1).map(lambda el: (el, False)).repeat()
    eval_fn = _eval_fn(data, transform_config(data))
    ds = real.concatenate(padding).map(
        _graph_fn(lambda el, valid: _with_validity(eval_fn(source.decode(el)), valid, data.task)),
        num_parallel_calls=_parallel_calls(data))
    if data.task == "seg":
        ds = ds.padded_batch(batch_size, padding_values=_seg_padding_values(ds.element_spec))
    else:
        ds = ds.batch(batch_size)
    return ds.take(num_batches).prefetch(data.prefetch)


def _process(index: Optional[int], count: Optional[int]) -> tuple[int, int]:
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, process_count={count})")
    return index, count


def _graph_fn(fn):
    """Traces `fn` without autograph: the transforms are written with explicit tf.cond / tf.while_loop, and
    autograph's source conversion of them would take seconds per pipeline."""
    return tf.autograph.experimental.do_not_convert(fn)


def _source(data: ml_collections.ConfigDict, train: bool) -> sources.Source:
    text = refer_text.text_fn(data.refer_text, data.name, data.refer_sentences) if data.task == "refer" else None
    return sources.get_source(data.task, data.name, train=train, scene_class_fallback=data.scene_class_fallback,
                              text=text)


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _parallel_calls(data) -> int:
    return tf.data.AUTOTUNE if data.num_parallel_calls == -1 else data.num_parallel_calls


def _host_counts(builder, source: sources.Source, split: str, host_splits: list) -> list[int]:
    """Elements (after flattening) in each host's subsplit: from the metadata, or from one read of `split`
    (without decoding) cut at the subsplits' example boundaries, which are contiguous and in file order."""
    sizes = [builder.info.splits[s].num_examples for s in host_splits]
    if not source.flattens:
        return sizes
    in_file_order = tfds.ReadConfig(interleave_cycle_length=1)  # the default interleaves the shards
    per_example = builder.as_dataset(split=split, shuffle_files=False, decoders=source.decoders,
                                     read_config=in_file_order).map(
        _graph_fn(lambda ex: sources.num_elements(source.select(ex))))
    counts = np.fromiter(per_example.as_numpy_iterator(), dtype=np.int64)
    if len(counts) != sum(sizes):
        raise RuntimeError(f"{split}: {len(counts)} examples read but the host subsplits hold {sum(sizes)}")
    bounds = np.cumsum([0, *sizes])
    return [int(counts[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]


def _sub_seed(seed: tf.Tensor, stream: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, stream)


def _train_fn(task: str, cfg):
    if task == "seg":
        return lambda el, seed: transforms.seg_train(el["image"], el["label"], seed, cfg)
    if task == "depth":
        return lambda el, seed: {**transforms.depth_train(el["image"], el["depth"], seed, cfg),
                                 "scene_class": el["scene_class"]}
    if task == "refer":
        def refer_train(el, seed):
            # One of the ref's sentences, drawn anew each time the ref comes round, as VPD does (docs/reference.md,
            # "Referring data").
            pick = tf.random.stateless_uniform([], _sub_seed(seed, 1), 0, tf.size(el["sentences"]), tf.int32)
            return {**transforms.refer(el["image"], el["mask"], cfg), "text": el["sentences"][pick],
                    "ref_id": el["ref_id"]}
        return refer_train

    def phrasecut_train(el, seed):
        return {**transforms.phrasecut_train(el["image"], el["mask"], _sub_seed(seed, 0), cfg),
                "text": transforms.phrasecut_prompt(el["phrase"], _sub_seed(seed, 1), cfg)}
    return phrasecut_train


def _eval_fn(data, cfg):
    if data.task == "seg":
        multiple = data.seg_eval_pad_multiple

        def seg(el):
            out = transforms.seg_eval(el["image"], el["label"], cfg)
            return {"image": _pad_to_multiple(out["image"], multiple, 0.0), "image_hw": tf.shape(out["image"])[:2],
                    "label": _pad_to_multiple(out["label"], multiple, 255), "label_hw": tf.shape(out["label"])[:2],
                    "id": el["id"]}
        return seg
    if data.task == "depth":
        return lambda el: {**transforms.depth_eval(el["image"], el["depth"], cfg), "scene_class": el["scene_class"],
                           "id": el["id"]}
    if data.task == "refer":
        return lambda el: {**transforms.refer(el["image"], el["mask"], cfg), "text": el["text"],
                           "ref_id": el["ref_id"], "sentence_id": el["sentence_id"], "image_id": el["image_id"]}

    def phrasecut(el):
        # The prompt template depends on the example only (not on the host layout): seeded by its id.
        seed = tf.stack([tf.constant(data.seed, tf.int64), tf.strings.to_hash_bucket_fast(el["id"], 2**62)])
        return {**transforms.phrasecut_eval(el["image"], el["mask"], cfg),
                "text": transforms.phrasecut_prompt(el["phrase"], seed, cfg), "id": el["id"],
                "image_id": el["image_id"]}
    return phrasecut


def _pad_to_multiple(x: tf.Tensor, multiple: int, value) -> tf.Tensor:
    """Pads the first two dims of `x` bottom/right up to multiples of `multiple`."""
    hw = tf.shape(x)[:2]
    padded = (hw + multiple - 1) // multiple * multiple
    paddings = tf.concat([tf.stack([tf.zeros_like(hw), padded - hw], axis=1),
                          tf.zeros([tf.rank(x) - 2, 2], tf.int32)], axis=0)
    padded_x = tf.pad(x, paddings, constant_values=tf.cast(value, x.dtype))
    return tf.ensure_shape(padded_x, [None, None, *x.shape[2:]])


def _with_validity(element: dict, valid: tf.Tensor, task: str) -> dict:
    """Adds `valid`; a padding element (valid False) is zeroed (empty strings), its segmentation label 255."""
    def keep_or_zero(key, x):
        return tf.where(valid, x, tf.fill(tf.shape(x), tf.constant(255, x.dtype)) if (task, key) == ("seg", "label")
                        else tf.zeros_like(x))
    return {**{key: keep_or_zero(key, x) for key, x in element.items()}, "valid": valid}


def _seg_padding_values(spec) -> dict:
    values = tf.nest.map_structure(
        lambda s: tf.constant("", tf.string) if s.dtype == tf.string else tf.zeros([], s.dtype), spec)
    values["label"] = tf.constant(255, spec["label"].dtype)
    return values


def make_train_iterator(data: ml_collections.ConfigDict, tokenizer: Optional[TokenizeFn] = None,
                        **kwargs) -> DataIterator:
    """`DataIterator` over `make_train_dataset(data, **kwargs)`, tokenising to `data.text_max_length`."""
    return DataIterator(make_train_dataset(data, **kwargs), tokenizer, data.text_max_length)


def make_eval_iterator(data: ml_collections.ConfigDict, tokenizer: Optional[TokenizeFn] = None,
                       **kwargs) -> DataIterator:
    return DataIterator(make_eval_dataset(data, **kwargs), tokenizer, data.text_max_length)
