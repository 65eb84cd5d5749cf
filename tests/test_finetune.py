"""Finetuning, export and inference, on real data: the bundled Rotten Tomatoes task, a tagging
set built here, and instruction pairs built from the reviews.

The base model is the session's short pretraining run on Shakespeare (tests/runs.py). Runs are
real `lmforge` processes; the Hugging Face comparisons load the exports with transformers,
offline.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import tempfile
from collections import Counter

import pytest
import torch

from tests.conftest import REPO, lmforge
from tests.runs import (
    QUIET,
    STEPS,
    _rows,
    checkpoint_weights,
    latest_checkpoint,
    read_metrics,
)

FT_STEPS = 12
FT_COMMON = [
    "task.max_len=48",
    "train.micro_batch_size=8",
    "train.global_batch_size=32",
    f"train.max_steps={FT_STEPS}",
    "train.log_interval=1",
    "train.eval_interval=6",
    "train.precision=fp32",
    "optim.lr=2e-3",
    "optim.warmup_steps=2",
    "checkpoint.interval=4",
    "checkpoint.keep_last=2",
    *QUIET,
    "logging.plot=false",
]


def _write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _read_csv(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def rt(tmp_path_factory) -> dict:
    """The bundled task's splits, and small subsets of them for fast runs."""
    from lmforge.finetune.bundled import rotten_tomatoes

    out = tmp_path_factory.mktemp("rt")
    sizes = rotten_tomatoes(str(out))
    train, val = _read_csv(out / "train.csv"), _read_csv(out / "val.csv")
    rng = random.Random(0)
    rng.shuffle(train)
    return {
        "dir": str(out),
        "sizes": sizes,
        "train": _write_csv(out / "train_small.csv", train[:640]),
        "val": _write_csv(out / "val_small.csv", val[:96]),
    }


@pytest.fixture(scope="session")
def base_run(reference_runs) -> str:
    """A short fp32 pretraining run on Shakespeare (vocab 512, 2 layers, d_model 64)."""
    return reference_runs(1, "fp32")


@pytest.fixture(scope="session")
def base_export(base_run, tmp_path_factory) -> str:
    """The base run exported to Hugging Face format."""
    out = str(tmp_path_factory.mktemp("export") / "base")
    lmforge("export", base_run, "--out", out)
    return out


@pytest.fixture(scope="session")
def ft_runs(tmp_path_factory, base_run, rt):
    """Classification runs made once per argument set and shared by the tests below."""
    runs = str(tmp_path_factory.mktemp("ft"))
    made: dict[tuple, str] = {}

    def get(nproc: int, *extra: str) -> str:
        key = (nproc, *extra)
        if key not in made:
            name = f"cls-{len(os.listdir(runs))}"  # a failed run leaves its directory
            lmforge(
                "finetune",
                *cls_args(runs, name, base_run, rt),
                *extra,
                *(["--nproc", str(nproc)] if nproc > 1 else []),
            )
            made[key] = os.path.join(runs, name)
        return made[key]

    return get


def cls_args(runs: str, name: str, base: str, rt: dict) -> list[str]:
    return [
        f"runs_dir={runs}",
        f"name={name}",
        f"init_from={base}",
        f"task.train={rt['train']}",
        f"task.val={rt['val']}",
        *FT_COMMON,
    ]


# --------------------------------------------------------------------------------------------
# the bundled task
# --------------------------------------------------------------------------------------------


def test_bundled_rotten_tomatoes_splits_by_movie(rt):
    import bz2

    from lmforge.finetune.bundled import SOURCE, split_of

    assert rt["sizes"] == {"train": 10351, "val": 1210, "test": 1247}
    with bz2.open(SOURCE, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] != "plot"]
    movies = {
        s: {r["movie_name"] for r in rows if split_of(r["movie_name"]) == s}
        for s in ("train", "val", "test")
    }
    assert not (movies["train"] & movies["val"]) and not (movies["train"] & movies["test"])
    val = _read_csv(os.path.join(rt["dir"], "val.csv"))
    assert {r["label"] for r in val} == {"fresh", "rotten"}
    train_text = open(os.path.join(rt["dir"], "train_text.txt"), encoding="utf-8").read()
    assert val[0]["text"] not in train_text  # evaluation reviews never reach pretraining text


