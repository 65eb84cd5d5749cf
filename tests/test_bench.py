"""`lmforge bench`: the candidates train the same model from the same weights on the same
batches (so their speeds compare like with like), and the table has a row per case."""

from __future__ import annotations

import pytest
import torch

from lmforge.launcher import bench
from lmforge.pretrain.model.hf_mapping import to_hf_name


def test_peers_train_the_same_model_from_the_same_weights() -> None:
    cfg = bench._model_cfg("tiny")
    cands = [
        bench.floor_candidate(cfg, "fp32"),
        bench.lmforge_candidate(cfg, "fp32"),
        bench.transformers_candidate(cfg, "fp32"),
    ]
    ours, theirs = cands[0].model.state_dict(), cands[2].model.state_dict()
    assert set(theirs) >= {to_hf_name(name) for name in ours}
    for name, value in ours.items():
        assert torch.equal(theirs[to_hf_name(name)], value), name
    times, losses = bench.interleave(cands, windows=2, steps=1, warmup=1)
    assert {n: len(t) for n, t in times.items()} == {"floor": 2, "lmforge": 2, "transformers": 2}
    assert all(t > 0 for ts in times.values() for t in ts)
    # lmforge's trainer takes exactly the hand-written loop's steps (3 so far) ...
    assert losses["lmforge"] == pytest.approx(losses["floor"], rel=1e-5)
    # ... and transformers' Llama, from the same weights, nearly the same ones (its loss covers
    # one prediction fewer per sample)
    assert losses["transformers"] == pytest.approx(losses["floor"], rel=0.01)


def test_table_has_a_row_per_case_with_ratios_and_split(tmp_path) -> None:
    out = tmp_path / "bench.md"
    text = bench.run_bench(
        models=["tiny"],
        precisions=["fp32", "bf16"],
        steps=1,
        windows=1,
        peers=True,
        compile=False,
        out=str(out),
    )
    assert out.read_text() == text
    header, rows = text.splitlines()[2], [r for r in text.splitlines() if r.startswith("| tiny")]
    assert "lmforge/floor" in header and "lmforge/transformers" in header
    assert [r.split(" | ")[2] for r in rows] == ["fp32", "bf16"]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert len(cells) == header.strip("| ").count(" | ") + 1
        ratios = [float(c) for c in cells[7:9]]
        assert all(0.2 < r < 5 for r in ratios)
        shares = [int(p.rstrip("%")) for p in cells[9].split(" / ")]
        assert 97 <= sum(shares) <= 103 and shares[1] > 50  # forward+backward dominates


def test_a_family_runs_against_transformers_own_class(capsys) -> None:
    """`--family qwen3 --peers`: the preset with qk-norm, and transformers' Qwen3ForCausalLM
    from the same weights (the candidate refuses weights that do not map one to one)."""
    from lmforge.launcher.cli.bench import FAMILIES
    from lmforge.pretrain.model.hf_mapping import CLASS_PREFIX

    assert sorted(FAMILIES) == sorted(CLASS_PREFIX) == sorted(bench.FAMILY_SWITCHES)
    text = bench.run_bench(
        models=["tiny"],
        precisions=["fp32"],
        steps=1,
        windows=1,
        peers=True,
        compile=False,
        out=None,
        family="qwen3",
    )
    assert text.startswith("lmforge bench --peers --family qwen3: ")
    (row,) = [r for r in text.splitlines() if r.startswith("| tiny")]
    assert all(0.2 < float(c) < 5 for c in row.strip("| ").split(" | ")[7:9])
    losses = capsys.readouterr().out.split("last losses: ")[-1]
    assert "transformers" in losses


def test_out_replaces_an_existing_file(tmp_path) -> None:
    """`--out FILE` of an earlier run is replaced by the new table (not refused)."""
    from lmforge.launcher.cli import main

    out = tmp_path / "bench.md"
    out.write_text("an earlier table\n")
    args = ["bench", "--models", "tiny", "--precisions", "fp32", "--steps", "1", "--windows", "1"]
    assert main([*args, "--out", str(out)]) == 0
    assert out.read_text().startswith("lmforge bench: ")


def test_strategy_table_runs_real_pretrains_and_reports_memory(tiny_data, tmp_path) -> None:
    """`--strategies`: one real `lmforge pretrain` per row, with its tokens/s, time split and
    peak memory next to the estimate; `--tensor-peak` says its peaks are of live tensors."""
    text = bench.run_strategy_bench(
        data=tiny_data,
        strategies=[("ddp", 1)],
        models=["tiny"],
        precisions=["fp32"],
        steps=2,
        tensor_peak=True,
        out=str(tmp_path / "strategies.md"),
    )
    assert "peaks of live tensors" in text.splitlines()[0]
    (row,) = [r for r in text.splitlines() if r.startswith("| tiny | ddp | 1 | fp32 |")]
    cells = row.strip("| ").split(" | ")
    assert float(cells[4].replace(",", "")) > 0 and cells[5] == "1.00"
    assert len(cells[7].split(" / ")) == 4  # data / fwd+bwd / optim / other
    peak, ratio = float(cells[8]), float(cells[10])
    assert peak > 0.1 and ratio > 0  # GiB: the process with torch loaded, then what training adds


def test_prepare_bench_times_prepare_next_to_each_library(tmp_path) -> None:
    """`bench --prepare` on a given file: a row per tokenizer kind with the same token count for
    both candidates, rates and a ratio; the table is written to --out."""
    import re
    from pathlib import Path

    from lmforge.launcher.cli import main
    from tests.conftest import plays_dir

    play = sorted((Path(plays_dir()) / "comedies").glob("*.md"))[0]
    out = tmp_path / "prepare.md"
    args = ["bench", "--prepare", "--text", str(play), "--vocab", "600", "--windows", "1"]
    assert main([*args, "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["sentencepiece", "bpe_bytes"]
    for row in rows:
        tokens, library, prepared, ratio = (c.strip() for c in row.split("|")[2:6])
        assert int(tokens.replace(",", "")) > 10_000
        assert float(library.replace(",", "")) > 0 and float(prepared.replace(",", "")) > 0
        assert re.fullmatch(r"\d+\.\d\d", ratio)
    assert main(["bench", "--prepare", "--vocab", "10"]) == 2
