"""Hugging Face tokenizers (`tokenizer.json`): the ones Hub models come with, and byte-level BPE
trained here (`tokenizer.kind=bpe_bytes`).

A Hugging Face tokenizer is its `tokenizer.json` (read with the `tokenizers` library: a JSON
file, no code runs) and, beside it, the files that name its special tokens and chat template:
`tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`. lmforge carries those
together (into prepared data, checkpoints and exports), and its identity (`sha256`) covers them
all: the same vocabulary with another EOS is another tokenizer.

Special tokens. BOS, EOS, PAD and UNK are the `bos_token`, `eos_token`, ... that
`tokenizer_config.json` (else `special_tokens_map.json`) names. Every document ends with EOS, so
a tokenizer whose files name none uses its special end-of-text token when it has one of the
usual names (`<|endoftext|>`, `<|end_of_text|>`, `</s>`, `<eos>`), and says so in `notes`;
without one, `lmforge prepare` refuses it. BOS is optional (Qwen has none).

Encoding. Text is encoded without added special tokens (lmforge adds BOS/EOS itself), and the
name of a special token inside the text is encoded as the text it is (`encode_special_tokens`):
a document that quotes "<|endoftext|>" does not end there. Decoding drops special tokens.

Byte-level BPE (GPT-2, Llama 3, Qwen): the text's UTF-8 bytes are mapped to 256 printable
characters before merging, so any text encodes without an unknown token and, with no normalizer,
`decode(encode(s)) == s` exactly. Hub tokenizers that normalize (Qwen2's NFC, for one) give back
the normalized text instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from lmforge.pretrain.core.durable import sha256_file, write_durable
from lmforge.pretrain.core.errors import DataError
from lmforge.pretrain.data.tokenizer import Tokenizer, _ids

MAIN_FILE = "tokenizer.json"
# Read beside tokenizer.json, in this order of precedence for the special tokens.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# The special tokens that end a document when the files name no eos_token, in this order.
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
# lmforge's byte-level BPE: its two special tokens (ids 0 and 1), named as Llama 3 names them.
BPE_BYTES_EOS, BPE_BYTES_BOS = "<|end_of_text|>", "<|begin_of_text|>"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); fix or remove it") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} holds {type(value).__name__}, not a JSON object; fix or remove it")
    return value


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HubTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` with the files beside it (module docstring)."""

    kind = "huggingface"

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as Backend

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                f"tokenizer not found: {self.path}; set `tokenizer.path` to a tokenizer.json, a "
                "directory holding one, or a SentencePiece .model file"
            )
        try:
            self._tok = Backend.from_file(str(self.path))
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exception
            raise DataError(
                f"{self.path} is not a Hugging Face tokenizer.json "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); point "
                "`tokenizer.path` at the tokenizer.json a model came with"
            ) from None
        self._tok.encode_special_tokens = True  # special-token names in text stay text
        self._side = {
            name: self.path.with_name(name)
            for name in SIDE_FILES
            if self.path.with_name(name).is_file()
        }
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if name in self._side:
                config.update(_read_json(self._side[name]))
        self.config = config
        self.notes: list[str] = []
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.bos_id = self._special_id("bos_token")
        self.pad_id = self._special_id("pad_token")
        self.unk_id = self._special_id("unk_token")
        self.eos_id = self._special_id("eos_token")
        if self.eos_id is None:
            self.eos_id = self._end_of_text()
        digest = hashlib.sha256()
        for name, file in self.files().items():
            digest.update(f"{name}\0{sha256_file(file)}\n".encode())
        self.sha256 = digest.hexdigest()

    def _special_id(self, key: str) -> int | None:
        name = _token_name(self.config.get(key))
        if name is None:
            return None
        token_id = self._tok.token_to_id(name)
        if token_id is None:
            raise DataError(
                f"{self.path.parent}: its {key} {name!r} is not in the vocabulary of "
                f"{self.path.name}; fix {key} in tokenizer_config.json"
            )
        return token_id

    def _end_of_text(self) -> int | None:
        """The usual end-of-text special token, where the files name no eos_token."""
        special = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        for name in END_OF_TEXT:
            if name in special:
                self.notes.append(
                    f"tokenizer {self.path} names no eos_token: documents end with its special "
                    f"token {name!r} (id {special[name]})"
                )
                return special[name]
        return None

    def files(self) -> dict[str, Path]:
        return {MAIN_FILE: self.path, **self._side}

    @property
    def chat_template(self) -> str | None:
        """The chat template the tokenizer comes with (tokenizer_config.json or
        chat_template.jinja), or None."""
        if "chat_template.jinja" in self._side:
            return self._side["chat_template.jinja"].read_text(encoding="utf-8")
        template = self.config.get("chat_template")
        return template if isinstance(template, str) else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = -1) -> list[list[int]]:
        """(The library's thread pool is process-wide: RAYON_NUM_THREADS, read once, sets its
        size; `num_threads` is not per call here.)"""
        # (encode_batch_fast, without character offsets, is newer than tokenizers 0.20)
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_ids(ids), skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def byte_piece_mask(self) -> np.ndarray:
        mask = np.zeros(self.vocab_size, dtype=bool)
        if getattr(self._tok.model, "byte_fallback", False):
            for piece, token_id in self._tok.get_vocab(with_added_tokens=False).items():
                mask[token_id] = bool(_BYTE_PIECE.fullmatch(piece))
        return mask


def train_bpe_bytes(
    *, lines: Iterator[str], out_dir: str | os.PathLike, vocab_size: int, stats: dict
) -> HubTokenizer:
    """Train a byte-level BPE on `lines` (training chunks of documents) and write
    `tokenizer.json` and `tokenizer_config.json` into `out_dir`. The vocabulary: the end- and
    begin-of-text tokens (ids 0, 1), the 256 byte characters, then merges up to `vocab_size`;
    a corpus with too few distinct pairs for that raises DataError naming the size it reached."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    # use_regex: GPT-2's split into words, numbers and punctuation before merging, so that no
    # piece spans "dog." or " the\n"; add_prefix_space=False keeps the text as written.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_BYTES_EOS, BPE_BYTES_BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    if stats["bytes"] == 0:
        raise DataError(
            f"the tokenizer training text ({stats['documents']} documents, 0 bytes) is empty: "
            "the training documents hold no text"
        )
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        raise DataError(
            f"the tokenizer training text ({stats['documents']} documents, {stats['bytes']:,} "
            f"bytes) supports at most {got} pieces, fewer than `tokenizer.vocab_size`="
            f"{vocab_size}: lower `tokenizer.vocab_size` to <= {got} or add text"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BPE_BYTES_BOS,
        "eos_token": BPE_BYTES_EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # else decode would change " ." into "."
        "split_special_tokens": True,  # as lmforge encodes: special-token names in text are text
    }
    write_durable(out / "tokenizer_config.json", json.dumps(config, indent=2).encode())
    write_durable(out / MAIN_FILE, tok.to_str().encode())
    return HubTokenizer(out / MAIN_FILE)
