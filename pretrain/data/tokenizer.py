"""Tokenizers: the one interface lmforge reads text through (`Tokenizer`, `load_tokenizer`), and
its two backends: SentencePiece (train one on a text stream, or load a `.model` file) and
Hugging Face's `tokenizer.json` (the tokenizers Hub models come with; byte-level BPE trained
with `tokenizer.kind=bpe_bytes`, bpe_bytes.py). Nothing outside this module knows which one a
run uses.

## SentencePiece

Training options make `decode(encode(s)) == s` exact for any text without U+2581:

- `normalization_rule_name="identity"`: no NFKC, so "ﬁ" or a combining accent stay as written;
- `remove_extra_whitespaces=False`: otherwise "  two  spaces " decodes as "two spaces";
- `byte_fallback=True`: a character outside the vocabulary becomes its UTF-8 bytes
  (`<0x..>` pieces) instead of `<unk>`.

Newlines (`newline_pieces`). SentencePiece's own file reader cuts its input into lines, so a
tokenizer trained the usual way never sees "\\n": each newline is then the byte piece `<0x0A>`,
and the first word of each line is learned with the dummy-prefix space ("▁To") it does not have
inside a document ("To" after "\\n"). lmforge feeds the trainer whole documents instead (cut
into chunks after a newline where a document is longer than a training sentence may be), so that
"\\n" is a normal piece and merges such as "\\n\\n" or ".\\n" are learned where the text has
them, and line starts are learned as they are encoded. SentencePiece's rule that no piece
crosses a change of script keeps newlines out of word pieces. On the demo plays (vocab 4096) this
gives 10% fewer tokens; `newline_pieces=False` trains line by line.

SentencePiece writes a space as U+2581 ("▁") inside pieces, so a literal U+2581 in the input
decodes as a space: the one character that does not round-trip (Llama's tokenizer shares this).
`lmforge prepare` counts such documents in its manifest warnings.

## Hugging Face tokenizer.json

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
import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lmforge.pretrain.core.durable import sha256_file
from lmforge.pretrain.core.errors import DataError

# SentencePiece drops training sentences longer than `max_sentence_length` bytes; long lines are
# cut into chunks of this many characters (<= 4 bytes each) to stay under the limit below.
_TRAIN_CHUNK_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _TRAIN_CHUNK_CHARS
# The name a SentencePiece model has wherever lmforge keeps one (data, checkpoints, exports).
SENTENCEPIECE_FILE = "tokenizer.model"


def _optional_id(value: int) -> int | None:
    # SentencePiece says -1 for a special piece the model does not have.
    return None if value < 0 else value


class Tokenizer(ABC):
    """What lmforge needs of a tokenizer, whatever its backend: ids of text and text of ids, its
    special ids, and the files that carry it (copied into prepared data, checkpoints and
    exports). Nothing outside this module knows which backend it is; `load_tokenizer` picks it.

    Picklable (it pickles its path and reloads), so it can be used inside `datasets.map` workers.
    """

    kind: str  # "sentencepiece" or "huggingface", as manifests record it
    path: Path  # its main file (a `.model`, or a `tokenizer.json`)
    sha256: str  # its identity: of the main file, and of the files beside it that it reads
    notes: Sequence[str] = ()  # what it uses where its files are silent (one line each, to print)

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"

    @abstractmethod
    def files(self) -> dict[str, Path]:
        """The files that carry this tokenizer, by the name each has wherever lmforge keeps it
        (prepared data, checkpoints, exports): the main file first."""

    @property
    def file_name(self) -> str:
        """The name its main file has wherever lmforge keeps it."""
        return next(iter(self.files()))

    vocab_size: int
    bos_id: int | None  # None where the tokenizer has none
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added; special-token names in it are plain text)."""

    def encode_word(self, word: str) -> list[int]:
        """Token ids of one word as it is inside running text, after a space (a tagged word of
        token classification)."""
        return self.encode(word)  # (SentencePiece: its dummy prefix is that space)

    @property
    def chat_template(self) -> str | None:
        """The chat template (Jinja) the tokenizer comes with, or None."""
        return None

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The text of a conversation in the tokenizer's chat template."""
        raise DataError(f"tokenizer {self.path} has no chat template")

    def encode_special(self, text: str) -> list[int]:
        """Token ids of `text` with the special-token names in it read as special tokens (a
        chat template's rendering), as transformers' tokenizers read text."""
        return self.encode(text)  # (SentencePiece reads every name as text)

    def special_ids(self) -> set[int]:
        """The ids of its special tokens."""
        return {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id) if i is not None}

    @abstractmethod
    def encode_batch(self, texts: Sequence[str], *, num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text, spread over `num_threads` threads (-1 = all cores)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens (BOS, EOS, padding) decode to nothing."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of an id, as the tokenizer writes it."""

    @abstractmethod
    def byte_piece_mask(self) -> np.ndarray:
        """A bool per id: whether it is a byte-fallback piece (`<0x..>`)."""


def _ids(ids: Iterable[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # numpy arrays too


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (trained by `lmforge prepare`, or brought along)."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                f"tokenizer model not found: {self.path}; set `tokenizer.path` to a SentencePiece "
                ".model file, a tokenizer.json or a directory holding one (or to null to train one)"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise DataError(
                f"{self.path} is not a SentencePiece model ({str(exc).splitlines()[0]}); "
                "point `tokenizer.path` at a .model file written by SentencePiece, or at a "
                "Hugging Face tokenizer.json"
            ) from None
        self.sha256 = sha256_file(self.path)

    def files(self) -> dict[str, Path]:
        return {SENTENCEPIECE_FILE: self.path}

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _optional_id(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        """None for lmforge's tokenizers (they have no padding piece)."""
        return _optional_id(self._sp.pad_id())

    @property
    def unk_id(self) -> int | None:
        return _optional_id(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = -1) -> list[list[int]]:
        return self._sp.Encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds(_ids(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def byte_piece_mask(self) -> np.ndarray:
        return np.array([self._sp.IsByte(i) for i in range(self.vocab_size)], dtype=bool)


HUB_FILE = "tokenizer.json"
# Read beside tokenizer.json, in this order of precedence for the special tokens.
HUB_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# The special tokens that end a document when the files name no eos_token, in this order.
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
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
        self._dummy_prefix: bool | None = None  # (encode_word)
        self._side = {n: f for n, f in _hub_files(self.path).items() if n != HUB_FILE}
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
        self.sha256 = _files_sha256(self.files())

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
        return {HUB_FILE: self.path, **self._side}

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

    def encode_word(self, word: str) -> list[int]:
        # A byte-level BPE writes the space before a word into its first token ("Ġword"), so a
        # word alone is another token than inside text; with the space it is the same. A
        # SentencePiece-style tokenizer.json (Metaspace, or a normalizer that prepends "▁")
        # gives every text its dummy prefix itself, like SentencePiece.
        if self._dummy_prefix is None:
            pieces = self._tok.encode("a", add_special_tokens=False).tokens
            self._dummy_prefix = "".join(pieces).startswith("\u2581")
        return self.encode(word if self._dummy_prefix else " " + word)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The text of a conversation in the tokenizer's chat template, rendered by transformers
        (sandboxed Jinja) with the tokenizer's special-token names, as ``apply_chat_template``
        renders it."""
        from transformers.utils import chat_template_utils

        if self.chat_template is None:
            raise DataError(f"tokenizer {self.path} has no chat template")
        names = {
            key: name
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (name := _token_name(self.config.get(key))) is not None
        }
        try:
            if hasattr(chat_template_utils, "render_jinja_template"):
                rendered = chat_template_utils.render_jinja_template(
                    conversations=[messages],
                    chat_template=self.chat_template,
                    add_generation_prompt=add_generation_prompt,
                    **names,
                )[0]
            else:  # (transformers before 4.50 renders with the compiled template directly)
                compiled = chat_template_utils._compile_jinja_template(self.chat_template)
                rendered = [
                    compiled.render(
                        messages=messages, add_generation_prompt=add_generation_prompt, **names
                    )
                ]
        except Exception as exc:  # noqa: BLE001 - a template raises whatever it raises
            raise DataError(
                f"the chat template of {self.path} fails on a {len(messages)}-message "
                f"conversation ({type(exc).__name__}: {exc}); set `task.template` to use a "
                "prompt template instead"
            ) from None
        return rendered[0]

    def encode_special(self, text: str) -> list[int]:
        self._tok.encode_special_tokens = False
        try:
            return self.encode(text)
        finally:
            self._tok.encode_special_tokens = True

    def special_ids(self) -> set[int]:
        """The ids of its special tokens (the added tokens marked special)."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

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


def _hub_files(main: Path) -> dict[str, Path]:
    """A tokenizer.json and the files beside it that belong to it."""
    side = {name: main.with_name(name) for name in HUB_SIDE_FILES}
    return {HUB_FILE: main, **{n: f for n, f in side.items() if f.is_file()}}


def _files_sha256(files: dict[str, Path]) -> str:
    """The identity of a tokenizer of several files: over their names and contents."""
    digest = hashlib.sha256()
    for name, file in files.items():
        digest.update(f"{name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """The identity of the tokenizer whose main file is ``path`` (what `Tokenizer.sha256` says
    once loaded), from the bytes of its files alone: a file that is not a tokenizer still has
    one, so that a wrong file is told apart from a broken one."""
    p = Path(path)
    return _files_sha256(_hub_files(p)) if p.suffix == ".json" else sha256_file(p)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at `path`: a SentencePiece `.model` file, a Hugging Face `tokenizer.json`
    (with the files beside it), or a directory holding either. A directory with both (Llama 2,
    lmforge's own exports) is read through its `tokenizer.model`, the file the other is made
    from."""
    p = Path(path)
    if p.is_dir():
        if (p / SENTENCEPIECE_FILE).is_file():
            return SentencePieceTokenizer(p / SENTENCEPIECE_FILE)
        if (p / HUB_FILE).is_file():
            return HubTokenizer(p / HUB_FILE)
        raise DataError(
            f"{p} holds no tokenizer (no {SENTENCEPIECE_FILE} and no {HUB_FILE}); point "
            "`tokenizer.path` at the directory of a model that has one, or at the file itself"
        )
    if p.suffix == ".json":
        return HubTokenizer(p)
    return SentencePieceTokenizer(p)


def find_tokenizer(directory: str | os.PathLike) -> str | None:
    """The main file of the tokenizer that a directory (a run's checkpoint, an export, a model
    directory) holds, as `load_tokenizer` would read it; None when it holds none."""
    for name in (SENTENCEPIECE_FILE, HUB_FILE):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def _chunks(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, each cut just after a newline where the
    piece holds one (a single line longer than `limit` is cut where the limit falls)."""
    start = 0
    while len(text) - start > limit:
        cut = text.rfind("\n", start, start + limit)
        end = cut + 1 if cut >= start else start + limit
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def training_lines(
    texts: Iterable[str], max_bytes: int | None, stats: dict, *, newline_pieces: bool = True
) -> Iterator[str]:
    """Training sentences of `texts`, up to `max_bytes` UTF-8 bytes in all: whole documents
    (newlines included) cut into chunks, or, without `newline_pieces`, their lines."""
    budget = max_bytes if max_bytes is not None else float("inf")
    for text in texts:
        if budget <= 0:
            break
        size = len(text.encode("utf-8"))
        if size > budget:
            text = text.encode("utf-8")[: int(budget)].decode("utf-8", errors="ignore")
            size = int(budget)
        budget -= size
        stats["bytes"] += size
        stats["documents"] += 1
        if newline_pieces:
            yield from _chunks(text, _TRAIN_CHUNK_CHARS)
            continue
        for line in text.split("\n"):
            for start in range(0, len(line), _TRAIN_CHUNK_CHARS):
                yield line[start : start + _TRAIN_CHUNK_CHARS]


def train_tokenizer(
    *,
    texts: Iterable[str],
    out_path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    max_bytes: int | None = None,
    num_threads: int | None = None,
    character_coverage: float = 0.9995,
    newline_pieces: bool = True,
) -> Tokenizer:
    """Train a SentencePiece model on `texts` (documents, may hold newlines) and write it to
    `out_path`.

    At most `max_bytes` UTF-8 bytes of `texts` are used, first come first. The vocabulary has
    exactly `vocab_size` pieces: unk=0, bos=1, eos=2, no pad, 256 byte pieces, then characters and
    merges. A corpus too small for that raises DataError naming the largest size it supports.
    `newline_pieces`: train on whole documents, so that newlines are pieces (module docstring).
    """
    stats = {"bytes": 0, "documents": 0}
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=training_lines(
                texts, max_bytes, stats, newline_pieces=newline_pieces
            ),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise _training_error(exc, vocab_size=vocab_size, stats=stats) from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return SentencePieceTokenizer(out_path)


def _training_error(exc: RuntimeError, *, vocab_size: int, stats: dict) -> DataError:
    """One actionable line for SentencePiece's trainer failures."""
    msg = str(exc)
    corpus = (
        f"the tokenizer training text ({stats['documents']} documents, {stats['bytes']:,} bytes)"
    )
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", msg)
    if too_high:
        return DataError(
            f"{corpus} supports at most {too_high.group(2)} pieces, fewer than "
            f"`tokenizer.vocab_size`={vocab_size}: lower `tokenizer.vocab_size` to "
            f"<= {too_high.group(2)} or add text"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if too_low:
        return DataError(
            f"{corpus} has {too_low.group(2)} distinct characters to cover, more than "
            f"`tokenizer.vocab_size`={vocab_size} allows: raise `tokenizer.vocab_size`"
        )
    if stats["bytes"] == 0:
        return DataError(f"{corpus} is empty: the training documents hold no text")
    return DataError(f"SentencePiece training failed on {corpus}: {msg.splitlines()[-1]}")
