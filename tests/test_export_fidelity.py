"""What `lmforge export` tells transformers and the Hub, checked without a run (the exports of
real runs, for every head, are checked in test_finetune.py):

- the tokenizer cuts and pads on the sides it is given, at `model_max_length`;
- an instruction model's chat template renders lmforge's template exactly, whatever characters
  the template and the prompt hold, and refuses conversations lmforge never trained on;
- the model card's front matter parses as the Hub parses it, names Hub datasets and base models
  by their ids, and local data and models by their names only (no path of this machine).
"""

from __future__ import annotations

import os

import pytest
import yaml
from transformers import AutoTokenizer

from lmforge.finetune.export import _data_name, _hub_dataset, _hub_model, model_card, preprocessing
from lmforge.finetune.hf_tokenizer import instruction_chat_template, write_hf_tokenizer
from lmforge.pretrain.checkpoint.model_source import ModelSource
from lmforge.pretrain.config.schema import ModelConfig
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.data.tokenizer import load_tokenizer

TEMPLATES = [
    "### Instruction:\n{prompt}\n\n### Response:\n",
    "{prompt}",
    "Q: {prompt}\nQ again: {prompt}\nA:",
    "  {% raw %}{{ x }}{# c #}'\"\\n\\ \r\n\t{prompt} café 🙂 {%- endraw %}\n  ",
]
PROMPTS = ["Who is Hamlet?", "", "{{ messages }} {% if %} ' \" \\ \n\r\t end", "  spaced  "]


def _write(sp: str, out, **settings) -> object:
    os.makedirs(out, exist_ok=True)
    write_hf_tokenizer(sp, str(out), **settings)
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


def test_truncation_and_padding_sides(tiny_data, tmp_path):
    path = os.path.join(tiny_data, "tokenizer.model")
    sp = load_tokenizer(path)
    text = "Now is the winter of our discontent made glorious summer by this sun of York"
    ids = sp.encode(text)
    assert len(ids) > 8
    for side in ("left", "right"):
        tok = _write(path, tmp_path / side, model_max_length=8, truncation_side=side,
                     padding_side=side)  # fmt: skip
        assert tok(text, truncation=True)["input_ids"] == (ids[-8:] if side == "left" else ids[:8])
        batch = tok([text, "Now"], truncation=True, padding=True)
        n = len(sp.encode("Now"))
        mask = [0] * (8 - n) + [1] * n if side == "left" else [1] * n + [0] * (8 - n)
        assert batch["attention_mask"][1] == mask
    with pytest.raises(ConfigurationError, match="truncation_side='middle': use left or right"):
        write_hf_tokenizer(path, str(tmp_path), model_max_length=8, truncation_side="middle")


@pytest.mark.parametrize("template", TEMPLATES, ids=range(len(TEMPLATES)))
def test_chat_template_renders_the_task_template(tiny_data, tmp_path, template):
    path = os.path.join(tiny_data, "tokenizer.model")
    sp = load_tokenizer(path)
    prep = preprocessing({"type": "sft", "template": template, "max_len": 16}, context=64)
    assert prep.chat_template == instruction_chat_template(template)
    tok = _write(
        path,
        tmp_path,
        model_max_length=prep.model_max_length,
        truncation_side=prep.truncation_side,
        padding_side=prep.padding_side,
        chat_template=prep.chat_template,
    )
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        text = template.replace("{prompt}", prompt)
        for generation_prompt in (False, True):
            kwargs = {"add_generation_prompt": generation_prompt}
            assert tok.apply_chat_template(chat, tokenize=False, **kwargs) == text
        assert tok.apply_chat_template(chat)["input_ids"] == sp.encode(text)
    user = {"role": "user", "content": "x"}
    for chat in ([{"role": "system", "content": "Be brief."}, user], [user, user]):
        with pytest.raises(Exception, match="one user message.*got (system, user|user, user)"):
            tok.apply_chat_template(chat)