# --------------------------------------------------------------------------------------------
# classification: distributed equality, exact resume, metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        "ddp",
        "fsdp",
        "deepspeed parallel.zero_stage=2",
        "ddp parallel.tensor_parallel=2",
        "ddp parallel.pipeline_parallel=2",
    ],
    ids=["ddp", "fsdp", "zero2", "tp2", "pp2"],
)
def test_two_processes_equal_one(ft_runs, layout):
    from lmforge.pretrain.checkpoint.model_source import load_source

    strategy, *rest = layout.split()
    one_run = ft_runs(1, "model.dropout=0.0")
    two_run = ft_runs(2, "model.dropout=0.0", f"parallel.strategy={strategy}", *rest)
    one, two = _rows(one_run), _rows(two_run)
    # the checkpoint of every layout reads back as the same model (what export and evaluate use)
    a, b = load_source(one_run).weights, load_source(two_run).weights
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float):
                assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (a["step"], k)
            else:
                assert b[k] == v, (a["step"], k)
    evals = [r for r in one if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    assert {"accuracy", "macro_f1", "f1_fresh", "f1_rotten", "n"} <= evals[-1].keys()
    assert evals[-1]["n"] == 96
    # tokens are the real (unpadded) tokens of the examples trained on; FLOPs follow them
    train = [r for r in one if r["kind"] == "train"]
    assert all(b["tokens"] > a["tokens"] for a, b in zip(train, train[1:], strict=False))


def test_finetune_resumes_exactly_after_sigkill(ft_runs, base_run, rt, tmp_path):
    ref = ft_runs(1, "model.dropout=0.1")
    args = cls_args(str(tmp_path), "killed", base_run, rt) + ["model.dropout=0.1"]
    proc = lmforge("finetune", *args, env={"LMFORGE_FAULT": "step@7"}, check=False)
    assert proc.returncode != 0
    run = os.path.join(tmp_path, "killed")
    assert latest_checkpoint(run) == "step_00000004"
    lmforge("finetune", *args, "resume=auto")
    assert _rows(run) == _rows(ref)
    with open(os.path.join(run, "forecast.json")) as f:  # the resumed part forecasts its 8 steps
        fc = json.load(f)
    assert fc["command"] == "finetune" and fc["from_step"] == 4 and fc["wall"]["steps"] == 8
    assert fc["actual"]["complete"] and fc["actual"]["evals"] == 2  # steps 6 and 12
    (killed,) = fc["previous"]  # the killed part's forecast, never finished
    assert killed["from_step"] == 0 and "actual" not in killed
    a, b = checkpoint_weights(run, FT_STEPS), checkpoint_weights(ref, FT_STEPS)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    with open(os.path.join(run, "base.json")) as f:
        base = json.load(f)
    pre = read_metrics(base_run)[-1]
    assert base["pretrain_flops"] == pytest.approx(pre["flops"])
    # the base's tokens: its 14 steps of 2048 tokens (tests/runs.py), as its metrics count them
    assert base["pretrain_tokens"] == pre["tokens"] == STEPS * 2048


def test_pretrained_vs_scratch_at_equal_budget(ft_runs, base_run, rt, report):
    """The comparison of a label curve's point (`make demo`) with a tiny budget: the same model,
    data, steps and schedule from the pretrained weights and from new ones; per-example scores
    whose means are the runs' accuracies, and their paired difference; both accuracies and the
    difference go to the test report."""
    from lmforge.finetune.inference import evaluate_examples
    from lmforge.finetune.label_curve import paired_difference, verdict

    pre_run = ft_runs(1, "model.dropout=0.0")
    scratch_run = ft_runs(1, "model.dropout=0.0", "from_scratch=true")
    pre, scratch = _rows(pre_run), _rows(scratch_run)
    budget = [(r["step"], r["tokens"], r["flops"]) for r in pre if r["kind"] == "train"]
    assert budget == [(r["step"], r["tokens"], r["flops"]) for r in scratch if r["kind"] == "train"]
    with open(os.path.join(scratch_run, "base.json")) as f:
        assert json.load(f)["from_scratch"] is True
    with open(os.path.join(pre_run, "base.json")) as f:
        assert json.load(f)["pretrain_flops"] == pytest.approx(read_metrics(base_run)[-1]["flops"])
    assert pre[0]["loss"] != scratch[0]["loss"]  # really two different starting points
    a, b = pre[-1], scratch[-1]
    # per-example scores whose means are the runs' own validation accuracies
    scores = [
        [int(r["correct"]) for r in evaluate_examples(run, data=rt["val"]).rows]
        for run in (pre_run, scratch_run)
    ]
    for row, correct in zip((a, b), scores, strict=True):
        assert len(correct) == row["n"] == 96 and sum(correct) / 96 == row["accuracy"]
    diff, se = paired_difference(*scores)
    assert diff == pytest.approx(a["accuracy"] - b["accuracy"])
    word, _ = verdict(diff, se, differ=scores[0] != scores[1])
    report(
        f"finetune {FT_STEPS} steps on 640 Rotten Tomatoes reviews, 96 val: from pretrained "
        f"accuracy {a['accuracy']:.3f} macro-F1 {a['macro_f1']:.3f}; from scratch accuracy "
        f"{b['accuracy']:.3f} macro-F1 {b['macro_f1']:.3f}; pretrained - scratch "
        f"{100 * diff:+.2f} ± {100 * se:.2f} points: {word}"
    )


def test_scaling_report_plots_metric_against_total_compute(ft_runs, base_run, tmp_path):
    """`lmforge scaling fit --finetune RUN ...`: each finetuned run's final metric against
    pretraining + finetuning FLOPs (a run from scratch has no pretraining compute)."""
    pre_run = ft_runs(1, "model.dropout=0.0")
    scratch_run = ft_runs(1, "model.dropout=0.0", "from_scratch=true")
    out = str(tmp_path / "report")
    lmforge("scaling", "fit", "--finetune", pre_run, scratch_run, "--out", out)
    with open(os.path.join(out, "fit.json")) as f:
        rows = {r["run"]: r for r in json.load(f)["finetune"]}
    pretrain_flops = read_metrics(base_run)[-1]["flops"]
    for run, pretrained in ((pre_run, True), (scratch_run, False)):
        final = [r for r in _rows(run) if r["kind"] == "eval"][-1]
        row = rows[os.path.basename(run)]
        assert row["metric"] == "accuracy" and row["value"] == final["accuracy"]
        assert row["finetune_flops"] == final["flops"]
        assert row["total_flops"] == pytest.approx(
            final["flops"] + (pretrain_flops if pretrained else 0.0)
        )
    md = open(os.path.join(out, "report.md")).read()
    assert "(from scratch)" in md and "finetune.png" in md
    assert os.path.getsize(os.path.join(out, "finetune.png")) > 10_000


def test_freeze_trunk_class_weights_and_exact_resume(ft_runs, base_run, rt, tmp_path):
    """A linear probe with class weights: the trunk stays the base's, its FLOPs are about a
    third of full finetuning's (no backward through the trunk), and a SIGKILLed run resumes to
    the uninterrupted one's rows (its optimizer has one parameter group: the head)."""
    from lmforge.finetune.data import class_weights
    from lmforge.pretrain.checkpoint.model_source import load_source

    assert class_weights("balanced", [0, 0, 0, 1], 2) == [4 / (2 * 3), 4 / (2 * 1)]
    assert class_weights("none", [0, 1], 2) is None
    extra = ["freeze=trunk", "class_weights=balanced"]
    run = ft_runs(1, *extra)
    base, tuned = load_source(base_run).weights, load_source(run).weights
    assert tuned["output.weight"].shape[0] == 2
    trunk = [k for k in tuned if not k.startswith("output.")]
    assert trunk and all(tuned[k].equal(base[k]) for k in trunk)  # a linear probe
    rows = _rows(run)
    gold = Counter(r["label"] for r in _read_csv(rt["val"]))
    assert rows[-1]["kind"] == "eval" and rows[-1]["n"] == sum(gold.values()) == 96
    # accuracy: the reviews of each label that it recalls, out of all of them
    recalled = sum(rows[-1][f"recall_{label}"] * count for label, count in gold.items())
    assert rows[-1]["accuracy"] == pytest.approx(recalled / 96)
    full = _rows(ft_runs(1, "model.dropout=0.1"))[-1]
    assert rows[-1]["flops"] / rows[-1]["tokens"] < 0.4 * full["flops"] / full["tokens"]
    args = cls_args(str(tmp_path), "probe", base_run, rt) + extra
    assert lmforge("finetune", *args, env={"LMFORGE_FAULT": "step@7"}, check=False).returncode
    # more validation examples asked for than task.val holds: said once, and all 96 are used
    resumed = lmforge("finetune", *args, "resume=auto", "train.eval_samples=1000").stdout
    assert _rows(os.path.join(tmp_path, "probe")) == rows
    note = (
        f"note: task.val={rt['val']} holds 96 examples, fewer than train.eval_samples=1000: "
        "evaluation uses those 96; set train.eval_samples=96, or give task.val more examples"
    )
    assert resumed.splitlines().count(note) == 1, resumed[-3000:]


def test_dry_run_says_steps_epochs_and_what_evaluation_uses(base_run, rt, tmp_path):
    """finetune --dry-run: the optimizer steps and epochs the run will take (epochs rounded up
    to whole steps), and the note when train.eval_samples asks for more than there is."""
    n_train = len(_read_csv(rt["train"]))
    args = cls_args(str(tmp_path), "dry", base_run, rt)
    out = lmforge(
        "finetune",
        *args,
        "train.max_steps=null",
        "train.epochs=1.5",
        "train.eval_samples=1000",
        "--dry-run",
    ).stdout
    steps = math.ceil(1.5 * n_train / 32)
    assert (
        f"# {steps:,} optimizer steps of 32 examples = {steps * 32 / n_train:.2f} epochs over "
        f"{n_train:,} train examples"
    ) in out.splitlines(), out[-3000:]
    assert f"# data: {n_train:,} train / 96 val examples, 2 labels" in out.splitlines()
    assert "# note: task.val=" in out and "fewer than train.eval_samples=1000" in out
    assert "# forecast (80% intervals; forecast.json):" in out and "#   step time:" in out
    assert os.listdir(tmp_path / "dry") == ["forecast.json"]  # the one file a dry run writes


def test_early_stopping_stops_stays_stopped_and_keeps_the_best(base_run, rt, tmp_path):
    """Stops at the 2nd evaluation; keep_best checkpointed the 1st (off the 4-step interval),
    kept it past keep_last=1, and the run directory now means that model."""
    args = cls_args(str(tmp_path), "es", base_run, rt) + [
        "train.eval_interval=2",
        "early_stopping.patience=1",
        "early_stopping.metric=val_loss",
        "early_stopping.min_delta=100",  # nothing counts as better: stops at the 2nd eval
        "early_stopping.keep_best=true",
        "checkpoint.keep_last=1",
    ]
    proc = lmforge("finetune", *args)
    assert "early stopping at step 4" in proc.stdout and "kept as checkpoints/best" in proc.stdout
    run = os.path.join(tmp_path, "es")
    ckpts = os.path.join(run, "checkpoints")
    assert latest_checkpoint(run) == "step_00000004"
    with open(os.path.join(ckpts, "best")) as f:
        assert f.read().strip() == "step_00000002"
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("step_")) == [
        "step_00000002",
        "step_00000004",
    ]
    with open(os.path.join(run, "forecast.json")) as f:  # an early stop is held to its forecast
        actual, errors = (fc := json.load(f))["actual"], fc["errors"]
    assert actual["step"] == 4 and not actual["complete"] and fc["wall"]["steps"] == FT_STEPS
    assert errors["wall_seconds"] is None and errors["step_seconds"] is not None
    before = _rows(run)
    lmforge("finetune", *args, "resume=auto")
    assert _rows(run) == before  # resumed: still stopped, nothing trained
    evals = {r["step"]: r["val_loss"] for r in before if r["kind"] == "eval"}
    assert evals[2] != evals[4]
    result = json.loads(lmforge("evaluate", run, "--data", rt["val"]).stdout)
    assert result["loss"] == pytest.approx(evals[2], rel=1e-5)  # the best, not the latest
    out = str(tmp_path / "report")
    lmforge("scaling", "fit", "--finetune", run, "--out", out)  # its metric is the best's too
    with open(os.path.join(out, "fit.json")) as f:
        (row,) = json.load(f)["finetune"]
    best = next(r for r in before if r["kind"] == "eval" and r["step"] == 2)
    assert row["step"] == 2 and row["value"] == best["accuracy"]
    assert row["finetune_flops"] == best["flops"]


