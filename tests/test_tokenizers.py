"""Tokenizers users already have, and byte-level BPE trained here: Hugging Face `tokenizer.json`
files (built with transformers' and tokenizers' own classes; nothing is downloaded) read through
the same `Tokenizer` interface as SentencePiece, in `prepare`, in checkpoints and in exports.

- `tokenizer.kind=bpe_bytes`: `decode(encode(s)) == s` on the bundled plays, random Unicode and
  invalid UTF-8 made valid; transformers loads the prepared directory and gives the same ids.
- A Hub-style directory (tokenizer.json + tokenizer_config.json): its EOS/BOS, its files carried
  into the prepared data, the same ids as transformers'; a bare tokenizer.json: the end-of-text
  token it falls back to, said in one line; one with no EOS at all: refused.
- A vocabulary over 65,535: uint32 shards holding ids above 65,535.
- `prepare overwrite=true` with another kind of tokenizer leaves no file of the old one.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.pretrain.config.schema import PrepareConfig, load_config
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.data.prepare import load_manifest, prepare
from lmforge.pretrain.data.tokenizer import load_tokenizer
from tests.conftest import plays_dir


def _plays(n: int) -> list[str]:
    comedies = os.path.join(plays_dir(), "comedies")
    return [os.path.join(comedies, f) for f in sorted(os.listdir(comedies))[:n]]


def _prepare(out: Path, *overrides: str, plays: int = 2, log=None) -> dict:
    sources = ", ".join(f"{{path: '{p}', text_unit: paragraph}}" for p in _plays(plays))
    cfg = load_config(
        PrepareConfig,
        [f"out={out}", f"sources=[{sources}]", "val_fraction=0.1", "num_proc=1", *overrides],
    )
    return prepare(cfg, log=log or (lambda _: None))


def _tokens(out: Path, split: str = "train") -> np.ndarray:
    manifest = load_manifest(out)
    dtype = np.dtype(manifest["dtype"])
    return np.concatenate(
        [np.fromfile(out / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]]
    )


def _random_text(rng: random.Random, length: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    out = []
    for _ in range(length):
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\t", "\n", "\n\n", "\r\n", "\u3000", "\u2581"]))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def bpe_bytes_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe") / "data"
    _prepare(out, "tokenizer.kind=bpe_bytes", "tokenizer.vocab_size=700")
    return out


def test_bpe_bytes_round_trips_any_text_and_loads_in_transformers(bpe_bytes_data):
    from transformers import AutoTokenizer

    manifest = load_manifest(bpe_bytes_data)
    tok_info = manifest["tokenizer"]
    assert (tok_info["kind"], tok_info["file"], tok_info["vocab_size"]) == (
        "huggingface",
        "tokenizer.json",
        700,
    )
    tok = load_tokenizer(bpe_bytes_data)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 1, None)
    assert tok.sha256 == tok_info["sha256"]
    # No byte-fallback pieces: every byte is a character of the alphabet.
    assert not tok.byte_piece_mask().any()

    plays = [Path(p).read_text(encoding="utf-8") for p in _plays(3)]  # the third one unseen
    rng = random.Random(0)
    noise = [os.urandom(rng.randint(1, 64)).decode("utf-8", errors="replace") for _ in range(50)]
    texts = [
        *plays,
        *(_random_text(rng, rng.randint(1, 300)) for _ in range(200)),
        *noise,  # invalid UTF-8 made valid, as prepare reads it
        "",
        " leading and trailing ",
        "special names are text: <|end_of_text|> <|begin_of_text|>",
    ]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text, repr(text[:80])
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    # the special tokens' names in a text never become the special tokens
    assert 0 not in tok.encode(texts[-1]) and 1 not in tok.encode(texts[-1])

    # transformers reads the prepared directory's files and gives the same ids
    hf = AutoTokenizer.from_pretrained(str(bpe_bytes_data))
    for text in plays[-1].split("\n\n")[:200]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == 0 and hf.bos_token_id == 1

    # every document of the shards ends with EOS and decodes to its text
    tokens = _tokens(bpe_bytes_data)
    assert tokens.dtype == np.uint16 and tokens[-1] == 0


def _hub_tokenizer(out: Path, *, config: bool, specials: list[str], extra_tokens: int = 0):
    """A byte-level BPE tokenizer as a Hub model ships it: tokenizer.json, and with `config`
    the tokenizer_config.json / special_tokens_map.json that transformers' save_pretrained
    writes (bos/eos/pad named there)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((Path(p).read_text() for p in _plays(2)), trainer=trainer)
    if extra_tokens:  # ordinary added tokens (a big vocabulary without training one)
        backend.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    out.mkdir(parents=True)
    if not config:
        backend.save(str(out / "tokenizer.json"))
        return out
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    fast.save_pretrained(str(out))
    return out


