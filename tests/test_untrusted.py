"""A checkpoint from someone else must not run code: every command that loads one (consolidate,
export, generate, evaluate, finetune init_from=, pretrain resume=) refuses a planted malicious
pickle with one line, even when the checkpoint's manifest matches the planted file, and the
pickle's payload (creating a canary file) never runs. Untampered checkpoints still load, and
--trust-checkpoint lets through what the checks would refuse.

One real tiny checkpoint per format (DCP from DDP, DeepSpeed ZeRO-2) is trained per module and
copied for each tampering.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil

import pytest
import torch

from tests.conftest import lmforge
from tests.runs import TINY

STEP = "step_00000002"
FORMATS = {
    "dcp": [],
    "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
}


class Payload:
    """Unpickling this runs a shell command that creates ``canary``."""

    def __init__(self, canary) -> None:
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch '{self.canary}'",))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict[str, str]:
    """One real 2-step checkpoint per format: {format: checkpoint directory}."""
    runs = str(tmp_path_factory.mktemp("untrusted-runs"))
    out = {}
    for name, extra in FORMATS.items():
        lmforge(
            "pretrain",
            f"data.path={tiny_data}",
            f"runs_dir={runs}",
            f"name={name}",
            *TINY,
            "train.max_steps=2",
            "checkpoint.interval=2",
            *extra,
        )
        out[name] = os.path.join(runs, name, "checkpoints", STEP)
    return out


def _copy(trained: dict, fmt: str, tmp_path) -> str:
    """A copy of the format's checkpoint, as a run directory's checkpoints/ layout."""
    root = tmp_path / "run" / "checkpoints"
    dst = str(root / STEP)
    shutil.copytree(trained[fmt], dst)
    (root / "latest").write_text(STEP + "\n")
    return dst


def _reseal(checkpoint: str, rel: str) -> None:
    """Make the manifest match the tampered file: whoever crafts a checkpoint writes it too."""
    path = os.path.join(checkpoint, rel)
    with open(path, "rb") as f:
        data = f.read()
    mpath = os.path.join(checkpoint, "manifest.json")
    with open(mpath) as f:
        manifest = json.load(f)
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=1)


def _plant(checkpoint: str, fmt: str, canary) -> str:
    """Replace the format's pickled file with a malicious one; return its relative path."""
    if fmt == "dcp":
        rel = os.path.join("dcp", ".metadata")
        data = pickle.dumps(Payload(canary), protocol=4)
    else:
        ds = os.path.join(checkpoint, "deepspeed")
        name = sorted(n for n in os.listdir(ds) if n.endswith("optim_states.pt"))[0]
        rel = os.path.join("deepspeed", name)
        buf = io.BytesIO()
        torch.save({"optimizer_state_dict": Payload(canary)}, buf)
        data = buf.getvalue()
    with open(os.path.join(checkpoint, rel), "wb") as f:
        f.write(data)
    _reseal(checkpoint, rel)
    return rel


def _plant_dcp_entry(checkpoint: str, canary) -> str:
    """Leave dcp/.metadata harmless but point one non-tensor entry (an optimizer
    hyperparameter, which only a resume reads) at a malicious torch.save blob."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = os.path.join(checkpoint, "dcp", ".metadata")
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)  # the file this test's own run wrote
    key = next(
        k
        for k, m in meta.state_dict_metadata.items()
        if isinstance(m, BytesStorageMetadata) and k.endswith(".lr")
    )
    index = next(i for i in meta.storage_data if i.fqn == key)
    info = meta.storage_data[index]
    shard = os.path.join(checkpoint, "dcp", info.relative_path)
    buf = io.BytesIO()
    torch.save(Payload(canary), buf)
    offset = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    meta.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(buf.getvalue()))
    with open(meta_path, "wb") as f:
        pickle.dump(meta, f)
    _reseal(checkpoint, os.path.join("dcp", info.relative_path))
    _reseal(checkpoint, os.path.join("dcp", ".metadata"))
    return os.path.join("dcp", info.relative_path)


def _cli(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process (the read-only commands start no process group): exit code and
    what it printed to stderr."""
    from lmforge.launcher.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, rel: str, canary) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert rel in last and "refusing to load" in last and "--trust-checkpoint" in last, err
    assert not os.path.exists(canary), "the planted pickle ran"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "lines.txt"
    path.write_text("Now is the winter of our discontent\nmade glorious summer.\n" * 4)
    return str(path)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("command", ["consolidate", "export", "generate", "evaluate"])
def test_reading_commands_refuse_a_planted_pickle(
    trained, fmt, command, tmp_path, capsys, text_file
):
    checkpoint = _copy(trained, fmt, tmp_path)
    canary = tmp_path / "canary"
    rel = _plant(checkpoint, fmt, canary)
    target = checkpoint if command != "export" else str(tmp_path / "run")  # a run dir too
    extra = {
        "consolidate": ["--out", str(tmp_path / "out")],
        "export": ["--out", str(tmp_path / "out")],
        "generate": ["--max-new-tokens", "2"],
        "evaluate": ["--text", text_file],
    }[command]
    code, err = _cli(capsys, command, target, *extra)
    _assert_refused(code, err, rel, canary)
    assert not os.path.exists(tmp_path / "out")