# --------------------------------------------------------------------------------------------
# export: transformers gives the same logits, generations, labels and token ids
# --------------------------------------------------------------------------------------------

TEXTS = [
    "The film is a triumph.",
    " leading space, then  two spaces and a tab\there",
    "Naïve café déjà vu — «quotes» 日本語 🙂 1234.5",
    "To be, or not to be: that is the question.\nWhether 'tis nobler",
]


def _lmforge_outputs(src, model, rows: list[dict]) -> list[torch.Tensor]:
    """lmforge's own inference on labelled rows: its preprocessing (finetune/data.py, as in
    `lmforge evaluate`) and the model's outputs at the positions it labels, one (n, labels)
    tensor per example."""
    from lmforge.finetune.config import TaskConfig
    from lmforge.finetune.data import IGNORE, tokenize
    from lmforge.pretrain.data.tokenizer import load_tokenizer

    keys = TaskConfig.__dataclass_fields__
    task = TaskConfig(**{k: v for k, v in src.task.items() if k in keys})
    examples, _, _ = tokenize(task, load_tokenizer(src.tokenizer), rows, source="rows", labels=None)
    assert len(examples) == len(rows)
    out = []
    with torch.no_grad():
        for i in range(len(examples)):
            batch = examples.batch([i])
            out.append(model(batch["input_ids"])[0][batch["labels"][0] != IGNORE])
    return out


