"""Full disks and corrupt checkpoints: one clear line, the previous checkpoint kept, and
`resume=auto` falling back on its own to the newest checkpoint that verifies.

The full disk is real where the machine lets the test mount a small tmpfs, and injected at the
write (`LMFORGE_FAULT=...+errno=ENOSPC`) everywhere, with two ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings

import pytest

from lmforge.launcher.cli import main
from lmforge.pretrain.checkpoint.store import (
    _prune,
    _publish,
    check_resume_checkpoint,
    resume_point,
    verify_checkpoint,
)
from lmforge.pretrain.core.durable import sha256_file
from lmforge.pretrain.core.errors import CheckpointError
from lmforge.pretrain.run.session import check_resume_compatible
from tests.conftest import lmforge
from tests.runs import _args, latest_checkpoint
from tests.test_resume import assert_same_run


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _refused_here(capsys, *argv: str) -> str:
    """The one line of `lmforge ARGV` run in this process (a command that starts no other)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return _one_line(subprocess.CompletedProcess(argv, code, out, err))


def _assert_kept_previous(run_dir: str) -> None:
    root = os.path.join(run_dir, "checkpoints")
    assert latest_checkpoint(run_dir) == "step_00000004"
    verify_checkpoint(os.path.join(root, "step_00000004"))
    assert sorted(os.listdir(root)) == ["latest", "step_00000004"], "partial checkpoint left"


def test_full_disk_during_save_is_one_line_and_resumes(tiny_data, tmp_path, reference_runs):
    """ENOSPC at the write of step 8's checkpoint, on both of two ranks: one line naming the
    disk, the place and the size needed; step 4 intact; then the run resumes exactly."""
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    runs, name = str(tmp_path), "full"
    run_dir = os.path.join(runs, name)
    args = _args(tiny_data, runs, name, 2, "fp32", "parallel.strategy=ddp")
    line = _one_line(
        lmforge(
            "pretrain", *args, env={"LMFORGE_FAULT": "save:mid-file@8+errno=ENOSPC"}, check=False
        )
    )
    root = os.path.join(run_dir, "checkpoints")
    assert "no space left on device saving checkpoint step 8" in line, line
    assert root in line and "a checkpoint needs about" in line and "free" in line, line
    assert f"{root}/step_00000004 is intact" in line, line
    _assert_kept_previous(run_dir)
    lmforge("pretrain", *args, "resume=auto")
    assert_same_run(run_dir, ref)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 5 MiB tmpfs: room for one checkpoint of the COMMON model (~3.3 MB), not two."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield str(mnt)
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_really_full_tmpfs(tiny_data, small_tmpfs, reference_runs):
    """The same on a filesystem that really fills up, through torch.distributed.checkpoint's
    own writes; growing the filesystem lets `resume=auto` finish the run exactly."""
    ref = reference_runs(1, "fp32", "parallel.strategy=ddp")
    run_dir = os.path.join(small_tmpfs, "fill")
    args = _args(tiny_data, small_tmpfs, "fill", 1, "fp32", "logging.plot=false")
    line = _one_line(lmforge("pretrain", *args, check=False))
    assert line.startswith("error: no space left on device saving checkpoint step 8"), line
    _assert_kept_previous(run_dir)
    subprocess.run(["mount", "-o", "remount,size=40m", small_tmpfs], check=True)
    lmforge("pretrain", *args, "resume=auto")
    assert_same_run(run_dir, ref)


# --- corrupt checkpoints -----------------------------------------------------------------------


def _flip_last_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def _resign(ckpt: str) -> None:
    """Rewrite the manifest's sums to match the files as they are now (what someone who
    crafts or edits a checkpoint can always do)."""
    mpath = os.path.join(ckpt, "manifest.json")
    with open(mpath) as f:
        manifest = json.load(f)
    for name, info in manifest["files"].items():
        info["sha256"] = sha256_file(os.path.join(ckpt, name))
        info["bytes"] = os.path.getsize(os.path.join(ckpt, name))
    with open(mpath, "w") as f:
        json.dump(manifest, f)


@pytest.fixture
def ref_copy(tmp_path, reference_runs):
    """A finished run (checkpoints at steps 12 and 14) to damage."""
    run_dir = str(tmp_path / "copy")
    shutil.copytree(reference_runs(1, "fp32", "parallel.strategy=ddp"), run_dir)
    return run_dir


