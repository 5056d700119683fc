"""The referring sentences VPD feeds to CLIP: REFER's `sent`, from TFDS ref_coco's `refexp/raw`.

VPD's RefCOCO loader (`refer/data/dataset_refer_clip.py`) tokenises each sentence's `sent` field of the REFER refs
(lichengunc/refer, `refs(<split_by>).p`), not its `raw` field. `sent` is `' '.join(tokens)`: the words of `raw`
lower-cased, punctuation removed ("The nurse in the picture." -> "the nurse in the picture", "THE LADY WITH THE
BLUE SHIRT" -> "the lady with the blue shirt"). TFDS `ref_coco` keeps only `raw`, so punctuation would reach CLIP
as extra tokens, shift the L-token context and the attention maps' channels, and truncate more sentences.

Two ways to get `sent` back (`data.refer_text`):
  'sent'  with `data.refer_sentences` (the refcoco.json TFDS built ref_coco from, which holds REFER's refs with
          every sentence's `sent`): REFER's text itself, looked up by sentence id. This is exact.
          Without that file: `normalize(raw)`, the rule above, which gives `sent` wherever REFER only
          normalised. REFER's cleaned data also carries per-sentence corrections that no rule on `raw` recovers
          (ref 0 of RefCOCO: raw "lady w back to us", sent "lady with back to us").
  'raw'   TFDS' `raw`, unchanged.

`normalize`: lower-case; apostrophes (' and U+2019) are deleted, so a possessive or contraction stays one word;
every other character that is not a letter, digit or underscore separates words; words are joined by single
spaces.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

REFER_TEXT = ("sent", "raw")

# TFDS ref_coco config -> REFER (dataset, splitBy), as `dataset` / `dataset_partition` in TFDS' refcoco.json.
_REFER_DATASETS = {
    "refcoco_unc": ("refcoco", "unc"), "refcoco_google": ("refcoco", "google"),
    "refcocoplus_unc": ("refcoco+", "unc"), "refcocog_google": ("refcocog", "google"),
    "refcocog_umd": ("refcocog", "umd"),
}

TextFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (sentence ids int64, raw strings) -> text, same shape


def normalize(raw: tf.Tensor) -> tf.Tensor:
    """REFER's `sent` rule (module docstring) on every string of `raw`."""
    text = tf.strings.lower(raw, encoding="utf-8")
    text = tf.strings.regex_replace(text, "['\u2019]", "")
    text = tf.strings.regex_replace(text, r"[^\p{L}\p{N}_]+", " ")
    return tf.strings.strip(text)


def load_refer_sentences(path: str, tfds_name: str) -> dict[int, str]:
    """{sentence id: REFER `sent`} of one REFER dataset/split_by from TFDS' refcoco.json (`{'ref': [...]}` with
    each ref's `dataset`, `dataset_partition` and `sentences`)."""
    config = tfds_name.split("/")[-1].split(":")[0]
    if config not in _REFER_DATASETS:
        raise ValueError(f"data.refer_sentences: {tfds_name!r} is not a TFDS ref_coco config; known: "
                         f"{sorted(_REFER_DATASETS)}")
    dataset, split_by = _REFER_DATASETS[config]
    with open(path) as f:
        refs = json.load(f).get("ref")
    if not isinstance(refs, list):
        raise ValueError(f"{path}: no 'ref' list; data.refer_sentences must be the refcoco.json that TFDS' "
                         "ref_coco is built from (its manual_download_process.py writes it)")
    sentences = {}
    for ref in refs:
        if ref.get("dataset") == dataset and ref.get("dataset_partition") == split_by:
            for sentence in ref["sentences"]:
                sentences[int(sentence["sent_id"])] = sentence["sent"]
    if not sentences:
        raise ValueError(f"{path}: no refs of dataset {dataset!r} split by {split_by!r} (for {tfds_name})")
    return sentences


def text_fn(refer_text: str, tfds_name: str, sentences_file: Optional[str] = None) -> TextFn:
    """The (sentence ids, raw) -> text function of `data.refer_text` / `data.refer_sentences` (module docstring)."""
    if refer_text not in REFER_TEXT:
        raise ValueError(f"data.refer_text must be one of {REFER_TEXT}, got {refer_text!r}")
    if refer_text == "raw":
        return lambda ids, raw: raw
    if not sentences_file:
        return lambda ids, raw: normalize(raw)
    return _lookup(load_refer_sentences(sentences_file, tfds_name), os.fspath(sentences_file))


def _lookup(sentences: dict[int, str], path: str) -> TextFn:
    """Text by sentence id: sorted constant arrays and a binary search (no lookup-table resource, so the
    pipeline's iterator stays checkpointable)."""
    ids = np.fromiter(sorted(sentences), dtype=np.int64)
    keys = tf.constant(ids)
    values = tf.constant([sentences[i] for i in ids.tolist()])

    def lookup(sentence_ids: tf.Tensor, raw: tf.Tensor) -> tf.Tensor:
        del raw
        flat = tf.reshape(sentence_ids, [-1])
        at = tf.minimum(tf.searchsorted(keys, flat), len(ids) - 1)
        found = tf.equal(tf.gather(keys, at), flat)
        check = tf.debugging.Assert(tf.reduce_all(found), [
            f"{path}: no REFER sentence for sentence id(s)", tf.boolean_mask(flat, ~found)])
        with tf.control_dependencies([check]):
            return tf.reshape(tf.gather(values, at), tf.shape(sentence_ids))

    return lookup