def _assert_card(out: str, *, pipeline_tag: str, tokenizer, metrics: dict) -> dict:
    """The export's README.md has the front matter the Hub reads (checked offline with
    huggingface_hub), the evaluated ``metrics`` in its model-index, and states the
    preprocessing the tokenizer files hold; no exported file names a path of this machine."""
    import yaml
    from huggingface_hub import ModelCard, metadata_load

    path = os.path.join(out, "README.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("---\n"), text[:200]
    meta = yaml.safe_load(text.split("---\n", 2)[1])
    assert meta == metadata_load(path)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == pipeline_tag
    assert meta["license"] and "lmforge" in meta["tags"] and pipeline_tag in meta["tags"]
    card = ModelCard.load(path)  # a local file: parsed and checked without the network
    results = {r.metric_type: r for r in card.data.eval_results}
    assert {k: r.metric_value for k, r in results.items()} == pytest.approx(metrics)
    assert {r.task_type for r in results.values()} == {pipeline_tag}
    for key in ("model_max_length", "truncation_side", "padding_side"):
        assert f"`{key}: {getattr(tokenizer, key)}`" in text, key
    where = {tempfile.gettempdir(), REPO, os.path.expanduser("~"), os.path.dirname(out)}
    for name in os.listdir(out):
        if name.endswith((".safetensors", ".model")):
            continue
        with open(os.path.join(out, name), encoding="utf-8") as f:
            content = f.read()
        leaked = [w for w in where if w in content]
        assert not leaked, (name, leaked)
    return meta


def _eval_metrics(run: str, names: dict[str, str]) -> dict:
    """The run's last eval row, as model-index metric types (``names``: row key -> type)."""
    last = [r for r in _rows(run) if r["kind"] == "eval"][-1]
    return {kind: last[key] for key, kind in names.items()}


def _assert_tokenizer_matches(export_dir: str, sp_path: str) -> None:
    from transformers import AutoTokenizer

    from lmforge.pretrain.data.tokenizer import load_tokenizer

    hf, ours = (
        AutoTokenizer.from_pretrained(export_dir, local_files_only=True),
        load_tokenizer(sp_path),
    )
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == ours.decode(ids)


def test_export_causal_lm_matches_transformers(base_run, base_export):
    from transformers import AutoModelForCausalLM

    from lmforge.finetune.model import build_model
    from lmforge.pretrain.checkpoint.model_source import load_source

    out = base_export
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "README.md",
        "lmforge.json",
        "tokenizer.model",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    src = load_source(base_run)
    ours = build_model(src)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    x = torch.randint(0, src.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-5
    prompt = torch.tensor([[5, 17, 42, 99]])
    mine = ours.generate(prompt, 20, temperature=0.0)
    theirs = hf.generate(
        prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20, eos_token_id=None
    )
    assert mine.tolist() == theirs.tolist()
    _assert_tokenizer_matches(out, src.tokenizer)
    # `lmforge generate` streams what greedy decoding gives, from the export and the run alike
    from lmforge.pretrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(src.tokenizer)
    ids = torch.tensor([tok.encode("To be, or not to be")])
    want = tok.decode(ours.generate(ids, 12, temperature=0.0)[0, ids.shape[1] :])
    assert want  # text to compare (a base model this small may continue with newlines only)
    for where in (out, base_run):
        args = ["--prompt", "To be, or not to be", "--max-new-tokens", "12", "--temperature", "0"]
        assert lmforge("generate", where, *args).stdout == want + "\n"
    # the export is itself a model directory lmforge reads back identically
    again = load_source(out)
    assert again.kind == "hf"
    assert all(again.weights[k].equal(v) for k, v in src.weights.items())
    # A prompt longer than the context: lmforge generates from its last max_seq_len tokens, as
    # transformers does from the tokenizer's truncation=True; batches pad on the left.
    hf_tok, ctx = _left_truncating_tokenizer(out, src.model.max_seq_len)
    long = " ".join(["To be, or not to be, that is the question."] * 12)
    ids = tok.encode(long)
    assert len(ids) > ctx
    cut = hf_tok(long, truncation=True, return_tensors="pt")["input_ids"]
    assert cut[0].tolist() == ids[-ctx:]
    first = ours.generate(torch.tensor([ids]), 1, temperature=0.0)[0, -1]
    with torch.no_grad():
        assert hf(cut).logits[0, -1].argmax() == first
    meta = _assert_card(
        out,
        pipeline_tag="text-generation",
        tokenizer=hf_tok,
        metrics=_eval_metrics(base_run, {"val_loss": "loss", "val_ppl": "perplexity"}),
    )
    assert "base_model" not in meta  # pretrained here: no base model to name


def test_foreign_hf_llama_directory_loads(tiny_data, tmp_path):
    """A directory written by transformers itself (no lmforge files but the tokenizer)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.finetune.model import build_model
    from lmforge.pretrain.checkpoint.model_source import load_source

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    shutil.copyfile(
        os.path.join(tiny_data, "tokenizer.model"), tmp_path / "llama" / "tokenizer.model"
    )
    src = load_source(str(tmp_path / "llama"))
    assert (src.model.n_kv_head, src.model.hidden_dim, src.model.norm_eps) == (2, 160, 1e-6)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (build_model(src)(x) - hf(x).logits).abs().max().item() <= 1e-5


def test_evaluate_perplexity_of_text_files(base_run, tmp_path):
    from lmforge.finetune.model import build_model
    from lmforge.pretrain.checkpoint.model_source import load_source
    from lmforge.pretrain.data.tokenizer import load_tokenizer

    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    (tmp_path / "a.txt").write_text(text)
    result = json.loads(lmforge("evaluate", base_run, "--text", str(tmp_path / "a.txt")).stdout)
    src = load_source(base_run)
    ids = torch.tensor([load_tokenizer(src.tokenizer).encode(text)])
    assert ids.shape[1] <= src.model.max_seq_len + 1  # one window
    with torch.no_grad():
        logits = build_model(src)(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()
    assert result["tokens"] == ids.shape[1] - 1
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_export_classifier_matches_transformers(ft_runs, rt, tmp_path):
    """task.max_len (48) is shorter than the context (64): transformers with the usual
    truncation=True must read what lmforge reads, the last 48 tokens, on every review."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from lmforge.finetune.model import build_model
    from lmforge.pretrain.checkpoint.model_source import load_source
    from lmforge.pretrain.data.tokenizer import load_tokenizer

    run = ft_runs(1, "model.dropout=0.0")
    out = str(tmp_path / "cls")
    lmforge("export", run, "--out", out)
    src = load_source(run)
    ours = build_model(src)
    hf = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert hf.config.id2label == {0: "fresh", 1: "rotten"}
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    # a classifier reads the end of the text, padded on the right
    assert (tok.model_max_length, tok.truncation_side, tok.padding_side) == (48, "left", "right")
    rows = _read_csv(rt["val"])
    texts = [r["text"] for r in rows]
    lengths = [len(load_tokenizer(src.tokenizer).encode(t)) for t in texts]
    assert min(lengths) < 48 < src.model.max_seq_len < max(lengths)
    mine = torch.cat(_lmforge_outputs(src, ours, rows))  # (reviews, labels)
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**batch).logits  # (B, labels) at the last non-padding token
    assert (mine - theirs).abs().max().item() <= 1e-5
    assert mine.argmax(-1).tolist() == theirs.argmax(-1).tolist()
    # the pipeline a Hub user calls (one review at a time: no padding)
    classify = pipeline("text-classification", model=out, truncation=True, top_k=None)
    for scores, probs in zip(classify(texts), mine.softmax(-1), strict=True):
        got = {d["label"]: d["score"] for d in scores}
        assert [got["fresh"], got["rotten"]] == pytest.approx(probs.tolist(), abs=1e-5)
    # lmforge evaluate on the exported model gives the run's last validation metrics, and so
    # does transformers
    proc = lmforge("evaluate", out, "--data", rt["val"])
    result = json.loads(proc.stdout)
    last = [r for r in _rows(run) if r["kind"] == "eval"][-1]
    assert result["accuracy"] == pytest.approx(last["accuracy"])
    assert result["macro_f1"] == pytest.approx(last["macro_f1"])
    gold = torch.tensor([hf.config.label2id[r["label"]] for r in rows])
    assert (theirs.argmax(-1) == gold).double().mean().item() == pytest.approx(last["accuracy"])
    names = {"val_loss": "loss", "accuracy": "accuracy", "macro_f1": "f1"}
    meta = _assert_card(
        out, pipeline_tag="text-classification", tokenizer=tok, metrics=_eval_metrics(run, names)
    )
    assert "datasets" not in meta  # local files: named in the card's text, not as Hub datasets
    assert "base_model" not in meta  # a local lmforge run: no Hub id to name


# --------------------------------------------------------------------------------------------
# token classification and sft
# --------------------------------------------------------------------------------------------

PEOPLE = ["Hamlet", "Ophelia", "Romeo", "Juliet", "Viola", "Portia", "Prospero", "Lear"]
PLACES = ["Denmark", "Verona", "Venice", "Illyria", "Athens", "Rome", "Milan", "Padua"]
VERBS = ["sailed to", "wrote from", "dreamed of", "returned to", "spoke of", "fled to"]


def _tagging_rows(n: int, seed: int) -> list[dict]:
    """Sentences with person (one or two words) and place entities, BIO-tagged."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person = rng.choice(PEOPLE).split() + ([rng.choice(PEOPLE)] if rng.random() < 0.3 else [])
        place = rng.choice(PLACES)
        verb = rng.choice(VERBS).split()
        words = ["Then", *person, *verb, place, "."]
        tags = (
            ["O"] + ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O"] * len(verb) + ["B-LOC", "O"]
        )
        rows.append({"tokens": words, "tags": tags})
    return rows


def test_token_classification_learns_and_exports(base_run, tmp_path):
    from transformers import AutoModelForTokenClassification

    from lmforge.finetune.model import build_model
    from lmforge.pretrain.checkpoint.model_source import load_source

    for split, n, seed in (("train", 400, 0), ("val", 64, 1)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in _tagging_rows(n, seed))
    run = str(tmp_path / "tag")
    lmforge(
        "finetune",
        f"runs_dir={tmp_path}",
        "name=tag",
        f"init_from={base_run}",
        "task.type=token_classification",
        f"task.train={tmp_path}/train.jsonl",
        f"task.val={tmp_path}/val.jsonl",
        *FT_COMMON,
        "train.max_steps=30",
        "train.eval_interval=15",
        "optim.lr=3e-3",
    )
    last = [r for r in _rows(run) if r["kind"] == "eval"][-1]
    assert {"f1_PER", "f1_LOC", "precision", "recall", "accuracy"} <= last.keys()
    assert last["f1"] > 0.8, last
    proc = lmforge("evaluate", run, "--data", f"{tmp_path}/val.jsonl")
    assert json.loads(proc.stdout)["f1"] == pytest.approx(last["f1"])
    out = str(tmp_path / "hf")
    lmforge("export", run, "--out", out)
    src = load_source(run)
    ours = build_model(src)
    hf = AutoModelForTokenClassification.from_pretrained(out, local_files_only=True).eval()
    x = torch.randint(0, src.model.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5
    assert hf.config.id2label[0] == src.task["labels"][0]
    # Sentences joined into examples longer than task.max_len (48, shorter than the context
    # of 64), and short ones: lmforge keeps the first words that fit in 48 tokens; transformers'
    # truncation=True on the words (is_split_into_words) keeps the first 48 tokens.
    from transformers import AutoTokenizer

    from lmforge.pretrain.data.tokenizer import load_tokenizer

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (tok.model_max_length, tok.truncation_side, tok.padding_side) == (48, "right", "right")
    sentences = _tagging_rows(24, 2)
    rows = sentences[:4] + [
        {key: sum((r[key] for r in sentences[i : i + 5]), []) for key in ("tokens", "tags")}
        for i in range(4, 24, 5)
    ]
    mine = _lmforge_outputs(src, ours, rows)  # (words lmforge labels, labels) per example
    enc = tok(
        [r["tokens"] for r in rows],
        is_split_into_words=True,
        truncation=True,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = hf(**enc).logits
    sp, cut = load_tokenizer(src.tokenizer), 0
    for i, (row, kept) in enumerate(zip(rows, mine, strict=True)):
        word_ids = enc.word_ids(i)
        first: dict[int, int] = {}  # word -> its first sub-word's position
        for pos, word in enumerate(word_ids):
            if word is not None:
                first.setdefault(word, pos)
        assert list(first) == list(range(len(first)))
        n = len(kept)
        assert (logits[i, list(first.values())[:n]] - kept).abs().max().item() <= 1e-5
        # a word cut at the limit: transformers keeps its first sub-words, lmforge drops it
        assert len(first) - n in (0, 1), (len(first), n)
        if len(first) > n:
            assert word_ids.count(n) < len(sp.encode(row["tokens"][n]))
        cut += n < len(row["tokens"])
    assert cut == 4
    names = {"val_loss": "loss", "f1": "f1", "precision": "precision", "recall": "recall"}
    names["accuracy"] = "accuracy"
    _assert_card(
        out, pipeline_tag="token-classification", tokenizer=tok, metrics=_eval_metrics(run, names)
    )


def test_sft_lora_packing_samples_and_merged_export(base_export, rt, tmp_path):
    """SFT with LoRA and packing, started from a Hugging Face directory (the base's export)."""
    from transformers import AutoModelForCausalLM

    from lmforge.finetune.model import build_model
    from lmforge.pretrain.checkpoint.model_source import load_source

    reviews = _read_csv(rt["train"])[:200]
    pairs = [
        {"prompt": f"Is this review fresh or rotten? {r['text']}", "response": r["label"]}
        for r in reviews
    ]
    train = _write_csv(tmp_path / "sft.csv", pairs)
    run = str(tmp_path / "sft")
    args = [
        "finetune",
        f"runs_dir={tmp_path}",
        "name=sft",
        f"init_from={base_export}",
        "task.type=sft",
        f"task.train={train}",
        "task.packing=true",
        "lora.enabled=true",
        "lora.r=4",
        *FT_COMMON,
        "task.max_len=48",  # shorter than the context (64)
        "train.samples=2",
        "train.sample_tokens=4",
    ]
    # Killed at step 7, after the step-6 evaluation and its samples; the resume from step 4
    # evaluates step 6 again and must not keep the first attempt's samples.
    assert lmforge(*args, env={"LMFORGE_FAULT": "step@7"}, check=False).returncode != 0
    lmforge(*args, "resume=auto")
    rows = _rows(run)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] * 1.5
    with open(os.path.join(run, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["step"] for s in samples] == [r["step"] for r in evals for _ in range(2)]
    assert samples[0]["prompt"].startswith("Is this review")
    src = load_source(run)
    assert src.lora is not None and src.task["type"] == "sft"
    merged = build_model(src)
    unmerged = build_model(src, merge=False)
    x = torch.randint(0, src.model.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (merged(x) - unmerged(x)).abs().max().item() <= 1e-5
    out = str(tmp_path / "hf")
    lmforge("export", run, "--out", out)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        assert (merged(x) - hf(x).logits).abs().max().item() <= 1e-5
    # streamed generation == greedy decoding in-process (with the template, then raw)
    from lmforge.pretrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(src.tokenizer)

    def greedy(text: str) -> str:
        ids = torch.tensor([tok.encode(text)])
        new = merged.generate(ids, 8, temperature=0.0, stop_ids=(tok.eos_id,))[0, ids.shape[1] :]
        new = new.tolist()
        return tok.decode(new[: new.index(tok.eos_id)] if tok.eos_id in new else new)

    prompt, raw = "Is this review fresh or rotten? Dull.", "To be, or not to be"
    cases = [([], prompt, src.task["template"].replace("{prompt}", prompt)), (["--raw"], raw, raw)]
    for flags, given, text in cases:
        args = ["--prompt", given, *flags, "--max-new-tokens", "8", "--temperature", "0"]
        assert lmforge("generate", out, *args).stdout == greedy(text) + "\n"
    # transformers: the tokenizer's chat template is the task's template; a batch of prompts
    # (padded on the left) generates what lmforge generates from each prompt

    from lmforge.finetune.inference import generate

    hf_tok, ctx = _left_truncating_tokenizer(out, src.model.max_seq_len)
    prompts = [prompt, "Is this review fresh or rotten? A gorgeous, witty, seductive movie."]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    templated = [src.task["template"].replace("{prompt}", p) for p in prompts]
    kwargs = {"add_generation_prompt": True, "truncation": True}
    assert [hf_tok.apply_chat_template(c, tokenize=False, **kwargs) for c in chats] == templated
    enc = hf_tok.apply_chat_template(chats, padding=True, return_tensors="pt", **kwargs)
    with torch.no_grad():
        new = hf.generate(**enc, max_new_tokens=8, do_sample=False)[:, enc["input_ids"].shape[1] :]
    rows = [row[: row.index(tok.eos_id)] if tok.eos_id in row else row for row in new.tolist()]
    assert [tok.decode(row) for row in rows] == [greedy(t) for t in templated]
    # a prompt longer than the context: lmforge generates from its last 64 tokens, as
    # transformers does from truncation=True
    long = "Is this review fresh or rotten? " + " ".join(r["text"] for r in reviews[:6])
    ids = hf_tok.apply_chat_template([{"role": "user", "content": long}], **kwargs)["input_ids"]
    want = tok.encode(src.task["template"].replace("{prompt}", long))
    assert len(want) > ctx and ids == want[-ctx:]
    with torch.no_grad():
        first = hf(torch.tensor([ids])).logits[0, -1].argmax().item()
    stream = io.StringIO()
    generate(out, prompt=long, max_new_tokens=1, temperature=0.0, stream=stream)
    assert stream.getvalue() == tok.decode([first]) + "\n"
    with pytest.raises(Exception, match="one user message"):
        hf_tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *chats[0]])
    _assert_card(
        out,
        pipeline_tag="text-generation",
        tokenizer=hf_tok,
        metrics=_eval_metrics(run, {"val_loss": "loss", "val_ppl": "perplexity"}),
    )


def test_sft_example_masks_the_prompt(tiny_data):
    from lmforge.finetune.data import IGNORE, pack, sft_example
    from lmforge.finetune.prompts import PromptFormat
    from lmforge.pretrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(tiny_data, "tokenizer.model"))
    fmt = PromptFormat(tok, "Q: {prompt}\nA:")
    ids, labels = sft_example(fmt, "Who?", " Hamlet", max_len=64)
    p = tok.encode("Q: Who?\nA:")
    r = tok.encode(" Hamlet") + [tok.eos_id]
    assert ids == (p + r)[:-1]
    assert labels == [IGNORE] * (len(p) - 1) + r  # loss on the response (and EOS) only
    cut_ids, cut_labels = sft_example(fmt, "x " * 100, "y " * 100, max_len=20)
    assert len(cut_ids) == len(cut_labels) == 20 and cut_labels[-1] != IGNORE
    packed = pack([(ids, labels)] * 5, max_len=len(ids) * 2)
    assert len(packed) == 3 and packed[0][0] == ids + ids


