"""Hugging Face tokenizer files for an export: made for an lmforge SentencePiece model
(`write_hf_tokenizer`), or copied from the Hugging Face tokenizer a model came with;
`write_tokenizer` does whichever a tokenizer needs.

`write_hf_tokenizer` writes `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`
and a copy of the model as `tokenizer.model`, so that

    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    tok(text)["input_ids"] == SentencePieceTokenizer(model).encode(text)
    tok.decode(ids) == SentencePieceTokenizer(model).decode(ids)

for any text. Letting transformers convert the `.model` itself does not give the same ids: its
Llama conversion handles the dummy prefix differently and adds BOS. So `tokenizer.json` is built
here, piece by piece, to do what SentencePiece's BPE encoder does:

- normalizer: `Prepend("▁")` then `Replace(" ", "▁")`. With lmforge's identity normalization the
  only change SentencePiece makes is to write spaces as U+2581 and to add one "▁" in front of
  any non-empty text (`add_dummy_prefix`), also when the text already starts with a space
  (" x" -> "▁▁x"). Tabs, newlines and other whitespace stay as they are.
- pre-tokenizer: none. SentencePiece splits at whitespace, digits and script changes only while
  training; when encoding it merges across the whole text, and those rules hold anyway because
  no piece in the vocabulary crosses such a boundary. Splitting here would only risk disagreeing.
- model: `BPE` with the model's vocabulary (ids unchanged) and one merge `(left, right)` for every
  way of cutting a piece into two pieces, ranked by the piece's score. SentencePiece repeatedly
  joins the adjacent pair whose concatenation is the highest-scoring piece; Hugging Face joins
  the pair of lowest rank, so rank order = score order gives the same merges. Only normal pieces
  are merge results: control pieces (`<s>`) and byte pieces (`<0x41>`) are never produced from
  text. `byte_fallback` turns a character that is not a piece into its UTF-8 byte pieces, as
  SentencePiece does.
- decoder: "▁" -> " ", byte pieces -> bytes -> UTF-8, join, and strip the one leading space that
  stands for the dummy prefix.
- post-processor: a template that adds no token. lmforge trains on text without BOS/EOS, so
  `tok(text)` gives the same ids with `add_special_tokens` true or false. (transformers takes
  this from tokenizer.json and ignores `add_bos_token`; `tokenizer_config.json` still says
  `add_bos_token: false` for tools that read only that, such as GGUF converters.)

Special tokens. `<unk>`, `<s>` and `</s>` are the model's pieces 0, 1, 2; the pad token is `</s>`
since lmforge's models have no padding piece (padded positions are masked out anyway).
SentencePiece's `EncodeAsIds` treats the text "<s>" as the three characters it is, never as
BOS; `split_special_tokens: true` in `tokenizer_config.json` makes transformers do the same, and
`tokenizer.json` lists no added tokens, so it also encodes that way when loaded with the
`tokenizers` library alone.

Preprocessing. `model_max_length`, `truncation_side` and `padding_side` in
`tokenizer_config.json` are what `lmforge export` says they are for the model's head (see
finetune/export.py): with them, transformers' usual `truncation=True` (and `padding=True`) cut
and pad as lmforge does. An instruction model's prompt template becomes the `chat_template`
(`instruction_chat_template`): one user message, rendered exactly as lmforge's template.

Decoding differs from SentencePiece in three cases that encoding never produces: control
tokens decode as "<s>"/"</s>", with the dummy-prefix space after "<s>" kept (pass
`skip_special_tokens=True` to drop them, as SentencePiece does), `<unk>` decodes as "<unk>" (SentencePiece writes " ⁇ "), and a run of byte pieces that is
not valid UTF-8 becomes one U+FFFD per byte (SentencePiece keeps the valid characters in it).

Only models trained the way `pretrain.data.tokenizer.train_tokenizer` trains them are supported, and
only BPE: for a Unigram model, equal-score segmentations (as of "    xy" with "▁" and "▁▁"
pieces) are common, and SentencePiece picks among them by float32 rounding while Hugging Face's
Unigram sums in float64, so the ids would differ on ordinary text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, processors

from lmforge.pretrain.core.durable import replace_durable
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.data.tokenizer import HubTokenizer, SentencePieceTokenizer, Tokenizer

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


_SIDES = ("left", "right")


def write_hf_tokenizer(
    sp_model_path: str,
    out_dir: str,
    *,
    model_max_length: int,
    truncation_side: str = "right",
    padding_side: str = "right",
    chat_template: str | None = None,
) -> None:
    """Write Hugging Face tokenizer files for the SentencePiece BPE model `sp_model_path` into
    the existing directory `out_dir` (see the module docstring for what they reproduce).
    ``model_max_length`` and the sides: where transformers cuts with `truncation=True` and pads
    with `padding=True`; ``chat_template``: a Jinja template (`instruction_chat_template`)."""
    _check_sides(truncation_side, padding_side)
    SentencePieceTokenizer(sp_model_path)  # a missing or unreadable model: one-line DataError
    proto = sentencepiece_model_pb2.ModelProto()
    with open(sp_model_path, "rb") as f:
        model_bytes = f.read()
    proto.ParseFromString(model_bytes)
    _check_supported(proto, sp_model_path)

    special = _special_tokens(proto)
    config = {
        # The generic class loads tokenizer.json as written; model-specific classes such as
        # LlamaTokenizer rebuild the pipeline from the vocabulary and change the ids.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        # Informational: with a tokenizer.json, transformers follows its post-processor.
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        # The default clean-up deletes spaces before punctuation: "a ." would decode as "a.".
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "truncation_side": truncation_side,
        "padding_side": padding_side,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    files = {
        "tokenizer.json": _backend(proto).to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special),
        "tokenizer.model": model_bytes,
    }
    for name, data in files.items():
        replace_durable(os.path.join(out_dir, name), data)


def write_tokenizer(tok: Tokenizer, out_dir: str, **settings) -> None:
    """An export's tokenizer files for ``tok``, whichever kind it is; ``settings`` as
    `write_hf_tokenizer` takes them."""
    if isinstance(tok, HubTokenizer):
        _copy_hub_tokenizer(tok, out_dir, **settings)
    else:
        write_hf_tokenizer(str(tok.path), out_dir, **settings)  # (tokenizer.model included)


def _copy_hub_tokenizer(
    tok: HubTokenizer,
    out_dir: str,
    *,
    model_max_length: int,
    truncation_side: str = "right",
    padding_side: str = "right",
    chat_template: str | None = None,
) -> None:
    """Copy a Hugging Face tokenizer's files (`tok`: a tokenizer.json and the files beside it)
    into the existing directory `out_dir`, its tokenizer_config.json given the export's
    preprocessing as `write_hf_tokenizer` gives it. ``chat_template`` (an instruction model's)
    replaces the tokenizer's own; without it the tokenizer's own template is kept."""
    _check_sides(truncation_side, padding_side)
    files = tok.files()
    config = {}
    if "tokenizer_config.json" in files:
        config = json.loads(files["tokenizer_config.json"].read_text(encoding="utf-8"))
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.update(
        model_max_length=model_max_length,
        truncation_side=truncation_side,
        padding_side=padding_side,
    )
    if chat_template is not None:
        config["chat_template"] = chat_template
    for name, file in files.items():
        if name == "tokenizer_config.json" or (
            name == "chat_template.jinja" and chat_template is not None
        ):
            continue
        replace_durable(os.path.join(out_dir, name), file.read_bytes())
    replace_durable(os.path.join(out_dir, "tokenizer_config.json"), _json_bytes(config))


def _check_sides(truncation_side: str, padding_side: str) -> None:
    for name, side in (("truncation_side", truncation_side), ("padding_side", padding_side)):
        if side not in _SIDES:
            raise ConfigurationError(f"{name}={side!r}: use left or right")


def instruction_chat_template(template: str) -> str:
    """A Jinja chat template that renders ``[{"role": "user", "content": prompt}]`` as
    ``template.replace("{prompt}", prompt)``, lmforge's instruction format, and refuses any
    other conversation (a system message, several turns: lmforge's models never saw one).

    The response header is part of the template, so the rendering is the same with or without
    `add_generation_prompt`. The literal text is written as Jinja string expressions, never as
    template text: braces, `{%`, quotes and whitespace in it stay exactly as they are (template
    text would be subject to `trim_blocks` / `lstrip_blocks`)."""
    prompt = "{{ messages[0]['content'] }}"
    body = prompt.join(f"{{{{ {_jinja_string(part)} }}}}" for part in template.split("{prompt}"))
    refuse = _jinja_string(
        "this model takes one user message (the prompt it puts into its template); got "
    )
    roles = "messages | map(attribute='role') | join(', ')"
    return (
        "{%- if messages | length != 1 or messages[0]['role'] != 'user' -%}"
        f"{{{{ raise_exception({refuse} ~ ({roles})) }}}}"
        "{%- endif -%}" + body
    )


def _jinja_string(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal (which Jinja reads with Python's
    unicode-escape rules; a raw carriage return would be turned into a newline)."""
    escapes = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "'" + "".join(escapes.get(c, c) for c in text) + "'"


def _check_supported(proto: sentencepiece_model_pb2.ModelProto, path: str) -> None:
    """Raise ConfigurationError for a model whose encoding tokenizer.json would not reproduce."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type).lower()
    if model_type != "bpe":
        raise ConfigurationError(
            f"{path} is a {model_type} SentencePiece model; only bpe ones can be exported with "
            "identical token ids (Hugging Face breaks ties between equal-score unigram "
            "segmentations differently): train the tokenizer with `tokenizer.model_type=bpe`"
        )
    expected = {
        "normalization_rule_name": (norm.name, "identity"),
        "precompiled_charsmap": (bool(norm.precompiled_charsmap), False),
        "add_dummy_prefix": (norm.add_dummy_prefix, True),
        "remove_extra_whitespaces": (norm.remove_extra_whitespaces, False),
        "escape_whitespaces": (norm.escape_whitespaces, True),
        "treat_whitespace_as_suffix": (trainer.treat_whitespace_as_suffix, False),
        "byte_fallback": (trainer.byte_fallback, True),
        "user_defined_or_unused_pieces": (
            any(p.type in (_Piece.USER_DEFINED, _Piece.UNUSED) for p in proto.pieces),
            False,
        ),
    }
    # Equal scores would make SentencePiece pick the leftmost pair where Hugging Face picks
    # by merge rank; lmforge's BPE models score the n-th merge -n, so this never happens.
    scores = [p.score for p in proto.pieces if p.type == _Piece.NORMAL and len(p.piece) > 1]
    expected["distinct_merge_scores"] = (len(set(scores)) == len(scores), True)
    for name, (value, want) in expected.items():
        if value != want:
            raise ConfigurationError(
                f"{path} has {name}={value!r}, which Hugging Face tokenizer files cannot "
                f"reproduce exactly (expected {want!r}); export a tokenizer trained by lmforge"
            )


def _special_tokens(proto: sentencepiece_model_pb2.ModelProto) -> dict[str, str]:
    """unk/bos/eos/pad token names; the pad token is EOS when the model has no padding piece."""
    trainer = proto.trainer_spec
    ids = {"unk": trainer.unk_id, "bos": trainer.bos_id, "eos": trainer.eos_id}
    ids["pad"] = trainer.pad_id if trainer.pad_id >= 0 else trainer.eos_id
    return {f"{kind}_token": proto.pieces[i].piece for kind, i in ids.items() if i >= 0}


def _merges(proto: sentencepiece_model_pb2.ModelProto) -> Iterator[tuple[str, str]]:
    """Every cut of a normal piece into two normal pieces, highest piece score first."""
    normal = {p.piece: p.score for p in proto.pieces if p.type == _Piece.NORMAL}
    for piece in sorted(normal, key=normal.__getitem__, reverse=True):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                yield left, right


def _backend(proto: sentencepiece_model_pb2.ModelProto) -> HFTokenizer:
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=list(_merges(proto)),
            unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
            fuse_unk=True,
            byte_fallback=True,
            # SentencePiece never looks a whole text up in the vocabulary; it only merges.
            ignore_merges=False,
        )
    )
    # Prepend does nothing to an empty text, as SentencePiece's dummy prefix.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)]
    )
    # Explicit rather than null: no loader should fall back to a default that adds BOS.
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            # The dummy prefix: after Fuse there is one string, so only its first space goes.
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tok


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
