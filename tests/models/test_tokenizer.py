"""SD-style tokenisation from a local CLIPTokenizer folder."""
import numpy as np
import pytest
from transformers import CLIPTokenizer

from tests.reference_models import write_tiny_tokenizer
from vpd_jax.models.tokenizer import load_tokenizer

TEXTS = ["a photo of the cat", "A  Dog!", "", "the sky the wall the cat the dog a photo of a dog"]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])  # SD v1, SD v2
def test_matches_transformers_padded_and_truncated(tmp_path, pad_token):
    vocab = write_tiny_tokenizer(str(tmp_path), pad_token=pad_token)
    tok = load_tokenizer(str(tmp_path))
    ids = tok(TEXTS, max_length=8)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), 8)

    reference = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)(
        TEXTS, padding="max_length", truncation=True, max_length=8)["input_ids"]
    np.testing.assert_array_equal(ids, reference)

    bos, eos, pad = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab[pad_token]
    assert tok.pad_token_id == pad and tok.eos_token_id == eos
    # BOS, the merged words, EOS, then padding
    words = [vocab[w + "</w>"] for w in ("a", "photo", "of", "the", "cat")]
    np.testing.assert_array_equal(ids[0], [bos, *words, eos, pad])
    np.testing.assert_array_equal(ids[2], [bos, eos] + [pad] * 6)
    # truncation keeps BOS and ends with EOS
    assert ids[3, 0] == bos and ids[3, -1] == eos and pad not in ids[3, 1:-1]


def test_pipeline_root_uses_tokenizer_subfolder(tmp_path):
    write_tiny_tokenizer(str(tmp_path / "tokenizer"), pad_token="!")
    assert load_tokenizer(str(tmp_path))(["a cat"], max_length=5).shape == (1, 5)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TypeError, match="single str"):
        write_tiny_tokenizer(str(tmp_path))
        load_tokenizer(str(tmp_path))("a cat", max_length=5)
