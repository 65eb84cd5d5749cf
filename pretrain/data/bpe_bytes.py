"""Byte-level BPE trained on the corpus (`tokenizer.kind=bpe_bytes`): the scheme of GPT-2,
Llama 3 and Qwen, written as a Hugging Face `tokenizer.json` with its `tokenizer_config.json`,
and read back like any Hub tokenizer (pretrain/data/tokenizer.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from lmforge.pretrain.core.durable import write_durable
from lmforge.pretrain.core.errors import DataError
from lmforge.pretrain.data.tokenizer import HUB_FILE, HubTokenizer

# Its two special tokens (ids 0 and 1), named as Llama 3 names them.
BPE_BYTES_EOS, BPE_BYTES_BOS = "<|end_of_text|>", "<|begin_of_text|>"


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
    write_durable(out / HUB_FILE, tok.to_str().encode())
    return HubTokenizer(out / HUB_FILE)