def test_a_hub_directory_reads_its_special_tokens_and_its_files_travel(tmp_path):
    from transformers import AutoTokenizer

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
    hub = _hub_tokenizer(tmp_path / "hub", config=True, specials=specials)
    out = tmp_path / "data"
    lines: list[str] = []
    _prepare(out, f"tokenizer.path={hub}", "tokenizer.add_bos=true", log=lines.append)
    tok_info = load_manifest(out)["tokenizer"]
    assert tok_info["kind"] == "huggingface"
    assert (tok_info["bos_id"], tok_info["eos_id"], tok_info["pad_id"]) == (0, 1, 2)
    assert any(f"tokenizer: reusing {hub}/tokenizer.json (huggingface" in x for x in lines)
    # the files that name the special tokens came along, and are part of the tokenizer's identity
    assert (out / "tokenizer_config.json").is_file()
    assert load_tokenizer(out).sha256 == load_tokenizer(hub).sha256 == tok_info["sha256"]
    written = (out / "tokenizer_config.json").read_text()
    config = json.loads(written)
    config["eos_token"] = "<|begin_of_text|>"  # the same vocabulary, another EOS
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="does not match its sha256"):
        load_manifest(out)
    (out / "tokenizer_config.json").write_text(written)

    hf = AutoTokenizer.from_pretrained(str(hub))
    tok = load_tokenizer(hub)
    text = Path(_plays(3)[-1]).read_text()[:20000]
    assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    # documents start with BOS and end with EOS
    tokens = _tokens(out)
    assert tokens[0] == 0 and tokens[-1] == 1


def test_a_bare_tokenizer_json_says_which_token_ends_documents(tmp_path):
    hub = _hub_tokenizer(tmp_path / "bare", config=False, specials=["<|endoftext|>"])
    lines: list[str] = []
    _prepare(tmp_path / "data", f"tokenizer.path={hub / 'tokenizer.json'}", log=lines.append)
    notes = [x for x in lines if "names no eos_token" in x]
    assert notes == [
        f"tokenizer {hub / 'tokenizer.json'} names no eos_token: documents end with its special "
        "token '<|endoftext|>' (id 0)"
    ]
    assert load_manifest(tmp_path / "data")["tokenizer"]["eos_id"] == 0

    none = _hub_tokenizer(tmp_path / "none", config=False, specials=["<mask>"])
    with pytest.raises(DataError) as err:
        _prepare(tmp_path / "data2", f"tokenizer.path={none}")
    assert str(err.value) == (
        f"tokenizer {none} has no EOS token, which ends every document; use a tokenizer whose "
        "files name one (eos_token in tokenizer_config.json, eos_id in SentencePiece)"
    )
    assert not (tmp_path / "data2").exists()


def test_a_vocabulary_over_65535_goes_to_uint32_shards(tmp_path):
    hub = _hub_tokenizer(
        tmp_path / "big", config=True, specials=["<|end_of_text|>"], extra_tokens=70_000
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"para {i} <extra_{69_990 + i % 10}> end" for i in range(200)))
    out = tmp_path / "data"
    cfg = load_config(
        PrepareConfig,
        [
            f"out={out}",
            f"sources=[{{path: '{corpus}', text_unit: paragraph}}]",
            f"tokenizer.path={hub}",
            "num_proc=1",
        ],
    )
    prepare(cfg, log=lambda _: None)
    manifest = load_manifest(out)
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] > 65_535
    tokens = _tokens(out)
    tok = load_tokenizer(out)
    high = int(tok.encode("<extra_69999>")[0])
    assert high > 65_535 and high in set(tokens.tolist())


