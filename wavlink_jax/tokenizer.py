"""CLIP text tokenizer: captions → fixed-length int32 `input_ids` and `attention_mask` (numpy).

`load_tokenizer(directory)` reads the tokenizer saved with a checkpoint: a `tokenizer.json` (preferred) or
CLIP's `vocab.json` + `merges.txt` pair, which is built exactly as `transformers.CLIPTokenizer` builds it (so
the ids match Hugging Face's). An optional `tokenizer_config.json` beside it supplies the special tokens
(`bos_token`, `eos_token`, `pad_token`) and `model_max_length`, as in Hugging Face checkpoints.

Every caption becomes `<|startoftext|> … <|endoftext|>`, right-padded with the pad token to `max_length`
(77 for CLIP); an over-long caption is cut so that `<|endoftext|>` stays its last valid token, because the
text tower pools at that token. The object is picklable (it runs inside grain worker processes).

`train_tokenizer(texts, out_dir)` trains a small CLIP-style tokenizer offline for the generated data set.
Its layout is CLIP's own: ids 0–255 are the byte symbols, 256–511 the same symbols ending a word (`</w>`),
then one id per learned merge, then `<|startoftext|>` and `<|endoftext|>` as the two last ids. As in OpenAI
CLIP's Hugging Face tokenizer, the pad token is `<|endoftext|>` (padded positions are masked out anyway), and
end-of-text is the largest id, so both of Hugging Face's pooling conventions find it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tokenizers

CLIP_CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONFIG_FILE = "tokenizer_config.json"
# Hugging Face writes a huge sentinel for "no limit" into model_max_length; anything above this means unset.
_UNSET_MAX_LENGTH = 1_000_000


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used: the message names the file and what is wrong."""


class Tokenizer:
    """Captions → `(input_ids, attention_mask)`, both int32 numpy arrays of shape `(len(texts), max_length)`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        max_length: int,
        bos_token: str,
        eos_token: str,
        pad_token: str,
        source: str,
    ):
        if max_length < 2:
            raise TokenizerError(f"{source}: max_length must be at least 2 (start and end tokens), got {max_length}")
        ids = {}
        for role, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            ids[role] = backend.token_to_id(token)
            if ids[role] is None:
                raise TokenizerError(f"{source}: {role} {token!r} is not in the vocabulary")
        self.max_length = max_length
        self.bos_token_id: int = ids["bos_token"]
        self.eos_token_id: int = ids["eos_token"]
        self.pad_token_id: int = ids["pad_token"]
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # Our own copy, so that padding/truncation settings stored in the file cannot leak in or out.
        self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._backend.enable_truncation(max_length, strategy="longest_first", direction="right")
        self._backend.enable_padding(
            direction="right", pad_id=self.pad_token_id, pad_token=pad_token, length=max_length
        )
        self._check_special_tokens(source)

    def _check_special_tokens(self, source: str) -> None:
        # The text tower pools at end-of-text: a tokenizer that does not add it would pool at a random word.
        # A single `encode` (not `encode_batch`) so loading does not start the tokenizers thread pool, which
        # would make every forked data worker warn and fall back to one thread.
        encoding = self._backend.encode("a")
        ids = encoding.ids[: sum(encoding.attention_mask)]
        if ids[0] != self.bos_token_id or ids[-1] != self.eos_token_id:
            raise TokenizerError(
                f"{source}: the tokenizer does not wrap text in start/end tokens "
                f"(ids {self.bos_token_id} … {self.eos_token_id}); got {ids} for 'a'. "
                "Its post-processor must add them, as CLIP's does."
            )

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("Tokenizer expects a sequence of strings, not one string; wrap it in a list")
        encodings = self._backend.encode_batch(list(texts))
        input_ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(len(encodings), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(input_ids.shape)
        return input_ids, mask

    def truncated(self, texts: Sequence[str]) -> np.ndarray:
        """Which of `texts` (a bool per text) are longer than `max_length` tokens, start and end included, and so
        lose their end to `__call__`."""
        return np.array([bool(e.overflowing) for e in self._backend.encode_batch(list(texts))], dtype=bool)

    def decode(self, input_ids: Sequence[int]) -> str:
        """Token ids → text, without special tokens (for inspecting batches)."""
        text = self._backend.decode(list(map(int, input_ids)), skip_special_tokens=True)
        return text.replace(END_OF_WORD, " ").strip()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"bos={self.bos_token_id}, eos={self.eos_token_id}, pad={self.pad_token_id})"
        )


def _token_content(value: str | dict | None) -> str | None:
    """Hugging Face stores special tokens either as a string or as an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json_settings(file: Path) -> dict:
    """The settings in `file` that are not null; none if it does not exist."""
    if not file.exists():
        return {}
    try:
        content = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{file}: not valid JSON ({err})") from err
    return {key: value for key, value in content.items() if value is not None}


