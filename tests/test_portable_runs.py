"""A run directory carries what it needs: moved to another place, with the prepared data it was
trained on moved away, every command that reads it works; `resume` finds the data at its new
path by its checksums and refuses other data; checkpoints written before they carried their
tokenizer still work through the file they name.

One short run (real processes), moved once; the reading commands run in this process through
the CLI's own entry point (they start no process group), the training ones as processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from lmforge.pretrain.checkpoint.store import read_trainer_state, verify_checkpoint
from tests.conftest import lmforge
from tests.runs import TINY, _rows, read_metrics

TOKENIZER_FILE = "tokenizer.model"
STEPS = 4
RUN = [*TINY, f"train.max_steps={STEPS}", "checkpoint.interval=2", "logging.plot=false"]


def paths_inside(root: str, *needles: str) -> dict[str, list[str]]:
    """Every file under ``root`` (binary ones too) that holds one of ``needles``: its path
    relative to ``root`` and the lines that do (``<binary>`` for a file that is not text)."""
    found: dict[str, list[str]] = {}
    for parent, _, names in os.walk(root):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                data = f.read()
            if not any(n.encode() in data for n in needles):
                continue
            try:
                lines = data.decode("utf-8").splitlines()
            except UnicodeDecodeError:
                lines = ["<binary>"]
            rel = os.path.relpath(path, root)
            found[rel] = [ln for ln in lines if ln == "<binary>" or any(n in ln for n in needles)]
    return found


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process: exit code, stdout, stderr."""
    from lmforge.launcher.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def moved(tiny_data, tmp_path_factory) -> dict[str, str]:
    """A short run trained on its own copy of the data under `scratch/`, then the run moved to
    `home/runs/` and the data to `archive/` (nothing is left where it was trained)."""
    base = tmp_path_factory.mktemp("portable")
    scratch = base / "scratch"
    data, runs = str(scratch / "plays"), str(scratch / "runs")
    shutil.copytree(tiny_data, data)
    lmforge("pretrain", f"data.path={data}", f"runs_dir={runs}", "name=small", *RUN)
    home, archive = base / "home" / "runs", str(base / "archive" / "plays")
    home.mkdir(parents=True)
    shutil.move(os.path.join(runs, "small"), str(home / "small"))
    shutil.move(data, archive)
    shutil.rmtree(scratch)
    return {
        "run": str(home / "small"),
        "runs": str(home),
        "data": archive,
        "old_data": data,
        "old_runs": runs,
    }


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "lines.txt"
    path.write_text("Now is the winter of our discontent\nmade glorious summer.\n" * 4)
    return str(path)


def test_every_checkpoint_carries_the_tokenizer_and_no_path(moved):
    run, data = moved["run"], moved["data"]
    root = os.path.join(run, "checkpoints")
    steps = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    assert steps == ["step_00000002", "step_00000004"]
    want = _sha(os.path.join(data, TOKENIZER_FILE))
    for step in steps:
        ckpt = os.path.join(root, step)
        manifest = verify_checkpoint(ckpt)
        assert manifest["files"][TOKENIZER_FILE]["sha256"] == want  # hashed like every file
        state = read_trainer_state(ckpt)
        assert state["tokenizer"] == TOKENIZER_FILE and state["tokenizer_sha256"] == want
        assert isinstance(state["data_sha256"], str)
    # The old places appear only where no command reads them: the resolved config as it was
    # given (data.path, runs_dir) and the command line of each attempt (provenance.jsonl).
    old = (moved["old_data"], moved["old_runs"])
    found = paths_inside(run, *old)
    configs = {os.path.join("checkpoints", s, "config.yaml") for s in steps}
    assert "config.yaml" in found and set(found) <= {"config.yaml", "provenance.jsonl", *configs}
    for rel, lines in found.items():
        for line in lines:
            if rel.endswith("config.yaml"):
                assert line.strip().startswith(("runs_dir:", "path:")), f"{rel}: {line}"
            else:
                record = json.loads(line)
                del record["argv"]
                assert not any(p in json.dumps(record) for p in old), f"{rel}: {line}"


def test_a_moved_run_works_without_its_data(moved, tmp_path, capsys, text_file):
    """evaluate, generate, consolidate, export, `lmforge runs` and finetune init_from= on the
    moved run, its data gone from where it was prepared."""
    run = moved["run"]
    assert not os.path.exists(moved["old_data"])
    code, out, err = _cli(capsys, "evaluate", run, "--text", text_file)
    assert code == 0, err
    assert json.loads(out)["tokens"] > 0
    code, out, err = _cli(capsys, "generate", run, "--prompt", "Now is", "--max-new-tokens", "4")
    assert code == 0 and out.strip(), err
    tokenizer = _sha(os.path.join(moved["data"], TOKENIZER_FILE))
    for command in ("consolidate", "export"):
        out_dir = str(tmp_path / command)
        code, _, err = _cli(capsys, command, run, "--out", out_dir)
        assert code == 0, err
        assert _sha(os.path.join(out_dir, TOKENIZER_FILE)) == tokenizer
    consolidated = str(tmp_path / "consolidate")
    code, _, err = _cli(
        capsys, "generate", consolidated, "--prompt", "Now is", "--max-new-tokens", "2"
    )
    assert code == 0, err
    code, out, err = _cli(capsys, "runs", "--runs-dir", moved["runs"])
    assert code == 0 and "small" in out and "step_00000004" in out, out + err

    labelled = tmp_path / "labelled.csv"
    rows = ["text,label"] + [
        f"{'a merry jest' if i % 2 else 'a bitter grief'} {i},{'pos' if i % 2 else 'neg'}"
        for i in range(24)
    ]
    labelled.write_text("\n".join(rows) + "\n")
    ft_runs = str(tmp_path / "ft")
    lmforge(
        "finetune",
        f"init_from={run}",
        f"task.train={labelled}",
        f"runs_dir={ft_runs}",
        "name=cls",
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.precision=fp32",
        "task.max_len=16",
        "checkpoint.interval=2",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    )
    ft_ckpt = os.path.join(ft_runs, "cls", "checkpoints", "step_00000002")
    assert _sha(os.path.join(ft_ckpt, TOKENIZER_FILE)) == tokenizer