def test_resume_auto_falls_back_past_a_corrupt_checkpoint(
    tiny_data, tmp_path, ref_copy, reference_runs
):
    """The newest checkpoint fails its sums: resume=auto warns naming the file, resumes from
    the one before and gives the uninterrupted run bitwise; an explicit resume= of the corrupt
    one names the good one; when none verifies it is one line."""
    root = os.path.join(ref_copy, "checkpoints")
    newest, before = os.path.join(root, "step_00000014"), os.path.join(root, "step_00000012")
    _flip_last_byte(os.path.join(newest, "model.safetensors"))
    base = _args(tiny_data, str(tmp_path), "copy", 1, "fp32")

    line = _one_line(lmforge("pretrain", *base, f"resume={newest}", check=False))
    assert "model.safetensors does not match its manifest" in line, line
    assert line.endswith(f"the previous good checkpoint is {before}: resume={before}"), line

    out = lmforge("pretrain", *base, "resume=auto")
    assert f"warning: checkpoint file {newest}/model.safetensors does not match" in out.stdout
    with open(os.path.join(ref_copy, "provenance.jsonl")) as f:
        assert [json.loads(x) for x in f][-1]["resumed_from"] == before
    assert_same_run(ref_copy, reference_runs(1, "fp32", "parallel.strategy=ddp"))

    for step in (12, 14):  # now every checkpoint is corrupt
        _flip_last_byte(os.path.join(root, f"step_{step:08d}", "trainer_state.json"))
    line = _one_line(lmforge("pretrain", *base, "resume=auto", check=False))
    assert (
        line == f"error: no checkpoint under {root} verifies; start a new run with another name=..."
    )


@pytest.mark.parametrize(
    "damage,resigned,expected",
    [
        ("manifest.json", False, "manifest.json is not valid JSON"),
        ("trainer_state.json", False, "trainer_state.json does not match its manifest"),
        ("config.yaml", False, "config.yaml does not match its manifest"),
        ("trainer_state.json", True, "trainer_state.json is not valid JSON"),
        ("config.yaml", True, "config.yaml cannot be read"),
    ],
)
def test_corrupt_checkpoint_files_are_one_line(ref_copy, capsys, damage, resigned, expected):
    """Corrupt JSON/YAML is found by the sums before any parser sees it; one a manifest was
    rewritten to match (so it verifies) is still one line when parsed, never a traceback."""
    root = os.path.join(ref_copy, "checkpoints")
    newest = os.path.join(root, "step_00000014")
    with open(os.path.join(newest, "trainer_state.json")) as f:
        tokenizer_sha = json.load(f)["tokenizer_sha256"]
    with open(os.path.join(newest, damage), "wb") as f:
        f.write(b"\xff{[: not valid\n\tx: [")
    if resigned:
        _resign(newest)
        assert resume_point(root) == newest  # it verifies ...
        with pytest.raises(CheckpointError, match=expected) as err:  # ... and is refused
            check_resume_compatible(
                newest, strategy="ddp", tokenizer_sha=tokenizer_sha, tokenizer_fix=""
            )
        assert "\n" not in str(err.value)
        return
    assert resume_point(root) == os.path.join(root, "step_00000012")
    assert expected in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=expected) as err:
        check_resume_checkpoint(newest)
    assert str(err.value).endswith(f"resume={os.path.join(root, 'step_00000012')}")


def test_resume_auto_warning_names_the_checkpoint_it_falls_back_to(tmp_path, capsys):
    """The newest checkpoint fails its sums: one warning line per skipped checkpoint, naming
    what failed and the checkpoint resume=auto falls back to, said once."""
    root = str(tmp_path)
    for step in (2, 4):
        ckpt = os.path.join(root, f"step_{step:08d}")
        os.makedirs(ckpt)
        with open(os.path.join(ckpt, "model.bin"), "wb") as f:
            f.write(b"weights")
        files = {"model.bin": {"sha256": sha256_file(os.path.join(ckpt, "model.bin")), "bytes": 7}}
        with open(os.path.join(ckpt, "manifest.json"), "w") as f:
            json.dump({"format_version": 1, "files": files}, f)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000004")
    newest, before = os.path.join(root, "step_00000004"), os.path.join(root, "step_00000002")
    _flip_last_byte(os.path.join(newest, "model.bin"))
    assert resume_point(root) == before
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: checkpoint file {newest}/model.bin does not match its ")
    assert lines[0].endswith(f": it is corrupt; resume=auto falls back to {before}"), lines[0]
    assert lines[0].count("earlier") == 0 and lines[0].count("falls back") == 1


def _flip_middle_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_sums_hashed_as_written_verify_and_catch_a_flipped_byte(ref_copy):
    """The manifest's sums are computed as the files are written (lmforge's own files from the
    bytes in memory, DCP's shards as they stream out), never read back, and are those of the
    files on disk, in the format every lmforge reads (format 1, sha256 and size of every file).
    A byte flipped in a DCP shard or in a file hashed from memory is caught, naming the file.
    By default (checkpoint.consolidated=final) only the checkpoint that ends the run holds
    model.safetensors."""
    root = os.path.join(ref_copy, "checkpoints")
    for step, final in ((12, False), (14, True)):
        ckpt = os.path.join(root, f"step_{step:08d}")
        assert os.path.isfile(os.path.join(ckpt, "model.safetensors")) == final
        with open(os.path.join(ckpt, "manifest.json")) as f:
            manifest = json.load(f)
        assert set(manifest) == {"format_version", "step", "created", "files"}
        assert (manifest["format_version"], manifest["step"]) == (1, step)
        on_disk = {
            os.path.relpath(os.path.join(parent, n), ckpt)
            for parent, _, names in os.walk(ckpt)
            for n in names
        }
        assert set(manifest["files"]) == on_disk - {"manifest.json"}
        for name, info in manifest["files"].items():
            path = os.path.join(ckpt, name)
            assert info == {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}, name
        verify_checkpoint(ckpt)
    ckpt = os.path.join(root, "step_00000012")
    for rel in (os.path.join("dcp", "__0_0.distcp"), "rng_rank00000.pt", "extra.pt"):
        _flip_middle_byte(os.path.join(ckpt, rel))
        with pytest.raises(CheckpointError, match=f"{rel} does not match its manifest"):
            verify_checkpoint(ckpt)
        _flip_middle_byte(os.path.join(ckpt, rel))  # back as it was
    verify_checkpoint(ckpt)