def read_settings(directory: Path) -> dict:
    """Special tokens and max length from `tokenizer_config.json` / `special_tokens_map.json`, with transformers'
    precedence: a config that lists its `added_tokens_decoder` (written since transformers 4.34) is the whole
    truth; an older one is overridden by the special tokens map where the two disagree."""
    settings = _read_json_settings(directory / CONFIG_FILE)
    if "added_tokens_decoder" not in settings:
        settings.update(_read_json_settings(directory / "special_tokens_map.json"))
    return settings


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]], tokens: dict[str, str]) -> tokenizers.Tokenizer:
    """CLIP's BPE pipeline around a vocab/merges pair, built by transformers.CLIPTokenizer itself."""
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=tokens["eos_token"], **tokens)
    # Round-trip through JSON: drops transformers' Python-side decode wrapper, keeps everything else.
    return tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())


def load_tokenizer(path: str | os.PathLike, max_length: int | None = None) -> Tokenizer:
    """The tokenizer in `path` (a directory with `tokenizer.json`, or with CLIP's `vocab.json` + `merges.txt`;
    or a Hugging Face hub id, downloaded when online, like the checkpoint loaders).

    `max_length` defaults to `model_max_length` of `tokenizer_config.json`, else 77 (CLIP's context).
    """
    from wavlink_jax.convert.common import CheckpointError, resolve_source

    try:
        directory = resolve_source(path)
    except CheckpointError as err:
        raise TokenizerError(str(err)) from err
    if not directory.is_dir():
        raise TokenizerError(
            f"{directory}: not a directory; expected one holding tokenizer.json or vocab.json + merges.txt"
        )
    settings = read_settings(directory)
    tokens = {
        "bos_token": _token_content(settings.get("bos_token")) or BOS_TOKEN,
        "eos_token": _token_content(settings.get("eos_token")) or EOS_TOKEN,
    }
    tokens["pad_token"] = _token_content(settings.get("pad_token")) or tokens["eos_token"]
    if max_length is None:
        configured = settings.get("model_max_length")
        max_length = int(configured) if configured and configured < _UNSET_MAX_LENGTH else CLIP_CONTEXT_LENGTH

    if (directory / "tokenizer.json").exists():
        file = directory / "tokenizer.json"
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:
            raise TokenizerError(f"{file}: not a readable tokenizers file ({err})") from err
    elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        file = directory / "vocab.json"
        try:
            vocab, merges = tokenizers.models.BPE.read_file(str(file), str(directory / "merges.txt"))
        except Exception as err:
            raise TokenizerError(f"{directory}: vocab.json/merges.txt are not a readable BPE pair ({err})") from err
        backend = _clip_backend(vocab, merges, tokens)
    else:
        raise TokenizerError(
            f"{directory}: found neither tokenizer.json nor the pair vocab.json + merges.txt; "
            "point at the directory the CLIP checkpoint's tokenizer was saved in"
        )
    return Tokenizer(backend, max_length=max_length, source=str(file), **tokens)


def _bytes_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes, in CLIP's (GPT-2's) byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return [chr(mapping[b]) for b in printable] + [chr(mapping[b]) for b in range(256) if b not in printable]


def train_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1024, *, max_length: int = CLIP_CONTEXT_LENGTH
) -> Tokenizer:
    """Train a CLIP-style byte-level BPE tokenizer on `texts`, offline, and save it into `out_dir`.

    Writes `tokenizer.json`, CLIP's `vocab.json` + `merges.txt` (so `transformers.CLIPTokenizer` reads it too)
    and `tokenizer_config.json` (special tokens, `model_max_length`). `vocab_size` is an upper bound: 512 byte
    symbols + learned merges + 2 special tokens; a small corpus may yield fewer merges.
    """
    base = _bytes_alphabet()
    base_vocab = base + [symbol + END_OF_WORD for symbol in base]
    num_merges = vocab_size - len(base_vocab) - 2
    if num_merges < 1:
        raise ValueError(
            f"vocab_size must exceed {len(base_vocab) + 2} (512 byte symbols + 2 special tokens), got {vocab_size}"
        )

    from transformers import CLIPTokenizer

    # Same normalisation and pre-tokenisation as CLIP (lowercase, whitespace cleanup, CLIP's word split, bytes).
    pipeline = CLIPTokenizer().backend_tokenizer
    learner = tokenizers.Tokenizer(tokenizers.models.BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    learner.normalizer = pipeline.normalizer
    learner.pre_tokenizer = pipeline.pre_tokenizer
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=base,
        end_of_word_suffix=END_OF_WORD,
    )
    learner.train_from_iterator(texts, trainer)
    learned = json.loads(learner.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned][:num_merges]

    vocab = {token: index for index, token in enumerate(base_vocab)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    _clip_backend(vocab, merges, tokens).save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "unk_token": EOS_TOKEN, **tokens}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return load_tokenizer(out)