def test_resume_finds_moved_data_by_its_checksums(moved, tmp_path):
    """The run moved again, the data at its new path: resume from step 2 gives the run it was,
    exactly. Other data (same tokenizer, same size, another content) is refused in one line that
    names both and the fix, before anything is written."""
    run = str(tmp_path / "runs" / "small")
    shutil.copytree(moved["run"], run)
    want = _rows(run)
    args = [f"runs_dir={tmp_path / 'runs'}", "name=small", *RUN]
    ckpt = os.path.join(run, "checkpoints", "step_00000002")
    lmforge("pretrain", f"data.path={moved['data']}", *args, f"resume={ckpt}")
    assert _rows(run) == want

    other = str(tmp_path / "other")
    shutil.copytree(moved["data"], other)
    shard = os.path.join(other, "train_00000.bin")
    manifest_path = os.path.join(other, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == ["train_00000.bin"]
    np.roll(np.fromfile(shard, dtype=manifest["dtype"]), 1).tofile(shard)
    manifest["splits"]["train"]["shards"][0]["sha256"] = _sha(shard)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    rows = read_metrics(run)
    out = lmforge("pretrain", f"data.path={other}", *args, "resume=auto", check=False)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr, out.stderr
    assert f"trained on other data than data.path={other}" in last, last
    # (the checkpoint of the resumed attempt: the data was where it names it then)
    assert f"data.path={moved['data']} then" in last and "resume with data.path=" in last, last
    assert read_metrics(run) == rows


def _as_written_before(ckpt: str, tokenizer: str) -> None:
    """Make ``ckpt`` what checkpoints were before they carried their tokenizer: no
    tokenizer.model, the trainer state naming ``tokenizer`` by its absolute path, no data
    checksum; the manifest resealed."""
    os.remove(os.path.join(ckpt, TOKENIZER_FILE))
    state = read_trainer_state(ckpt)
    state["tokenizer"] = tokenizer
    del state["data_sha256"]
    data = json.dumps(state, indent=1).encode()
    with open(os.path.join(ckpt, "trainer_state.json"), "wb") as f:
        f.write(data)
    mpath = os.path.join(ckpt, "manifest.json")
    with open(mpath) as f:
        manifest = json.load(f)
    del manifest["files"][TOKENIZER_FILE]
    manifest["files"]["trainer_state.json"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=1)


def test_older_checkpoints_use_the_tokenizer_they_name(moved, tmp_path, capsys, text_file):
    """A checkpoint without tokenizer.model reads the tokenizer its trainer state names; a
    different file there is refused; without either, the error says where to copy it."""
    from lmforge.pretrain.checkpoint.model_source import load_source

    ckpt = str(tmp_path / "step_00000002")
    shutil.copytree(os.path.join(moved["run"], "checkpoints", "step_00000002"), ckpt)
    named = str(tmp_path / "data" / TOKENIZER_FILE)
    os.makedirs(os.path.dirname(named))
    shutil.copyfile(os.path.join(moved["data"], TOKENIZER_FILE), named)
    _as_written_before(ckpt, named)
    verify_checkpoint(ckpt)
    assert load_source(ckpt).tokenizer == named
    code, out, err = _cli(capsys, "evaluate", ckpt, "--text", text_file)
    assert code == 0 and json.loads(out)["tokens"] > 0, err

    good = open(named, "rb").read()
    with open(named, "wb") as f:  # prepared again in the same place, with another tokenizer
        f.write(good[::-1])
    code, _, err = _cli(capsys, "evaluate", ckpt, "--text", text_file)
    last = err.strip().splitlines()[-1]
    assert code == 2 and f"{named} is not the tokenizer {ckpt} was trained with" in last, err
    assert f"to {os.path.join(ckpt, TOKENIZER_FILE)}" in last, err

    os.remove(named)
    code, _, err = _cli(capsys, "generate", ckpt, "--prompt", "Now is", "--max-new-tokens", "2")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "no tokenizer found" in last and f"into {ckpt}" in last, err
    with open(os.path.join(ckpt, TOKENIZER_FILE), "wb") as f:  # the fix the line names
        f.write(good)
    code, out, err = _cli(capsys, "generate", ckpt, "--prompt", "Now is", "--max-new-tokens", "2")
    assert code == 0 and out.strip(), err
