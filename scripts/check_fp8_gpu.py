"""Check float8 training (`train.precision=fp8`) on a GPU, with real `lmforge pretrain` runs.

Needs an NVIDIA GPU of compute capability 8.9+ (H100-class), torchao (`pip install torchao` or
`pip install -e '.[fp8]'`) and, without --data, the bundled plays (`pip install -e '.[data]'`).

    python scripts/check_fp8_gpu.py                 # ~5 min on an H100
    python scripts/check_fp8_gpu.py --data data/shakespeare --steps 60 --keep /tmp/fp8-runs

On one GPU, the `small` model preset, sequence 512, the same seed and data for every run:

1. bf16 under FSDP2 (`parallel.strategy=fsdp`, one process): the reference;
2. fp8 under FSDP2 (float8 all-gathers, scales precomputed after each optimizer step);
3. fp8 under FSDP2 with `train.compile=true`;
4. fp8 under DDP;
5. run 2 killed at step 3/4 of the way (LMFORGE_FAULT) and resumed from its last checkpoint.

Checks: every fp8 run converts the 7 projections of each block (its "fp8: ..." line) and tracks
the bf16 losses (each step within --tolerance nats, the last within 2%); the compiled run
compiles (no fallback warning); the resumed run's per-step losses equal run 2's. Prints each
run's losses and tokens/s, and exits 0 when every check passes, 1 when one fails, 2 when this
machine cannot train in float8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODEL = [
    "model=configs/model/small.yaml",
    "train.seq_len=512",
    "train.micro_batch_size=16",
    "train.global_batch_tokens=8192",
]


def lmforge(*args: str, env: dict | None = None, check: bool = True):
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launcher.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        sys.exit(f"lmforge {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="prepared data (default: the bundled plays, prepared)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tolerance", type=float, default=0.1, help="nats per step")
    parser.add_argument("--keep", help="write the runs here (default: a temporary directory)")
    args = parser.parse_args()

    from lmforge.pretrain.parallel.common import use_cuda
    from lmforge.pretrain.parallel.float8 import float8_problem

    problem = float8_problem("cuda" if use_cuda() else "cpu")
    if problem is not None:
        print(f"cannot check float8 here: {problem}")
        return 2

    root = args.keep or tempfile.mkdtemp(prefix="lmforge-fp8-")
    data = args.data
    if data is None:
        data = os.path.join(root, "data")
        if not os.path.exists(os.path.join(data, "manifest.json")):
            lmforge("prepare", "configs/prepare/shakespeare.yaml", f"out={data}")
    steps = args.steps
    base = [
        f"data.path={data}",
        f"runs_dir={root}",
        *MODEL,
        f"train.max_steps={steps}",
        "train.log_interval=1",
        "train.eval_interval=0",
        "train.eval_samples=64",
        "optim.warmup_steps=10",
        "optim.lr=1e-3",
        f"checkpoint.interval={steps // 2}",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    ]
    runs = {
        "bf16-fsdp": ["train.precision=bf16", "parallel.strategy=fsdp"],
        "fp8-fsdp": ["train.precision=fp8", "parallel.strategy=fsdp"],
        "fp8-fsdp-compile": ["train.precision=fp8", "parallel.strategy=fsdp", "train.compile=true"],
        "fp8-ddp": ["train.precision=fp8", "parallel.strategy=ddp"],
    }
    out: dict[str, str] = {}
    for name, extra in runs.items():
        run_dir = os.path.join(root, name)
        if os.path.exists(run_dir):
            sys.exit(f"{run_dir} exists; give another --keep directory")
        out[name] = lmforge("pretrain", f"name={name}", *base, *extra).stdout
    # Killed after 3/4 of the steps; the checkpoint at the half is where it resumes.
    resumed = ["name=fp8-fsdp-resumed", *base, *runs["fp8-fsdp"]]
    killed = lmforge(
        "pretrain", *resumed, env={"LMFORGE_FAULT": f"step@{3 * steps // 4}"}, check=False
    )
    if killed.returncode == 0:
        sys.exit("the run meant to be killed finished")
    lmforge("pretrain", *resumed, "resume=auto")

    failures = []
    ref = rows(os.path.join(root, "bf16-fsdp"))
    expected = 7 * 6  # projections per block x the small preset's blocks
    print(f"{'run':<20} {'first loss':>10} {'last loss':>10} {'max |d| vs bf16':>16} {'tok/s':>10}")
    for name in [*runs, "fp8-fsdp-resumed"]:
        got = rows(os.path.join(root, name))
        diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, ref, strict=True))
        speed = sorted(r["tokens_per_sec"] for r in got[steps // 4 :])[len(got[steps // 4 :]) // 2]
        print(
            f"{name:<20} {got[0]['loss']:>10.4f} {got[-1]['loss']:>10.4f} {diff:>16.4f} "
            f"{speed:>10,.0f}"
        )
        if name.startswith("fp8"):
            if diff > args.tolerance:
                failures.append(f"{name}: a step's loss is {diff:.4f} from bf16's")
            if abs(got[-1]["loss"] - ref[-1]["loss"]) > 0.02 * ref[-1]["loss"]:
                failures.append(
                    f"{name}: last loss {got[-1]['loss']:.4f}, bf16 {ref[-1]['loss']:.4f}"
                )
    for name, text in out.items():
        if name.startswith("fp8") and f"fp8: {expected} of " not in text:
            line = next((x for x in text.splitlines() if x.startswith("fp8:")), "no fp8 line")
            failures.append(f"{name}: expected {expected} float8 layers; {line}")
    if "torch.compile failed" in out["fp8-fsdp-compile"]:
        failures.append("fp8-fsdp-compile fell back to eager mode")
    whole = [r["loss"] for r in rows(os.path.join(root, "fp8-fsdp"))]
    again = [r["loss"] for r in rows(os.path.join(root, "fp8-fsdp-resumed"))]
    if again != whole:
        failures.append("fp8-fsdp resumed from its checkpoint differs from the uninterrupted run")
    for failure in failures:
        print(f"FAIL {failure}")
    print(
        f"runs in {root}: " + ("all checks passed" if not failures else f"{len(failures)} failed")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