def test_empty_labels_tags_and_prompts(tmp_path):
    """Empty or missing labels and tags are refused in one line that counts them (also as a
    JSONL null or NaN); a missing value spelled as a label ('NaN') unless task.labels declares
    it; an sft row with an empty prompt is skipped with a warning, like one with an empty
    response."""
    from lmforge.finetune.config import TaskConfig
    from lmforge.finetune.data import check_labels, read_rows, skip_empty_rows
    from lmforge.pretrain.core.errors import ConfigurationError, DataError

    csv_path = tmp_path / "t.csv"
    csv_path.write_text("text,label\na,fresh\nb,\nc,NaN\nd,rotten\ne,  \n")
    with pytest.raises(DataError) as exc:
        read_rows(TaskConfig(train=str(csv_path)), str(csv_path), split="train")
    assert str(exc.value) == (
        f"2 of 5 rows of {csv_path} have an empty label in `label` (empty, whitespace or null); "
        "drop those rows or give them their label"
    )
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n')
    with pytest.raises(DataError, match=r"^1 of 2 rows of .* have an empty label"):
        read_rows(TaskConfig(train=str(jsonl)), str(jsonl), split="train")

    spelled = [{"text": "a", "label": "fresh"}, {"text": "b", "label": "NaN"}]
    with pytest.raises(DataError) as exc:
        check_labels(TaskConfig(train="t"), spelled, source="t")
    assert str(exc.value) == (
        "1 of 2 rows of t have the label 'NaN' in `label`, a missing value written as text; "
        "drop those rows, or set `task.labels` to the label set (with 'NaN') if it is a real label"
    )
    check_labels(TaskConfig(train="t", labels=["fresh", "NaN"]), spelled, source="t")
    with pytest.raises(ConfigurationError, match=r"`task.labels` has an empty label"):
        TaskConfig(train="t", labels=["fresh", " "])

    ner = TaskConfig(type="token_classification", train="n")
    tags = [{"tokens": ["a", "b"], "tags": t} for t in (["O", "B-X"], ["O", ""], [None, "O"])]
    with pytest.raises(DataError) as exc:
        check_labels(ner, tags, source="n")
    assert str(exc.value) == (
        "2 of 3 rows of n have an empty tag in `tags` (empty, whitespace or null); drop those "
        "rows or tag every word ('O' outside an entity)"
    )

    sft = TaskConfig(type="sft", train="s")
    pairs = [{"prompt": p, "response": "r"} for p in ("hi", "", " ", None, "yo")]
    said: list[str] = []
    assert len(skip_empty_rows(sft, pairs, source="s", warn=said.append)) == 2
    assert said == [
        "warning: 3 of 5 rows of s have an empty `prompt` (empty, whitespace or null); "
        "they are skipped"
    ]