def test_overwrite_with_another_kind_leaves_no_file_of_the_old_tokenizer(tmp_path):
    out = tmp_path / "data"
    _prepare(out, "tokenizer.kind=bpe_bytes", "tokenizer.vocab_size=400")
    assert (out / "tokenizer_config.json").is_file()
    _prepare(out, "tokenizer.vocab_size=400", "overwrite=true")
    assert load_manifest(out)["tokenizer"]["kind"] == "sentencepiece"
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tokenizer.kind=bpe_bytes", "tokenizer.path=x.json"],
            "`tokenizer.kind`=bpe_bytes trains a tokenizer, but `tokenizer.path` names one to "
            "reuse (x.json); drop one of them",
        ),
        (
            ["tokenizer.kind=bpe_bytes", "tokenizer.model_type=unigram"],
            "`tokenizer.model_type`=unigram is a SentencePiece option, not one of "
            "`tokenizer.kind`=bpe_bytes; drop it or use kind=sentencepiece",
        ),
    ],
)
def test_bad_tokenizer_settings(tmp_path, overrides, message):
    with pytest.raises(ConfigurationError) as err:
        load_config(PrepareConfig, [f"out={tmp_path}", *overrides])
    assert message in str(err.value)


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        load_tokenizer(tmp_path / "empty")
    assert "holds no tokenizer (no tokenizer.model and no tokenizer.json)" in str(err.value)
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError) as err:
        load_tokenizer(tmp_path / "bad.json")
    assert str(err.value).startswith(f"{tmp_path / 'bad.json'} is not a Hugging Face tokenizer")
    assert "\n" not in str(err.value)
    hub = _hub_tokenizer(tmp_path / "hub", config=False, specials=["<|endoftext|>"])
    (hub / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(DataError) as err:
        load_tokenizer(hub)
    assert str(err.value) == (
        f"{hub}: its eos_token '<|nope|>' is not in the vocabulary of tokenizer.json; fix "
        "eos_token in tokenizer_config.json"
    )


def test_a_run_on_a_hub_tokenizer_carries_it_to_checkpoints_and_exports(bpe_bytes_data, tmp_path):
    """Pretraining on data tokenized by a tokenizer.json: every checkpoint carries its files,
    consolidate and export copy them, and transformers' AutoTokenizer of the export gives
    lmforge's ids and decodes what `lmforge generate` prints."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.launcher.cli import main
    from tests.conftest import lmforge
    from tests.runs import TINY

    args = [f"data.path={bpe_bytes_data}", f"runs_dir={tmp_path}", "name=r", *TINY]
    lmforge("pretrain", *args, "train.max_steps=4", "checkpoint.interval=2")
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000004"
    sha = load_manifest(bpe_bytes_data)["tokenizer"]["sha256"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["tokenizer"] == "tokenizer.json" and state["tokenizer_sha256"] == sha
    assert load_tokenizer(ckpt).sha256 == sha
    assert not (ckpt / "tokenizer.model").exists()

    assert main(["consolidate", str(tmp_path / "r"), "--out", str(tmp_path / "c")]) == 0
    assert load_tokenizer(tmp_path / "c").sha256 == sha
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "hf")]) == 0
    hf_dir = str(tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    ours = load_tokenizer(bpe_bytes_data)
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 32 and config["eos_token"] == "<|end_of_text|>"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    assert (model.config.eos_token_id, model.config.bos_token_id) == (0, 1)
    ids = torch.tensor([ours.encode(text[:20])])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    want = hf_tok.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
    got = lmforge(
        "generate", hf_dir, "--prompt", text[:20], "--max-new-tokens", "8", "--temperature", "0"
    )
    assert got.stdout == want + "\n"
