"""`lmforge launch`: one node of a multi-node job, per-rank logs in the run directory."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

from lmforge.pretrain.core.dist import free_port
from tests.conftest import REPO
from tests.runs import _args, _rows


def test_two_nodes_train_like_two_local_ranks(tiny_data, tmp_path, reference_runs):
    """Two launchers (node ranks 0 and 1, one process each, static rendezvous on node 0) form
    one 2-rank job: the same metrics as `--nproc 2` on one node; each rank logs to its file."""
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "two-nodes"
    args = _args(tiny_data, runs, name, 1, "fp32", "parallel.strategy=ddp")
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lmforge.launcher.cli",
                "launch",
                "--nnodes",
                "2",
                "--nproc",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "pretrain",
                *args,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert "2 rank(s)" in outs[0]
    assert _rows(os.path.join(runs, name)) == _rows(ref)
    logs = sorted(os.path.basename(p) for p in glob.glob(f"{runs}/{name}/logs/*/rank*.out"))
    assert logs == ["rank000.out", "rank001.out"]  # one directory per node and attempt
    with open(glob.glob(f"{runs}/{name}/logs/*/rank000.out")[0]) as f:
        assert "done: step 14" in f.read()
