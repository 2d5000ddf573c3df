"""The CLIP tokenizer: trained offline, loaded from tokenizer.json or vocab.json + merges.txt, same ids as HF."""

import json
import pickle

import numpy as np
import pytest
import tokenizers
from transformers import CLIPTokenizer

from wavlink_jax.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    TokenizerError,
    _bytes_alphabet,
    load_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "a dog barks loudly in the distance",
    "rain falls on a tin roof",
    "a car engine idles, then revs!",
    "birds chirping at dawn near a river",
    "a man speaks while a dog barks",
] * 20
PROBES = ["A dog barks", "rain on the roof, then birds", "", "Ünïcödé café 🎵 12345 it's"]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trained")
    train_tokenizer(CORPUS, directory, vocab_size=600)
    return directory


def _hf_ids(directory, texts, max_length):
    out = CLIPTokenizer.from_pretrained(str(directory))(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
    )
    return out["input_ids"], out["attention_mask"]


def test_trained_tokenizer_layout_and_round_trip(trained_dir):
    tok = load_tokenizer(trained_dir)
    assert tok.max_length == 77
    # CLIP layout: 512 byte symbols, merges, then start/end as the two last ids; pad = end-of-text.
    last = tok.vocab_size - 1
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (last - 1, last, last)
    assert 514 < tok.vocab_size <= 600
    ids, mask = tok(PROBES)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (len(PROBES), 77)
    lengths = mask.sum(-1)
    for row, length in zip(range(len(PROBES)), lengths):
        assert mask[row, :length].all() and not mask[row, length:].any()  # right padding
        assert ids[row, 0] == tok.bos_token_id and ids[row, length - 1] == tok.eos_token_id
        assert (ids[row, length:] == tok.pad_token_id).all()
    assert lengths[2] == 2  # empty caption: start, end
    assert tok.decode(ids[0]) == "a dog barks"  # lowercased, words intact
    # Unseen bytes survive (full byte alphabet); CLIP splits digits and "'s" into words of their own.
    assert tok.decode(ids[3]) == "ünïcödé café 🎵 1 2 3 4 5 it 's"
    # A frequent word is one token; the same ids as transformers' CLIPTokenizer on the saved files.
    assert lengths[0] == 5
    hf_ids, hf_mask = _hf_ids(trained_dir, PROBES, 77)
    np.testing.assert_array_equal(ids, hf_ids)
    np.testing.assert_array_equal(mask, hf_mask)


def test_truncation_keeps_end_of_text(trained_dir):
    tok = load_tokenizer(trained_dir, max_length=8)
    ids, mask = tok(["a dog barks loudly in the distance while rain falls on a tin roof", "a dog"])
    assert ids.shape == (2, 8)
    assert mask[0].all() and ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    full_ids, _ = load_tokenizer(trained_dir)(["a dog barks loudly in the distance while rain falls on a tin roof"])
    np.testing.assert_array_equal(ids[0, :7], full_ids[0, :7])  # the kept words are the leading ones
    assert mask[1].sum() == 4 and ids[1, 3] == tok.eos_token_id
    hf_ids, _ = _hf_ids(trained_dir, ["a dog barks loudly in the distance while rain falls on a tin roof", "a dog"], 8)
    np.testing.assert_array_equal(ids, hf_ids)
    # `truncated` names the cut texts: a text of exactly max_length tokens is whole.
    assert tok.truncated(["a dog barks loudly in the distance while rain falls on a tin roof", "a dog"]).tolist() == [
        True, False]
    fits = load_tokenizer(trained_dir, max_length=4)
    assert fits.truncated(["a dog", "a dog barks"]).tolist() == [False, True]


def test_pickle_round_trip(trained_dir):
    tok = load_tokenizer(trained_dir, max_length=16)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.max_length == 16 and clone.vocab_size == tok.vocab_size
    for left, right in zip(tok(PROBES), clone(PROBES)):
        np.testing.assert_array_equal(left, right)


def _handmade_clip_pair(directory, pad_token=None):
    """A CLIP vocab.json/merges.txt pair written by hand: byte symbols, 2 merges, special tokens last."""
    base = _bytes_alphabet()
    merges = [("d", "o"), ("do", "g</w>")]
    vocab_list = base + [s + "</w>" for s in base] + ["do", "dog</w>", BOS_TOKEN, EOS_TOKEN]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if pad_token:
        (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token, "model_max_length": 10}))
    return {t: i for i, t in enumerate(vocab_list)}