def test_data_and_model_names_hold_no_local_path(tmp_path):
    local = tmp_path / "train.csv"
    local.write_text("text,label\nx,y\n")
    saved = tmp_path / "saved"
    saved.mkdir()
    assert _data_name(str(local)) == _data_name("data/train.csv") == "train.csv"
    assert _data_name(str(saved)) == "saved" and _hub_dataset(str(saved)) is None
    assert _data_name("pkg://finetune/data/x.csv") == "pkg://finetune/data/x.csv"
    for hub in ("rotten_tomatoes", "cornell-movie-review-data/rotten_tomatoes"):
        assert _hub_dataset(hub) == _data_name(hub) == hub
    assert _hub_dataset(str(local)) is _hub_dataset("train.csv") is None
    assert _data_name(str(tmp_path / "runs" / "cls" / "checkpoints" / "step_00000012")) == (
        "cls/checkpoints/step_00000012"
    )
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abc"
    assert _hub_model(str(snapshot)) == "acme/tiny-llama"
    assert _hub_model(str(tmp_path / "llama")) is None


def test_card_front_matter_parses_as_on_the_hub(tmp_path):
    """A classifier finetuned from a Hub model on a Hub dataset: the ids are named, and the
    model-index holds the validation metrics."""
    from huggingface_hub import ModelCard

    task = {
        "type": "classification",
        "train": "cornell-movie-review-data/rotten_tomatoes",
        "val": "cornell-movie-review-data/rotten_tomatoes",
        "labels": ["neg", "pos"],
        "max_len": 96,
    }
    src = ModelSource(
        path="unused",
        model=ModelConfig(n_layer=1, n_head=2, d_model=32, max_seq_len=256, vocab_size=512),
        load_weights=dict,
        tokenizer=None,
        task=task,
    )
    meta = {
        "source": "cls/checkpoints/step_00000100",
        "task": task,
        "base_model": {"name": "0123abc", "hub_id": "acme/tiny-llama", "from_scratch": False},
        "datasets": ["cornell-movie-review-data/rotten_tomatoes"],
        "evaluation": {
            "step": 100,
            "data": "cornell-movie-review-data/rotten_tomatoes",
            "dataset_id": "cornell-movie-review-data/rotten_tomatoes",
            "split": "validation",
            "metrics": {"accuracy": 0.8125, "macro_f1": 0.8, "val_loss": 0.45},
        },
        "compute": {},
        "dtype": "fp32",
        "parameters": 1000,
    }
    # a Hugging Face classifier lmforge did not train says no task.max_len: the context
    foreign = preprocessing({"type": "classification", "labels": ["neg", "pos"]}, context=256)
    assert (foreign.model_max_length, foreign.truncation_side) == (256, "left")
    prep = preprocessing(task, context=256)
    assert (prep.model_max_length, prep.truncation_side, prep.padding_side) == (96, "left", "right")
    card = model_card(
        src, meta, arch="LlamaForSequenceClassification", out=str(tmp_path / "rt"), prep=prep
    )
    path = tmp_path / "README.md"
    path.write_text(card)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "acme/tiny-llama"
    assert front["datasets"] == ["cornell-movie-review-data/rotten_tomatoes"]
    assert front["license"] == "unknown" and "license:" in card.split("## License")[1]
    parsed = ModelCard.load(path)
    assert parsed.data.base_model == "acme/tiny-llama"
    results = {r.metric_type: r for r in parsed.data.eval_results}
    assert {k: r.metric_value for k, r in results.items()} == {
        "accuracy": 0.8125,
        "f1": 0.8,
        "loss": 0.45,
    }
    assert {r.dataset_type for r in results.values()} == {task["val"]}
    assert {r.task_type for r in results.values()} == {"text-classification"}
    assert "`model_max_length: 96`" in card and "256-token context" in card
    assert str(tmp_path) not in card
    # a base trained from new weights with the base's shape only is not a base model
    meta["base_model"]["from_scratch"] = True
    card = model_card(src, meta, arch="LlamaForSequenceClassification", out="rt", prep=prep)
    assert "base_model" not in yaml.safe_load(card.split("---\n")[1])
