"""REFER's sentences from TFDS' raw text: the normalisation rule, and the exact lookup in REFER's refcoco.json."""
import numpy as np
import pytest
import tensorflow as tf

from tests.data import fixtures
from vpd_jax.data import refer_text


def _texts(fn, ids, raws):
    return [t.decode() for t in fn(tf.constant(ids, tf.int64), tf.constant(raws)).numpy()]


def test_normalize_gives_refers_sent_where_refer_only_normalised():
    raws = [raw for raw in fixtures.REFER_SENT if raw != "lady w back to us"]  # a correction, not a normalisation
    got = [t.decode() for t in refer_text.normalize(tf.constant(raws)).numpy()]
    assert got == [fixtures.REFER_SENT[raw] for raw in raws]
    # Apostrophes join, other punctuation separates, letters beyond ASCII stay, spaces collapse.
    assert refer_text.normalize(tf.constant("  Guy's T-shirt,  Café!")).numpy().decode() == "guys t shirt café"


def test_raw_keeps_tfds_text_and_unknown_modes_are_named():
    raw = "The nurse in the picture."
    assert _texts(refer_text.text_fn("raw", "ref_coco/refcoco_unc"), [1], [raw]) == [raw]
    with pytest.raises(ValueError, match=r"data.refer_text must be one of \('sent', 'raw'\), got 'clean'"):
        refer_text.text_fn("clean", "ref_coco/refcoco_unc")


def test_lookup_reads_the_dataset_and_partition_of_the_tfds_config(tmp_path):
    path = fixtures.write_refcoco_json(str(tmp_path / "refcoco.json"))
    sentences = refer_text.load_refer_sentences(path, "ref_coco/refcoco_unc")
    assert sentences[9102] == "lady with back to us"  # RefCOCO's text, not the RefCOCO+ refs with the same ids
    lookup = refer_text.text_fn("sent", "ref_coco/refcoco_unc", path)
    ids = np.array([[9101, 9102], [9009, 9001]])
    got = lookup(tf.constant(ids), tf.zeros(ids.shape, tf.string)).numpy()
    assert got.shape == ids.shape
    assert [t.decode() for t in got.ravel()] == ["the lady with the blue shirt", "lady with back to us",
                                                 "the nurse in the picture", "man on the left"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"refcoco.json: no REFER sentence for sentence id"):
        lookup(tf.constant([9101, 12345], tf.int64), tf.constant(["", ""]))
    with pytest.raises(ValueError, match=r"'ref_coco/other' is not a TFDS ref_coco config"):
        refer_text.load_refer_sentences(path, "ref_coco/other")