def test_vocab_merges_pair_matches_transformers(tmp_path):
    vocab = _handmade_clip_pair(tmp_path)
    tok = load_tokenizer(tmp_path, max_length=10)
    ids, mask = tok(["A dog", "dogs", "a dog a dog a dog a dog a dog"])
    bos, eos = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
    assert ids[0, :4].tolist() == [bos, vocab["a</w>"], vocab["dog</w>"], eos]  # expected from the merges by hand
    assert ids[1, :5].tolist() == [bos, vocab["do"], vocab["g"], vocab["s</w>"], eos]
    assert mask.sum(-1).tolist() == [4, 5, 10] and ids[2, -1] == eos
    hf_ids, hf_mask = _hf_ids(tmp_path, ["A dog", "dogs", "a dog a dog a dog a dog a dog"], 10)
    np.testing.assert_array_equal(ids, hf_ids)
    np.testing.assert_array_equal(mask, hf_mask)


def test_config_pad_token_and_max_length(tmp_path):
    vocab = _handmade_clip_pair(tmp_path, pad_token="!")  # the LAION convention: pad with id 0
    tok = load_tokenizer(tmp_path)
    assert tok.max_length == 10 and tok.pad_token_id == vocab["!"] == 0
    ids, mask = tok(["a dog"])
    assert ids[0, mask[0].sum():].tolist() == [0] * (10 - mask[0].sum())


@pytest.mark.parametrize("config_lists_added_tokens", [False, True])
def test_special_tokens_map_and_config_take_transformers_precedence(tmp_path, config_lists_added_tokens):
    """Both files name special tokens and disagree: a config with `added_tokens_decoder` (transformers ≥ 4.34) is
    the whole truth; an older one is overridden by special_tokens_map.json. Either way the ids are transformers'."""
    vocab = _handmade_clip_pair(tmp_path, pad_token="!")  # tokenizer_config.json: pad "!", model_max_length 10
    if config_lists_added_tokens:
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {
            str(vocab[token]): {"content": token, "special": True} for token in (BOS_TOKEN, EOS_TOKEN)
        }
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": EOS_TOKEN, "bos_token": BOS_TOKEN}))
    tok = load_tokenizer(tmp_path)
    pad = vocab["!"] if config_lists_added_tokens else vocab[EOS_TOKEN]
    assert (tok.pad_token_id, tok.bos_token_id, tok.max_length) == (pad, vocab[BOS_TOKEN], 10)
    theirs = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert (theirs.pad_token_id, theirs.bos_token_id) == (pad, vocab[BOS_TOKEN])


def test_trained_vocab_size_is_exact_given_enough_merges(tmp_path):
    """512 byte symbols + merges + 2 special tokens make `vocab_size`, no more: configs/quickstart.py sizes the text
    tower's embedding table by it, and a tokenizer with one token more is refused at the start of training."""
    tok = train_tokenizer(CORPUS, tmp_path, vocab_size=520)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id) == (520, 518, 519)


def test_bad_directories(tmp_path):
    with pytest.raises(TokenizerError, match="no such file or directory"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(__file__)
    with pytest.raises(TokenizerError, match="neither tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a readable"):
        load_tokenizer(tmp_path)
    # A tokenizer without start/end tokens would make the text tower pool at a word: refused.
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, BOS_TOKEN: 1, EOS_TOKEN: 2}, unk_token="a"))
    bare.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="does not wrap text in start/end tokens"):
        load_tokenizer(tmp_path)
    for template in (f"{BOS_TOKEN} $A", f"$A {EOS_TOKEN}"):  # only one of the two is not enough
        bare.post_processor = tokenizers.processors.TemplateProcessing(
            single=template, special_tokens=[(BOS_TOKEN, 1), (EOS_TOKEN, 2)]
        )
        bare.save(str(tmp_path / "tokenizer.json"))
        message = r"does not wrap text in start/end tokens \(ids 1 … 2\); got \[(1, 0|0, 2)\]"
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(TokenizerError, match="eos_token '<eos>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="not one string"):
        train_tokenizer(CORPUS[:5], tmp_path / "t", vocab_size=600)("a dog")
    with pytest.raises(ValueError, match="vocab_size must exceed 514"):
        train_tokenizer(CORPUS, tmp_path / "small", vocab_size=300)