# --------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing written
# --------------------------------------------------------------------------------------------


def _fails(*args: str) -> str:
    """`lmforge ARGS`, which fails before any training process starts, run in this process: its
    one error line."""
    from lmforge.launcher.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    assert code != 0
    lines = [line for line in err.getvalue().strip().splitlines() if line.strip()]
    assert len(lines) == 1, err.getvalue()
    return lines[0]


def test_bad_inputs_fail_with_one_line(base_run, ft_runs, rt, tmp_path):
    common = [f"runs_dir={tmp_path}", "name=bad", f"init_from={base_run}", *FT_COMMON]
    no_col = _write_csv(tmp_path / "nocol.csv", [{"review": "fine", "label": "fresh"}])
    msg = _fails("finetune", *common, f"task.train={no_col}")
    assert "no column 'text'" in msg and "task.text_column" in msg
    (tmp_path / "empty.csv").write_text("text,label\n")
    msg = _fails("finetune", *common, f"task.train={tmp_path / 'empty.csv'}")
    assert "no examples" in msg
    msg = _fails("finetune", *common, f"task.train={rt['train']}", "model.d_model=256")
    assert "model.d_model=256" in msg and "init_from" in msg
    # a tokenizer that is not the checkpoint's (another vocabulary)
    other = tmp_path / "other.model"
    from lmforge.pretrain.data.tokenizer import train_tokenizer

    train_tokenizer(
        texts=[r["text"] for r in _read_csv(rt["train"])], out_path=other, vocab_size=400
    )
    msg = _fails("finetune", *common, f"task.train={rt['train']}", f"tokenizer={other}")
    assert "tokenizer" in msg
    assert not os.path.exists(os.path.join(tmp_path, "bad"))
    unseen = _write_csv(tmp_path / "unseen.csv", [{"text": "meh", "label": "so-so"}])
    msg = _fails("evaluate", ft_runs(1, "model.dropout=0.0"), "--data", unseen)
    assert "'so-so'" in msg and "label set" in msg
    msg = _fails("evaluate", base_run, "--data", unseen)
    assert "no task" in msg


def test_submit_places_a_finetune_job_in_its_run(tmp_path):
    proc = lmforge(
        "submit",
        "configs/slurm/local.yaml",
        "--dry-run",
        "--no-preflight",  # (the demo's base run is not there: where the job goes is the point)
        "--",
        "finetune",
        "configs/finetune/demo.yaml",
        f"runs_dir={tmp_path}",
        "name=ft",
    )
    assert "-- finetune configs/finetune/demo.yaml" in proc.stdout and "resume=auto" in proc.stdout
    assert f"{tmp_path}/ft/slurm/" in proc.stdout  # script and log beside the run


def _left_truncating_tokenizer(out: str, ctx: int):
    """An export's tokenizer for generation: the context as its length, cut and padded on the
    left as lmforge generate does."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (hf_tok.model_max_length, hf_tok.truncation_side, hf_tok.padding_side) == (
        ctx,
        "left",
        "left",
    )
    return hf_tok, ctx