def test_dcp_files_are_hashed_as_they_are_written(tmp_path):
    """DCP's writer reports the sha256 and size of every file it wrote (the shard with large
    and small entries, .metadata written under a temp name and renamed): what the manifest
    needs, without a pass over the files."""
    import torch
    import torch.distributed.checkpoint as dcp

    from lmforge.pretrain.parallel.dcp_files import HashingFileSystemWriter

    state = {
        "model": {"big": torch.randn(1024, 1024), "small": torch.arange(7.0)},
        "optim": {"lr": 0.1, "moment": torch.randn(3, 5)},
    }
    writer = HashingFileSystemWriter(str(tmp_path / "dcp"), root=str(tmp_path))
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=writer, no_dist=True)
    on_disk = {
        os.path.relpath(os.path.join(parent, n), tmp_path)
        for parent, _, names in os.walk(tmp_path)
        for n in names
    }
    assert set(writer.digests) == on_disk and os.path.join("dcp", ".metadata") in on_disk
    for name, (sha, size) in writer.digests.items():
        path = os.path.join(tmp_path, name)
        assert (sha, size) == (sha256_file(path), os.path.getsize(path)), name


def test_manifest_reads_back_only_what_no_rank_hashed(tmp_path):
    """Rank 0's manifest takes the ranks' sums as they are, and hashes from disk a file that
    none of them hashed or whose size differs from the one hashed (a file written again)."""
    root = tmp_path / "checkpoints"
    tmp = root / ".step_00000003.tmp"
    (tmp / "sub").mkdir(parents=True)
    files = {"a.bin": b"a" * 3000, "sub/b.bin": b"b" * 10, "c.bin": b"c" * 5}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    claimed = {
        "a.bin": ("0" * 64, 3000),  # taken as given: nobody reads it back
        "c.bin": ("1" * 64, 4),  # the size is not the file's: read back
    }
    final = root / "step_00000003"
    _publish(root=str(root), step=3, tmp=str(tmp), final=str(final), keep_last=1, digests=claimed)
    with open(final / "manifest.json") as f:
        got = json.load(f)["files"]
    assert got == {
        "a.bin": {"sha256": "0" * 64, "bytes": 3000},
        "c.bin": {"sha256": sha256_file(final / "c.bin"), "bytes": 5},
        "sub/b.bin": {"sha256": sha256_file(final / "sub/b.bin"), "bytes": 10},
    }
    assert (root / "latest").read_text() == "step_00000003\n"


def test_retention_keeps_the_checkpoint_a_fallback_resumed_from(tmp_path):
    """After a fallback from step 4 past a corrupt step 12, saving step 8 with keep_last=2
    keeps 4 and 8: checkpoints newer than the one just written do not count as kept ones."""
    root = tmp_path / "checkpoints"
    for step in (4, 12):
        (root / f"step_{step:08d}").mkdir(parents=True)
    (root / "step_00000008").mkdir()
    _prune(str(root), keep_last=2, protect="step_00000008")
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000008", "step_00000012"]
    (root / "step_00000010").mkdir()
    _prune(str(root), keep_last=2, protect="step_00000010")
    assert sorted(os.listdir(root)) == ["step_00000008", "step_00000010", "step_00000012"]


def test_state_files_are_checked_before_parsing_in_every_reader(ref_copy, tmp_path, capsys):
    """consolidate (and so export, generate, evaluate, init_from) refuses a corrupt state file
    in one line before it parses it."""
    newest = os.path.join(ref_copy, "checkpoints", "step_00000014")
    with open(os.path.join(newest, "trainer_state.json"), "w") as f:
        f.write("{")
    line = _refused_here(capsys, "consolidate", newest, "--out", str(tmp_path / "out"))
    assert "trainer_state.json does not match its manifest" in line, line
    assert not os.path.exists(tmp_path / "out")
    older = os.path.join(ref_copy, "checkpoints", "step_00000012")
    with open(os.path.join(older, "config.yaml"), "w") as f:
        f.write("model: [\n")
    _resign(older)  # verifies, and still cannot be parsed
    line = _refused_here(capsys, "consolidate", older, "--out", str(tmp_path / "out"))
    assert "config.yaml cannot be read" in line and "the checkpoint is corrupt" in line, line
    assert not os.path.exists(tmp_path / "out")
