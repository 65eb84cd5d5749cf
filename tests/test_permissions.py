"""What lmforge writes for people to use gets the modes the user's umask gives any new file or
directory (0o666 & ~umask, 0o777 & ~umask): an export or a plan made under umask 022 can be read
by others, one made under 077 by nobody else. Temp directories and files (mkdtemp, mkstemp) are
made private; every writer that renames one into place must widen it again.

One child process per umask prepares a play, trains a tiny run (2 steps, a checkpoint), and
consolidates, exports and plans from it, finetunes a classifier from it (1 step) and writes that
one's `evaluate --predictions`; this process then reads the modes of what it made (the umask is
set only in the child: tests share this process)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, plays_dir
from tests.runs import TINY

CHILD = textwrap.dedent(
    """
    import os, sys
    os.umask(int(sys.argv[1], 8))  # before anything runs: every thread and child inherits it
    base, play = sys.argv[2], sys.argv[3]
    from lmforge.launcher.cli import main
    from lmforge.pretrain.core.durable import umask

    assert umask() == int(sys.argv[1], 8), oct(umask())  # read, and left as it was

    data = os.path.join(base, "data")
    runs = os.path.join(base, "runs")
    steps = [
        ["prepare", f"out={data}", f"sources=[{{path: '{play}', text_unit: paragraph}}]",
         "tokenizer.vocab_size=512", "val_fraction=0.1", "num_proc=1"],
        ["pretrain", f"data.path={data}", f"runs_dir={runs}", "name=r", *sys.argv[4:],
         "train.max_steps=2", "checkpoint.interval=2", "logging.plot=false"],
        ["consolidate", os.path.join(runs, "r"), "--out", os.path.join(base, "consolidated")],
        ["export", os.path.join(runs, "r"), "--out", os.path.join(base, "export")],
        ["plan", f"data.path={data}", "--flops", "1e17", "--law", "hoffmann",
         "--out", os.path.join(base, "plan")],
        ["finetune", f"runs_dir={runs}", "name=cls", f"init_from={os.path.join(runs, 'r')}",
         f"task.train={os.path.join(base, 'task.csv')}", "task.max_len=32",
         "train.max_steps=1", "train.micro_batch_size=4", "train.global_batch_size=4",
         "train.precision=fp32", "logging.plot=false", "logging.tensorboard=false"],
        ["evaluate", os.path.join(runs, "cls"), "--data", os.path.join(base, "task.csv"),
         "--predictions", os.path.join(base, "predictions.jsonl")],
    ]
    with open(os.path.join(base, "task.csv"), "w") as f:
        f.write("text,label\\n" + "".join(f"line {i} of a tale,{i % 2}\\n" for i in range(12)))
    for argv in steps:
        code = main(argv)
        if code:
            sys.exit(f"lmforge {argv[0]} exited {code}")
    """
)


def _modes(root: str) -> dict[str, int]:
    """The permission bits of ``root`` and of everything under it, by relative path."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for where, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(where, name)
            if not os.path.islink(path):
                found[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_everything_written_gets_the_umask_mode(umask, tmp_path):
    comedies = os.path.join(plays_dir(), "comedies")
    play = os.path.join(comedies, sorted(os.listdir(comedies))[0])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, oct(umask)[2:], str(tmp_path), play, *TINY],
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    outputs = {
        "prepared data": tmp_path / "data",
        "run directory": run,
        "checkpoint": run / "checkpoints" / "step_00000002",
        "consolidated model": tmp_path / "consolidated",
        "export": tmp_path / "export",
        "plan": tmp_path / "plan",
        "finetuned run": tmp_path / "runs" / "cls",
        "predictions": tmp_path / "predictions.jsonl",
    }
    wrong = []
    for what, root in outputs.items():
        assert root.exists(), f"{what}: {root} missing"
        for rel, mode in _modes(str(root)).items():
            want = (0o777 if os.path.isdir(os.path.join(root, rel)) else 0o666) & ~umask
            if mode != want:
                wrong.append(f"{what}: {rel} is {mode:o}, not {want:o}")
    assert not wrong, "\n".join(wrong)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert list((run / "checkpoints").glob("step_*"))