def _finetune_data(tmp_path) -> str:
    path = tmp_path / "labelled.csv"
    rows = ["text,label"] + [
        f"{'a merry jest' if i % 2 else 'a bitter grief'} {i},{'pos' if i % 2 else 'neg'}"
        for i in range(40)
    ]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "fmt, command, extra",
    [
        ("dcp", "pretrain", []),
        ("zero2", "pretrain", ["parallel.strategy=deepspeed", "parallel.zero_stage=2"]),
        ("zero2", "pretrain", []),  # DDP converting the ZeRO checkpoint (ds_to_universal)
        ("dcp", "finetune", []),
        ("zero2", "finetune", []),
    ],
    ids=["dcp-resume", "zero2-resume", "zero2-resume-as-ddp", "dcp-init_from", "zero2-init_from"],
)
def test_training_commands_refuse_a_planted_pickle(
    trained, tiny_data, fmt, command, extra, tmp_path
):
    checkpoint = _copy(trained, fmt, tmp_path)
    canary = tmp_path / "canary"
    rel = _plant(checkpoint, fmt, canary)
    if command == "pretrain":
        args = [f"data.path={tiny_data}", *TINY, "train.max_steps=3", f"resume={checkpoint}"]
    else:
        args = [
            f"init_from={checkpoint}",
            f"task.train={_finetune_data(tmp_path)}",
            "task.max_len=16",
            "train.micro_batch_size=4",
            "train.global_batch_size=8",
            "train.max_steps=2",
            "train.precision=fp32",
            "logging.progress=false",
            "logging.tensorboard=false",
        ]
    out = lmforge(command, *args, *extra, f"runs_dir={tmp_path / 'runs'}", "name=new", check=False)
    _assert_refused(out.returncode, out.stderr, rel, canary)


def test_resume_refuses_a_planted_pickle_in_dcp_entries(trained, tiny_data, tmp_path):
    """The metadata is harmless; an optimizer entry of the shards is the payload."""
    checkpoint = _copy(trained, "dcp", tmp_path)
    canary = tmp_path / "canary"
    _plant_dcp_entry(checkpoint, canary)
    out = lmforge(
        "pretrain",
        f"data.path={tiny_data}",
        *TINY,
        "train.max_steps=3",
        f"resume={checkpoint}",
        f"runs_dir={tmp_path / 'runs'}",
        "name=new",
        check=False,
    )
    _assert_refused(out.returncode, out.stderr, "param_groups", canary)


def test_a_plain_pickle_in_deepspeed_files_is_refused(trained, tmp_path, capsys):
    """torch.load(weights_only=False), as DeepSpeed calls it, unpickles a file that is no
    torch.save zip at all (the legacy format starts with a pickle): refused too."""
    checkpoint = _copy(trained, "zero2", tmp_path)
    canary = tmp_path / "canary"
    ds = os.path.join(checkpoint, "deepspeed")
    rel = os.path.join("deepspeed", sorted(os.listdir(ds))[0])
    with open(os.path.join(checkpoint, rel), "wb") as f:
        f.write(pickle.dumps(Payload(canary), protocol=2))
    _reseal(checkpoint, rel)
    code, err = _cli(capsys, "consolidate", checkpoint, "--out", str(tmp_path / "out"))
    _assert_refused(code, err, rel, canary)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_untampered_checkpoints_load(trained, fmt, tmp_path, capsys):
    from safetensors.torch import load_file

    code, err = _cli(capsys, "consolidate", trained[fmt], "--out", str(tmp_path / "out"))
    assert code == 0, err
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    saved = load_file(os.path.join(trained[fmt], "model.safetensors"))
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[k], saved[k]) for k in saved)


def test_safe_metadata_reader_reads_what_torch_reads(trained):
    """SafeReader's metadata equals torch's own reader's on a real checkpoint (a torch release
    that writes other classes into DCP metadata fails here first)."""
    from torch.distributed.checkpoint import FileSystemReader

    from lmforge.pretrain.core.safeload import dcp_reader

    dcp_dir = os.path.join(trained["dcp"], "dcp")
    ours, theirs = dcp_reader(dcp_dir).read_metadata(), FileSystemReader(dcp_dir).read_metadata()
    ours.storage_meta.load_id = theirs.storage_meta.load_id = None
    assert ours == theirs


def test_trust_checkpoint_lets_through_what_the_checks_refuse(trained, tmp_path, capsys):
    """A harmless class outside the allow-lists (a PurePosixPath) is refused without the flag
    and loads with it, in DCP metadata and in a DeepSpeed file."""
    dcp_ckpt = _copy(trained, "dcp", tmp_path / "a")
    meta_path = os.path.join(dcp_ckpt, "dcp", ".metadata")
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)
    meta.storage_meta.checkpoint_id = pathlib.PurePosixPath("elsewhere")
    with open(meta_path, "wb") as f:
        pickle.dump(meta, f)
    _reseal(dcp_ckpt, os.path.join("dcp", ".metadata"))

    zero_ckpt = _copy(trained, "zero2", tmp_path / "b")
    ds = os.path.join(zero_ckpt, "deepspeed")
    model_file = next(n for n in sorted(os.listdir(ds)) if n.endswith("model_states.pt"))
    state = torch.load(os.path.join(ds, model_file), weights_only=True)
    state["note"] = pathlib.PurePosixPath("elsewhere")
    torch.save(state, os.path.join(ds, model_file))
    _reseal(zero_ckpt, os.path.join("deepspeed", model_file))

    for i, ckpt in enumerate([dcp_ckpt, zero_ckpt]):
        code, err = _cli(capsys, "consolidate", ckpt, "--out", str(tmp_path / f"x{i}"))
        assert code == 2 and "PurePosixPath" in err and "--trust-checkpoint" in err, err
        try:
            code, err = _cli(
                capsys, "consolidate", ckpt, "--out", str(tmp_path / f"y{i}"), "--trust-checkpoint"
            )
        finally:  # the flag sets it for this process (and its workers)
            os.environ.pop("LMFORGE_TRUST_CHECKPOINT", None)
        assert code == 0, err
