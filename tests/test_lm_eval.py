"""`lmforge evaluate RUN --lm-eval TASK --lm-eval-include DIR`: EleutherAI's harness scores a
tiny trained run on a local multiple-choice task (tests/data/lm_eval), offline; the accuracy
it saves beside the run is the one lmforge's export computes itself for the same items."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
import yaml

from lmforge.finetune.harness import import_harness, run_lm_eval, update_model_card
from lmforge.pretrain.core.errors import ConfigurationError
from tests.conftest import REPO, lmforge

TASKS = os.path.join(REPO, "tests", "data", "lm_eval")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> str:
    """The task YAML with an absolute path to its JSONL (data_files resolve from the cwd)."""
    out = tmp_path_factory.mktemp("tasks")
    with open(os.path.join(TASKS, "tiny_choice.yaml")) as f:
        task = yaml.safe_load(f)
    task["dataset_kwargs"]["data_files"]["test"] = os.path.join(TASKS, "tiny_choice.jsonl")
    (out / "tiny_choice.yaml").write_text(yaml.safe_dump(task))
    return str(out)


@pytest.fixture(scope="module")
def run(reference_runs, tmp_path_factory) -> str:
    """A copy of a tiny trained run (its results are written into it)."""
    ref = reference_runs(1, "fp32")
    out = str(tmp_path_factory.mktemp("lmeval") / "run")
    shutil.copytree(ref, out)
    return out


def _own_accuracy(export_dir: str) -> float:
    """Accuracy on the task's items from the exported model in transformers: the choice with
    the highest log-likelihood after the context (as the harness encodes them: context and
    " " + choice encoded whole, the continuation is what follows the context's tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    right = 0
    with open(os.path.join(TASKS, "tiny_choice.jsonl")) as f:
        docs = [json.loads(line) for line in f]
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            whole = tok.encode(doc["context"] + " " + choice)
            n = len(tok.encode(doc["context"]))
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(n, len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(docs)


def test_harness_scores_a_run_offline(run, task_dir, tmp_path):
    proc = lmforge(
        "evaluate",
        run,
        "--lm-eval",
        "tiny_choice",
        "--lm-eval-include",
        task_dir,
        "--lm-eval-device",
        "cpu",
        env=OFFLINE,
    )
    printed = json.loads(proc.stdout[proc.stdout.index("{") :])
    step = printed["step"]
    path = os.path.join(run, "eval", f"lm_eval_{step}.json")
    assert printed["file"] == path and step == 14  # the run's last checkpoint
    assert os.listdir(os.path.join(run, "eval")) == [f"lm_eval_{step}.json"]  # no temp export
    with open(path) as f:
        saved = json.load(f)
    metrics = saved["results"]["tiny_choice"]["metrics"]
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert saved["results"]["tiny_choice"]["samples"]["effective"] == 10
    assert saved["settings"]["dtype"] == "fp32" and saved["harness_version"]

    # The harness really scored this model: lmforge's own export gives the same accuracy.
    from lmforge.finetune.export import export

    export_dir = export(run, out=str(tmp_path / "export"))
    assert metrics["acc"] == pytest.approx(_own_accuracy(export_dir), abs=1e-9)

    # An exported directory is scored as it is: the same accuracy, saved in it, and its card
    # gets the task in its model-index; the card's own results stay.
    card = os.path.join(export_dir, "README.md")
    before = open(card).read()
    again = run_lm_eval(export_dir, tasks=["tiny_choice"], include=[task_dir], device="cpu")
    assert again["file"] == os.path.join(export_dir, "lm_eval.json") and again["step"] is None
    assert again["results"]["tiny_choice"]["metrics"] == metrics
    update_model_card(export_dir, saved)  # evaluated again: replaced, not repeated
    text = open(card).read()
    assert text.startswith("---\n")
    matter = yaml.safe_load(text.split("---\n")[1])
    results = matter["model-index"][0]["results"]
    ours = [r for r in results if r.get("source", {}).get("name") == "lm-evaluation-harness"]
    assert len(ours) == 1 and ours[0]["dataset"]["name"] == "tiny_choice"
    assert {m["type"]: m["value"] for m in ours[0]["metrics"]} == {
        "acc": metrics["acc"],
        "acc_norm": metrics["acc_norm"],
    }
    assert (
        len(results)
        == len(yaml.safe_load(before.split("---\n")[1])["model-index"][0]["results"]) + 1
    )
    assert text.split("---\n", 2)[2] == before.split("---\n", 2)[2]  # the text is untouched


def test_card_without_front_matter_gets_one(tmp_path):
    (tmp_path / "README.md").write_text("# my model\n\nSome words.\n")
    result = {"results": {"t": {"metrics": {"acc": 0.5, "acc_stderr": 0.1}, "n_shot": 0}}}
    update_model_card(str(tmp_path), result)
    text = (tmp_path / "README.md").read_text()
    matter = yaml.safe_load(text.split("---\n")[1])
    entry = matter["model-index"][0]
    assert entry["name"] == tmp_path.name
    assert entry["results"][0]["metrics"] == [
        {"type": "acc", "value": 0.5, "name": "acc (lm-evaluation-harness, 0-shot)"}
    ]
    assert text.endswith("# my model\n\nSome words.\n")


def test_bad_input(run, task_dir, monkeypatch):
    with pytest.raises(ConfigurationError, match=r"no such task.*did you mean tiny_choice"):
        run_lm_eval(run, tasks=["tiny_choise"], include=[task_dir], device="cpu")
    with pytest.raises(ConfigurationError, match="--lm-eval-include /nowhere: no such directory"):
        run_lm_eval(run, tasks=["tiny_choice"], include=["/nowhere"], device="cpu")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'lmforge\[lmeval\]'"):
        import_harness()
