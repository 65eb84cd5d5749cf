"""Hub model families in and out: tiny random models built with transformers' own config classes
(Llama 3 with its RoPE scaling and tied embeddings, Mistral, Qwen2 with q/k/v biases, Qwen3 with
qk-norm and an explicit head width), saved as safetensors with a byte-level BPE tokenizer, as a
Hub download has them; nothing is downloaded.

- lmforge's model gives transformers' logits within 1e-5 (fp32) on the same ids;
- `lmforge export` gives back the same tensors bitwise, the same family and an equal config;
- classification and token-classification heads come back as the family's own classes;
- what a family's config holds that lmforge does not implement is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.launcher.cli import main
from lmforge.pretrain.core.errors import ConfigurationError
from tests.conftest import plays_dir

VOCAB = 320  # the tokenizer has 300 tokens: the embedding table is padded, as Qwen's is
SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": VOCAB,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _configs() -> dict:
    import transformers

    return {
        "llama3": transformers.LlamaConfig(
            **SHAPE, head_dim=16, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE
        ),
        "mistral": transformers.MistralConfig(**SHAPE, head_dim=16, sliding_window=None),
        "qwen2": transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True),
        "qwen3": transformers.Qwen3Config(**SHAPE, head_dim=24, tie_word_embeddings=False),
    }


FAMILY = {"llama3": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    """A 300-token byte-level BPE with its tokenizer_config.json, as save_pretrained writes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    play = sorted((Path(plays_dir()) / "comedies").glob("*.md"))[0]
    tok.train_from_iterator([play.read_text()], trainer=trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def _hub_model(name: str, out: Path, tokenizer_files: Path, head: str = "ForCausalLM", **kw):
    """A random model of family ``name`` saved as a Hub directory (every weight random, the
    norms and biases too, so that a misplaced one shows)."""
    import shutil

    import transformers

    config = _configs()[name]
    for key, value in kw.items():
        setattr(config, key, value)
    prefix = type(config).__name__.removesuffix("Config")
    torch.manual_seed(0)
    model = getattr(transformers, prefix + head)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    for file in tokenizer_files.iterdir():
        shutil.copy(file, out / file.name)
    return model


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_family_loads_with_its_logits_and_exports_bitwise(name, tmp_path, tokenizer_files):
    from transformers import AutoModelForCausalLM

    from lmforge.finetune.model import build_model
    from lmforge.pretrain.checkpoint.model_source import load_source

    hub = tmp_path / "hub"
    theirs = _hub_model(name, hub, tokenizer_files)
    src = load_source(str(hub))
    assert src.model.family == FAMILY[name]
    ours = build_model(src).eval()
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-5, f"{name}: logits differ by {diff}"

    out = tmp_path / "export"
    assert main(["export", str(hub), "--out", str(out)]) == 0
    want, got = load_file(hub / "model.safetensors"), load_file(out / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].equal(want[key]), key
    a, b = (json.loads((d / "config.json").read_text()) for d in (hub, out))
    assert b["architectures"] == a["architectures"] == [type(theirs).__name__]
    for key in (*SHAPE, "head_dim", "tie_word_embeddings", "rope_parameters", "model_type"):
        assert b.get(key) == a.get(key), key
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (again(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForTokenClassification"])
def test_task_heads_come_back_as_the_familys_classes(head, tmp_path, tokenizer_files):
    import transformers

    hub = tmp_path / "hub"
    labels = {
        "id2label": {0: "no", 1: "yes", 2: "maybe"},
        "label2id": {"no": 0, "yes": 1, "maybe": 2},
    }
    theirs = _hub_model("qwen3", hub, tokenizer_files, head=head, pad_token_id=0, **labels)
    if head == "ForTokenClassification":
        # lmforge's heads have no bias: one that is not zero is refused, never dropped
        with pytest.raises(ConfigurationError, match="score.bias is not zero"):
            from lmforge.pretrain.checkpoint.model_source import load_source

            load_source(str(hub)).load_weights()
        with torch.no_grad():
            theirs.score.bias.zero_()
        theirs.save_pretrained(hub, safe_serialization=True)
    out = tmp_path / "export"
    assert main(["export", str(hub), "--out", str(out)]) == 0
    auto = getattr(transformers, "AutoModel" + head)
    again = auto.from_pretrained(out).eval()
    assert type(again).__name__ == "Qwen3" + head
    ids = torch.randint(1, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (again(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("name", "field", "value", "message"),
    [
        ("mistral", "sliding_window", 4096, "sliding_window=4096 is not implemented in lmforge"),
        ("qwen2", "use_sliding_window", True, "use_sliding_window=True is not implemented"),
        ("llama3", "attention_bias", True, "attention_bias=True is not implemented in lmforge"),
        ("llama3", "mlp_bias", True, "mlp_bias=True is not implemented in lmforge"),
        ("llama3", "hidden_act", "gelu", "hidden_act='gelu' is not implemented in lmforge"),
        (
            "qwen3",
            "rope_parameters",
            {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
            "rope_scaling with rope_type='yarn' is not implemented in lmforge",
        ),
    ],
)
def test_what_lmforge_does_not_implement_is_refused(name, field, value, message, tmp_path):
    from lmforge.pretrain.model.hf_mapping import model_config_from_hf

    config = _configs()[name].to_dict()
    config[field] = value
    with pytest.raises(ConfigurationError) as err:
        model_config_from_hf(config, source="hub")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unsupported_architecture_names_the_supported_ones():
    import transformers

    from lmforge.pretrain.model.hf_mapping import model_config_from_hf

    config = transformers.Olmo2Config(**SHAPE).to_dict()
    with pytest.raises(ConfigurationError) as err:
        model_config_from_hf(config, source="hub")
    assert str(err.value) == (
        "hub: model_type 'olmo2' is not supported; lmforge reads llama, mistral, qwen2, qwen3 "
        "(Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3)"
    )


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, tokenizer_files):
    hub = tmp_path / "hub"
    _hub_model("qwen2", hub, tokenizer_files, vocab_size=200)
    assert main(["export", str(hub), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_finetuning_a_hub_model_exports_its_familys_classifier(tmp_path, tokenizer_files):
    """`finetune init_from=<a Hub Qwen3 directory>`: the shape and tokenizer come from it, the
    run trains, and its export is a Qwen3ForSequenceClassification that gives lmforge's logits
    with the tokenizer it came with."""
    import csv

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.finetune.model import build_model
    from lmforge.pretrain.checkpoint.model_source import load_source
    from tests.conftest import lmforge

    hub = tmp_path / "hub"
    _hub_model("qwen3", hub, tokenizer_files)
    rows = [("a fine film", "fresh"), ("dull and long", "rotten")] * 40
    for split in ("train", "val"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    run = tmp_path / "runs" / "cls"
    lmforge(
        "finetune",
        f"runs_dir={tmp_path / 'runs'}",
        "name=cls",
        f"init_from={hub}",
        f"task.train={tmp_path / 'train.csv'}",
        f"task.val={tmp_path / 'val.csv'}",
        "task.max_len=16",
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
        "train.max_steps=3",
        "train.precision=fp32",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    )
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "Qwen3ForSequenceClassification"
    assert hf.config.id2label == {0: "fresh", 1: "rotten"}
    tok = AutoTokenizer.from_pretrained(out)
    src = load_source(str(run))
    ours = build_model(src).eval()
    for text in ("a fine film", "dull and long"):
        ids = tok([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            theirs, mine = hf(ids).logits, ours(ids)[:, -1, :]  # the classifier reads the last
        assert (theirs - mine).abs().max().item() <= 1e-5


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A Qwen2 directory whose byte-level tokenizer has ChatML's special tokens and template,
    as an instruct model's has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    play = sorted((Path(plays_dir()) / "comedies").glob("*.md"))[0]
    tok.train_from_iterator([play.read_text()], trainer=trainer)
    files = tmp_path_factory.mktemp("chat-tokenizer")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(files)
    hub = tmp_path_factory.mktemp("chat") / "hub"
    _hub_model("qwen2", hub, files)
    return hub


def _finetune(tmp_path: Path, hub: Path, name: str, *task: str) -> tuple[Path, str]:
    """A 2-step finetune from ``hub``: its run directory and what it printed."""
    from tests.conftest import lmforge

    out = lmforge(
        "finetune",
        f"runs_dir={tmp_path / 'runs'}",
        f"name={name}",
        f"init_from={hub}",
        *task,
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
        "train.max_steps=2",
        "train.precision=fp32",
        "train.samples=0",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    ).stdout
    return tmp_path / "runs" / name, out


def test_sft_on_a_hub_model_speaks_its_chat_template_and_exports_it(tmp_path, chat_model):
    """`task.template` null with a tokenizer that has a chat template: an example is the prompt
    as one user message (with the generation prompt) and the answer as the assistant's turn up
    to <|im_end|>, token for token as transformers' apply_chat_template writes them; the export
    keeps the template, stops generation at <|im_end|>, and transformers generates from
    apply_chat_template what `lmforge generate` generates from the prompt."""
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.finetune.inference import generate
    from lmforge.finetune.prompts import PromptFormat
    from lmforge.pretrain.data.tokenizer import load_tokenizer

    hf_tok = AutoTokenizer.from_pretrained(chat_model)
    fmt = PromptFormat(load_tokenizer(str(chat_model)), None)
    end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.chat and fmt.stop_ids == (end, hf_tok.eos_token_id)
    user = [{"role": "user", "content": "Who is Sebastian?"}]
    turn = [*user, {"role": "assistant", "content": "Viola's brother."}]
    prompt, answer = fmt.example(user[0]["content"], turn[1]["content"])
    kw = {"tokenize": True, "return_dict": False}
    assert prompt == hf_tok.apply_chat_template(user, add_generation_prompt=True, **kw)
    whole = hf_tok.apply_chat_template(turn, **kw)
    assert prompt + answer == whole[: whole.index(end, len(prompt)) + 1]

    rows = [{"prompt": "Who is Sebastian?", "response": "Viola's brother."}] * 16
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, printed = _finetune(
        tmp_path, chat_model, "sft", "task.type=sft", f"task.train={tmp_path / 'sft.jsonl'}",
        "task.max_len=48",
    )  # fmt: skip
    assert f"prompts in the chat template of {chat_model}" in printed
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.chat_template == CHATML
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert end in hf.generation_config.eos_token_id
    ids = exported.apply_chat_template(user, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        new = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    new = new[: new.index(end)] if end in new else new
    stream = io.StringIO()
    text = generate(str(out), prompt=user[0]["content"], max_new_tokens=8, temperature=0.0,
                    stream=stream)  # fmt: skip
    assert text == exported.decode(new, skip_special_tokens=True)


def test_token_classification_on_a_hub_model_reads_words_as_in_running_text(tmp_path, chat_model):
    """A byte-level BPE writes a word's leading space into its first token: each word is encoded
    after a space, so that concatenated they are the sentence's tokens; the export's card says
    how transformers gets the same ids, and its token classifier gives lmforge's logits."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from lmforge.finetune.data import token_classification_example
    from lmforge.finetune.model import build_model
    from lmforge.pretrain.checkpoint.model_source import load_source
    from lmforge.pretrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(chat_model))
    words = ["Sebastian", "loves", "Olivia", "in", "Illyria"]
    ids, _ = token_classification_example(tok, words, [1, 0, 1, 0, 1], max_len=64)
    assert ids == tok.encode(" " + " ".join(words))

    rows = [{"tokens": words, "tags": ["B-PER", "O", "B-PER", "O", "B-LOC"]}] * 16
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, _ = _finetune(
        tmp_path, chat_model, "ner", "task.type=token_classification",
        f"task.train={tmp_path / 'ner.jsonl'}", "task.max_len=32",
    )  # fmt: skip
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "[' ' + w for w in words]" in (out / "README.md").read_text()
    hf = AutoModelForTokenClassification.from_pretrained(out).eval()
    theirs = AutoTokenizer.from_pretrained(out)(
        [" " + w for w in words], is_split_into_words=True, return_tensors="pt"
    )["input_ids"]
    assert theirs[0].tolist() == ids
    ours = build_model(load_source(str(run))).eval()
    with torch.no_grad():
        assert (hf(theirs).logits - ours(theirs)).abs().max().item() <= 1e-5
