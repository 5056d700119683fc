"""The order in which a host's training elements are visited (`data.sample_order`).

Both orders yield an infinite stream of (position, encoded element): position 0, 1, 2, ... counts the host's
elements from the start of training, and seeds the element's augmentation (pipelines.py), so the stream is a
function of (data.seed, process index) only and a restored tf.data iterator continues it exactly.

'permutation'     the references' order (PyTorch DistributedSampler): every epoch visits each element of the host's
                  subsplit exactly once, in a fresh uniformly random order. The host's TFDS examples are read once,
                  in file order, and held in memory still encoded (one batch of them all); element k of epoch e is
                  `index_shuffle(k, seed(data.seed, host, e))`, a stateless bijection of [0, n), so nothing but the
                  position is stored in an iterator checkpoint. Needs the host's encoded examples to fit in memory
                  (about the dataset's size on disk divided by the number of hosts).
'shuffle_buffer'  files shuffled, examples flattened to elements, then a `data.shuffle_buffer`-element shuffle
                  buffer: a local shuffle (elements of one example, e.g. the refs of one image, stay close) that
                  reads the files as a stream; the buffer is part of iterator checkpoints.
"""
from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vpd_jax.data import sources

SAMPLE_ORDERS = ("permutation", "shuffle_buffer")

# Folded into the (seed, host) key before the epoch, so that the permutations' keys are derived apart from the
# per-element augmentation seeds, which fold the position straight into the (seed, host) key.
_PERMUTATION_STREAM = 0x7065726D  # "perm"


def training_stream(data: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, source: sources.Source,
                    index: int, count: int, read_options: tf.data.Options) -> tf.data.Dataset:
    """(position int64, encoded element) for ever, in `data.sample_order` (module docstring)."""
    split = tfds.split_for_jax_process(data.split, process_index=index, process_count=count)
    if data.sample_order == "permutation":
        return _permutation(builder, split, source, tf.constant([data.seed, index], tf.int64), read_options)
    if data.sample_order == "shuffle_buffer":
        ds = builder.as_dataset(split=split, shuffle_files=True, decoders=source.decoders,
                                read_config=tfds.ReadConfig(shuffle_seed=data.seed, options=read_options))
        ds = sources.elements(source, ds).shuffle(data.shuffle_buffer, seed=data.seed + index,
                                                  reshuffle_each_iteration=True)
        return ds.repeat().enumerate()
    raise ValueError(f"data.sample_order must be one of {SAMPLE_ORDERS}, got {data.sample_order!r}")


def _permutation(builder, split, source: sources.Source, key: tf.Tensor, read_options) -> tf.data.Dataset:
    num_examples = builder.info.splits[split].num_examples
    if num_examples == 0:
        raise ValueError(f"{builder.name}: training split {split} holds no examples for this host")
    in_file_order = tfds.ReadConfig(interleave_cycle_length=1, options=read_options)
    examples = builder.as_dataset(split=split, shuffle_files=False, decoders=source.decoders,
                                  read_config=in_file_order)
    # Every example of the host, encoded, as one batch. `fetch` captures it: it is held once in memory and is not
    # part of the iterator checkpoint, which stores only the position.
    table = examples.ragged_batch(num_examples).get_single_element()
    example_of, item_of = _element_index(table, source, num_examples)
    size = len(example_of)
    if size == 0:
        raise ValueError(f"{builder.name}: the examples of training split {split} hold no elements for this host")
    example_of, item_of = tf.constant(example_of), tf.constant(item_of)
    key = tf.random.experimental.stateless_fold_in(key, _PERMUTATION_STREAM)

    def fetch(position):
        epoch, k = position // size, position % size
        i = tf.random.experimental.index_shuffle(k, tf.random.experimental.stateless_fold_in(key, epoch), size - 1)
        example = tf.nest.map_structure(lambda t: t[example_of[i]], table)
        selected = source.select(example)
        return position, sources.element(selected, item_of[i]) if source.flattens else selected

    return tf.data.Dataset.range(np.iinfo(np.int64).max).map(tf.autograph.experimental.do_not_convert(fetch))


def _element_index(table: dict, source: sources.Source, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """For every element of the host, in order: (its example's row in `table`, its index within the example)."""
    if not source.flattens:
        return np.arange(num_examples, dtype=np.int64), np.zeros(num_examples, np.int64)

    def count(e):
        return sources.num_elements(source.select(tf.nest.map_structure(lambda t: t[e], table)))

    counts = np.fromiter(tf.data.Dataset.range(num_examples).map(tf.autograph.experimental.do_not_convert(count))
                         .as_numpy_iterator(), dtype=np.int64, count=num_examples)
    example_of = np.repeat(np.arange(num_examples, dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return example_of, np.arange(len(example_of), dtype=np.int64) - starts
