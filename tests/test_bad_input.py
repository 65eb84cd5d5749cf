"""Bad input, systematically, for every command: one actionable line naming the value and the
fix, a non-zero exit, no traceback, and nothing left behind.

Each case is a command line with placeholders ({tmp}: the case's own empty directory, {data}: a
prepared corpus, {run} / {ckpt}: a tiny pretraining run and its checkpoint, {cls}: a tiny
classifier finetuned from it, {other}: data prepared with another tokenizer), the files
the case puts into {tmp} first, and the path it would have written. Cases run in-process through
`lmforge.launcher.cli.main` (an exception escaping it would be a traceback for the user); the few whose
error comes from inside a training process run the real CLI in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import traceback

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from lmforge.launcher.cli import main
from tests.conftest import lmforge, plays_dir
from tests.runs import QUIET, TINY

DIR = object()  # a files entry: an (empty) directory
READ_ONLY = object()  # a files entry: a directory nothing can be written into

BINARY = bytes(range(256)) * 64  # NUL bytes, invalid UTF-8
INVALID_UTF8 = b"caf\xe9 au lait\n\xff\xfe not text\n"
HUGE = "x" * (3 << 20)  # one 3 MiB line
# A Hugging Face tokenizer.json that loads, with no special token at all.
TOKENIZER_JSON = HFTokenizer(BPE(vocab={"a": 0, "b": 1}, merges=[])).to_str()


def _trains_in_float8() -> str | None:
    """Why train.precision=fp8 is not refused here (a float8 GPU with torchao), or None."""
    from lmforge.pretrain.parallel.common import use_cuda
    from lmforge.pretrain.parallel.float8 import float8_problem

    if float8_problem("cuda" if use_cuda() else "cpu") is None:
        return "this machine trains in float8"
    return None


def _copy(source: str):
    """A files entry: a copy of the shared fixture directory ``source`` (a placeholder)."""

    def make(path: str, values: dict) -> None:
        shutil.copytree(_fill(source, values), path)

    return make


def _corrupt_shard(path: str, values: dict) -> None:
    """A copy of the prepared data with one byte of a shard changed (sizes still right)."""
    shutil.copytree(values["data"], path)
    shard = os.path.join(path, "train_00000.bin")
    with open(shard, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))


def _fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def case(id_, argv, expect, *, files=None, out=None, proc=False, xfail=None, skip=None):
    """One bad command line: ``expect`` is in its one error line; ``out`` (a placeholder path)
    is what it must not have written; ``proc``: run the CLI in a subprocess; ``skip``: why this
    input is not bad on this machine (None: it is)."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    if skip:
        marks.append(pytest.mark.skip(reason=skip))
    return pytest.param(argv, expect, files or {}, out, proc, id=id_, marks=marks)


# The commands' usual arguments: outputs go under {tmp}.
PRETRAIN = [
    "pretrain",
    "name=r",
    "runs_dir={tmp}/runs",
    "data.path={data}",
    *TINY,
    "train.max_steps=2",
    "logging.plot=false",
]
FINETUNE = [
    "finetune",
    "name=f",
    "runs_dir={tmp}/runs",
    "init_from={run}",
    "task.max_len=32",
    "train.max_steps=1",
    "train.micro_batch_size=4",
    "train.global_batch_size=4",
    "train.precision=fp32",
    "logging.plot=false",
    *QUIET,
]
# a label curve on an 8-row task (7 to train, 1 held out), compared on the same file
CURVE = [*FINETUNE, "task.train={tmp}/t.csv", "label_curve.test={tmp}/t.csv"]
PREPARE = ["prepare", "out={tmp}/o", "num_proc=1"]
GOOD_CSV = "text,label\n" + "".join(
    f"line {i} of a tale,{'pos' if i % 2 else 'neg'}\n" for i in range(8)
)
PLAY = os.path.join(
    plays_dir(), "comedies", sorted(os.listdir(os.path.join(plays_dir(), "comedies")))[0]
)
ESCAPED_CSV = "text,label\n" + '"He said \\"hi, you\\" to me",pos\n"plain",neg\n' * 4
POINTS_CSV = "N,D,loss\n" + "".join(
    f"{n},{d},{1.7 + 400 / n**0.34 + 410 / d**0.28:.4f}\n"
    for n in (1e6, 4e6, 1.6e7)
    for d in (2e7, 8e7, 3.2e8)
)
RUNS = "{tmp}/runs"
DS = [*PRETRAIN, "parallel.strategy=deepspeed"]
DS_JSON = [*DS, "parallel.deepspeed_config={tmp}/ds.json"]

# fmt: off
CASES = [
    # --- config files and overrides (every command loads them the same way) ------------------
    case("config/missing-file", ["print-config", "{tmp}/none.yaml"], "config file not found: {tmp}/none.yaml"),
    case("config/empty-file", ["print-config", "--for", "prepare", "{tmp}/c.yaml"], "`out` is not set", files={"c.yaml": ""}),
    case("config/binary-file", ["print-config", "{tmp}/c.yaml"], "{tmp}/c.yaml", files={"c.yaml": BINARY}),
    case("config/invalid-utf8", ["print-config", "{tmp}/c.yaml"], "cannot parse YAML {tmp}/c.yaml", files={"c.yaml": b"name: " + INVALID_UTF8}),
    case("config/huge-line", ["print-config", "{tmp}/c.yaml"], "{tmp}/c.yaml must hold a mapping of config keys", files={"c.yaml": HUGE}),
    case("config/bad-yaml-syntax", ["print-config", "{tmp}/c.yaml"], "cannot parse YAML {tmp}/c.yaml", files={"c.yaml": "train: {max_steps: 3\n"}),
    case("config/list-not-mapping", ["print-config", "{tmp}/c.yaml"], "{tmp}/c.yaml must hold a mapping of config keys, not a list", files={"c.yaml": "- name: x\n- data: y\n"}),
    case("config/directory", ["print-config", "{tmp}/d"], "{tmp}/d is a directory", files={"d": DIR}),
    case("config/unknown-key-in-file", ["print-config", "{tmp}/c.yaml"], "unknown config key `trian`; did you mean `train`?", files={"c.yaml": "trian:\n  max_steps: 3\n"}),
    case("config/preset-is-a-list", ["print-config", "name=x", "data.path=d", "train.max_steps=1", "model={tmp}/m.yaml"], "{tmp}/m.yaml must hold a mapping", files={"m.yaml": "- 1\n- 2\n"}),
    case("config/wrong-type", ["print-config", "name=x", "data.path=d", "train.max_steps=many"], "config key `train.max_steps`"),
    case("config/section-given-a-number", ["print-config", "name=x", "data.path=d", "train.max_steps=1", "model=5"], "`model`"),
    case("config/override-without-key", ["print-config", "=5"], "override '=5' has no key"),
    case("config/unknown-flag", ["print-config", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    case("config/unknown-target", ["print-config", "--for", "nosuch"], "argument --for: invalid choice: 'nosuch'"),
    case("config/submit-wrong-type", ["print-config", "--for", "submit", "nodes=two"], "config key `nodes`"),
    case("config/scaling-list", ["print-config", "--for", "scaling", "{tmp}/s.yaml"], "must hold a mapping", files={"s.yaml": "[1, 2]\n"}),
    # --- prepare ----------------------------------------------------------------------------
    case("prepare/source-missing", [*PREPARE, "sources=[{path: {tmp}/none.txt}]"], "{tmp}/none.txt does not exist", out="{tmp}/o"),
    case("prepare/source-empty", [*PREPARE, "sources=[{path: {tmp}/e.txt}]"], "all 1 file(s) are empty", files={"e.txt": ""}, out="{tmp}/o"),
    case("prepare/source-binary", [*PREPARE, "sources=[{path: {tmp}/b.txt}]"], "b.txt holds NUL bytes", files={"b.txt": BINARY}, out="{tmp}/o"),
    case("prepare/source-binary-in-directory", [*PREPARE, "sources=[{path: {tmp}/d}]"], "b.md holds NUL bytes", files={"d/a.txt": "some text\n", "d/b.md": BINARY}, out="{tmp}/o"),
    case("prepare/source-binary-jsonl", [*PREPARE, "sources=[{path: {tmp}/b.jsonl}]"], "cannot read its jsonl files", files={"b.jsonl": BINARY}, out="{tmp}/o"),
    case("prepare/source-invalid-utf8-jsonl", [*PREPARE, "sources=[{path: {tmp}/j.jsonl}]"], "{tmp}/j.jsonl", files={"j.jsonl": b'{"text": "caf\xe9"}\n'}, out="{tmp}/o"),
    case("prepare/source-invalid-utf8-csv", [*PREPARE, "sources=[{path: {tmp}/t.csv}]"], "{tmp}/t.csv", files={"t.csv": b"text\ncaf\xe9\nok\n"}, out="{tmp}/o"),
    case("prepare/source-huge-line", [*PREPARE, "sources=[{path: {tmp}/h.txt}]"], "`tokenizer.vocab_size`", files={"h.txt": HUGE}, out="{tmp}/o"),
    case("prepare/source-directory-without-text", [*PREPARE, "sources=[{path: {tmp}/d}]"], "no .txt/.md/", files={"d/model.bin": BINARY}, out="{tmp}/o"),
    case("prepare/source-unknown-extension", [*PREPARE, "sources=[{path: {tmp}/f.dat}]"], "cannot tell the format of f.dat", files={"f.dat": "text\n"}, out="{tmp}/o"),
    case("prepare/source-glob-matches-nothing", [*PREPARE, "sources=[{path: '{tmp}/*.nothing'}]"], "the glob matches no files", out="{tmp}/o"),
    case("prepare/source-csv-without-text-column", [*PREPARE, "sources=[{path: {tmp}/t.csv}]"], "has no column 'text'", files={"t.csv": "a,b\n1,2\n"}, out="{tmp}/o"),
    case("prepare/source-csv-backslash-quotes", [*PREPARE, "sources=[{path: {tmp}/t.csv}]"], '{tmp}/t.csv holds backslash-escaped quotes (\\"): set `sources[].escapechar: "\\\\"`', files={"t.csv": ESCAPED_CSV}, out="{tmp}/o"),
    case("prepare/source-escapechar-two-characters", [*PREPARE, "sources=[{path: a.csv, escapechar: ab}]"], "`sources[].escapechar` must be one character other than a quote, comma, tab or line break, got 'ab'", out="{tmp}/o"),
    case("prepare/source-column-not-text", [*PREPARE, "sources=[{path: {tmp}/t.csv, text_column: a}]"], "not text", files={"t.csv": "a,b\n1,2\n3,4\n"}, out="{tmp}/o"),
    case("prepare/source-package-not-installed", [*PREPARE, "sources=[{path: 'pkg://no_such_package_xyz/plays'}]"], "'no_such_package_xyz' is not installed", out="{tmp}/o"),
    case("prepare/source-path-and-dataset", [*PREPARE, "sources=[{path: a.txt, dataset: b}]"], "exactly one of `path` and `dataset`", out="{tmp}/o"),
    case("prepare/source-weight-zero", [*PREPARE, "sources=[{path: a.txt, weight: 0}]"], "`sources[].weight` must be a positive number, got 0", out="{tmp}/o"),
    case("prepare/source-weight-nan", [*PREPARE, "sources=[{path: a.txt, weight: .nan}]"], "`sources[].weight` must be a positive number, got nan", out="{tmp}/o"),
    case("prepare/source-unknown-key", [*PREPARE, "sources=[{pth: a.txt}]"], "did you mean `sources.path`?", out="{tmp}/o"),
    case("prepare/source-bad-text-unit", [*PREPARE, "sources=[{path: a.txt, text_unit: sentence}]"], "text_unit", out="{tmp}/o"),
    case("prepare/sources-not-a-list", [*PREPARE, "sources=corpus.txt"], "`sources`", out="{tmp}/o"),
    case("prepare/source-not-a-dataset", [*PREPARE, "sources=[{dataset: {tmp}/d}]"], "{tmp}/d", files={"d": DIR}, out="{tmp}/o"),
    case("prepare/vocab-zero", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.vocab_size=0"], "`tokenizer.vocab_size`=0 is too small", out="{tmp}/o"),
    case("prepare/vocab-negative", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.vocab_size=-5"], "`tokenizer.vocab_size`=-5 is too small", out="{tmp}/o"),
    case("prepare/vocab-too-big-for-corpus", [*PREPARE, "sources=[{path: {tmp}/t.txt, text_unit: line}]", "tokenizer.vocab_size=60000"], "lower `tokenizer.vocab_size`", files={"t.txt": "".join(f"line {i} of some text\n" for i in range(300))}, out="{tmp}/o"),
    case("prepare/val-fraction-zero", [*PREPARE, "sources=[{path: a.txt}]", "val_fraction=0"], "`val_fraction` must be in (0, 0.5), got 0", out="{tmp}/o"),
    case("prepare/val-fraction-half", [*PREPARE, "sources=[{path: a.txt}]", "val_fraction=0.5"], "`val_fraction` must be in (0, 0.5), got 0.5", out="{tmp}/o"),
    case("prepare/shard-tokens-zero", [*PREPARE, "sources=[{path: a.txt}]", "shard_tokens=0"], "`shard_tokens` must be >= 1024, got 0", out="{tmp}/o"),
    case("prepare/num-proc-negative", [*PREPARE, "sources=[{path: a.txt}]", "num_proc=-1"], "`num_proc` must be >= 0, got -1", out="{tmp}/o"),
    case("prepare/tokenizer-missing", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.path={tmp}/none.model"], "tokenizer model not found: {tmp}/none.model", out="{tmp}/o"),
    case("prepare/tokenizer-binary", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.path={tmp}/t.model"], "{tmp}/t.model is not a SentencePiece model", files={"t.model": BINARY}, out="{tmp}/o"),
    case("prepare/tokenizer-empty", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.path={tmp}/t.model"], "{tmp}/t.model is not a SentencePiece model", files={"t.model": ""}, out="{tmp}/o"),
    case("prepare/tokenizer-is-a-directory", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.path={tmp}/d"], "{tmp}/d", files={"d": DIR}, out="{tmp}/o"),
    case("prepare/tokenizer-json-not-a-tokenizer", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.path={tmp}/tokenizer.json"], "{tmp}/tokenizer.json is not a Hugging Face tokenizer.json", files={"tokenizer.json": '{"model": 1}'}, out="{tmp}/o"),
    case("prepare/tokenizer-config-eos-not-in-vocab", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.path={tmp}/hub"], "{tmp}/hub: its eos_token '<|nope|>' is not in the vocabulary of tokenizer.json", files={"hub/tokenizer.json": TOKENIZER_JSON, "hub/tokenizer_config.json": '{"eos_token": "<|nope|>"}'}, out="{tmp}/o"),
    case("prepare/tokenizer-json-without-eos", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.path={tmp}/hub"], "tokenizer {tmp}/hub has no EOS token, which ends every document", files={"hub/tokenizer.json": TOKENIZER_JSON}, out="{tmp}/o"),
    case("prepare/bpe-bytes-with-a-path", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.kind=bpe_bytes", "tokenizer.path=t.json"], "`tokenizer.kind`=bpe_bytes trains a tokenizer, but `tokenizer.path` names one to reuse (t.json)", out="{tmp}/o"),
    case("prepare/bpe-bytes-unigram", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.kind=bpe_bytes", "tokenizer.model_type=unigram"], "`tokenizer.model_type`=unigram is a SentencePiece option", out="{tmp}/o"),
    case("prepare/tokenizer-kind-unknown", [*PREPARE, f"sources=[{{path: {PLAY}}}]", "tokenizer.kind=wordpiece"], "tokenizer.kind", out="{tmp}/o"),
    case("prepare/out-is-a-file", ["prepare", "out={tmp}/f.txt", f"sources=[{{path: {PLAY}}}]"], "`out`={tmp}/f.txt is a file", files={"f.txt": "x"}),
    case("prepare/out-under-a-file", ["prepare", "out={tmp}/f.txt/o", f"sources=[{{path: {PLAY}}}]"], "{tmp}/f.txt is a file", files={"f.txt": "x"}),
    case("prepare/out-read-only", ["prepare", "out={tmp}/ro/o", f"sources=[{{path: {PLAY}}}]"], "{tmp}/ro is not writable", files={"ro": READ_ONLY}, out="{tmp}/ro/o"),
    case("prepare/out-already-prepared", ["prepare", "out={tmp}/o", f"sources=[{{path: {PLAY}}}]"], "already holds a prepared dataset", files={"o/manifest.json": "{}"}),
    case("prepare/verify-missing", ["prepare", "--verify", "{tmp}/none"], "no prepared data at {tmp}/none"),
    case("prepare/verify-a-file", ["prepare", "--verify", "{tmp}/f.txt"], "no prepared data at {tmp}/f.txt", files={"f.txt": "x"}),
    case("prepare/verify-corrupt-shard", ["prepare", "--verify", "{tmp}/d"], "train_00000.bin does not match its sha256", files={"d": _corrupt_shard}),
    case("prepare/verify-binary-manifest", ["prepare", "--verify", "{tmp}/d"], "{tmp}/d/manifest.json is unreadable", files={"d/manifest.json": BINARY}),
    case("prepare/verify-manifest-a-list", ["prepare", "--verify", "{tmp}/d"], "{tmp}/d/manifest.json", files={"d/manifest.json": "[1, 2]"}),
    # --- pretrain ---------------------------------------------------------------------------
    case("pretrain/value-yaml-tag", [*PRETRAIN, "name=!tag x"], "`name`: '!tag x' is not a YAML value", out=RUNS),
    case("pretrain/value-control-character", [*PRETRAIN, "name=\x01x"], "control characters are not allowed", out=RUNS),
    case("pretrain/value-yaml-directive", [*PRETRAIN, "optim.lr=%x"], "`optim.lr`: '%x' is not a YAML value", out=RUNS),
    case("pretrain/value-not-utf8", [*PRETRAIN, "name=\udcff"], "`name`: the value is not valid UTF-8", out=RUNS),
    case("pretrain/name-with-a-bare-line-break", [*PRETRAIN, "name=a\n#SBATCH --x"], "`name`: the value 'a\\n#SBATCH --x' has a line break", out=RUNS),
    case("pretrain/name-with-a-line-break", [*PRETRAIN, 'name="a\\nb"'], "must be a plain directory name", out=RUNS),
    case("pretrain/max-steps-zero", [*PRETRAIN, "train.max_steps=0"], "`train.max_steps` must be >= 1, got 0", out=RUNS),
    case("pretrain/max-steps-negative", [*PRETRAIN, "train.max_steps=-3"], "`train.max_steps` must be >= 1, got -3", out=RUNS),
    case("pretrain/max-tokens-negative", [*PRETRAIN, "train.max_steps=null", "train.max_tokens=-1"], "`train.max_tokens` must be >= 1, got -1", out=RUNS),
    case("pretrain/micro-batch-zero", [*PRETRAIN, "train.micro_batch_size=0"], "`train.micro_batch_size` must be >= 1, got 0", out=RUNS),
    case("pretrain/global-batch-zero", [*PRETRAIN, "train.global_batch_tokens=0"], "`train.global_batch_tokens` must be >= 1, got 0", out=RUNS),
    case("pretrain/global-batch-not-a-multiple", [*PRETRAIN, "train.global_batch_tokens=100"], "train.global_batch_tokens=100 is not a multiple", out=RUNS),
    case("pretrain/seq-len-zero", [*PRETRAIN, "train.seq_len=0"], "`train.seq_len` must be >= 1, got 0", out=RUNS),
    case("pretrain/seq-len-longer-than-val-split", [*PRETRAIN, "train.seq_len=30000", "model.max_seq_len=32768"], "fewer than one sample of seq_len+1=30001", out=RUNS),
    case("pretrain/eval-samples-zero", [*PRETRAIN, "train.eval_samples=0"], "`train.eval_samples` must be >= 1, got 0", out=RUNS),
    case("pretrain/vocab-one", [*PRETRAIN, "model.vocab_size=1"], "`model.vocab_size` must be >= 2, got 1", out=RUNS),
    case("pretrain/vocab-not-the-data's", [*PRETRAIN, "model.vocab_size=999"], "model.vocab_size=999 but the tokenizer of", out=RUNS),
    case("pretrain/heads-zero", [*PRETRAIN, "model.n_head=0"], "`model.n_head` must be >= 1, got 0", out=RUNS),
    case("pretrain/lr-nan", [*PRETRAIN, "optim.lr=nan"], "`optim.lr` must be > 0, got nan", out=RUNS),
    case("pretrain/lr-inf", [*PRETRAIN, "optim.lr=inf"], "`optim.lr` must be > 0, got inf: give a finite learning rate", out=RUNS),
    case("pretrain/weight-decay-nan", [*PRETRAIN, "optim.weight_decay=nan"], "`optim.weight_decay` must be a finite number >= 0, got nan", out=RUNS),
    case("pretrain/eps-zero", [*PRETRAIN, "optim.eps=0"], "`optim.eps` must be a finite number > 0, got 0.0", out=RUNS),
    case("pretrain/keep-last-zero", [*PRETRAIN, "checkpoint.keep_last=0"], "`checkpoint.keep_last` >= 1", out=RUNS),
    case("pretrain/consolidated-unknown", [*PRETRAIN, "checkpoint.consolidated=always"], "config key `checkpoint.consolidated`: Invalid value 'always', expected one of ['final', 'every', 'never']", out=RUNS),
    case("pretrain/async-save-with-deepspeed", [*PRETRAIN, "parallel.strategy=deepspeed", "parallel.zero_stage=1", "checkpoint.async_save=true"], "`checkpoint.async_save=true` does not work with parallel.strategy=deepspeed", out=RUNS),
    case("pretrain/precision-unknown", [*PRETRAIN, "train.precision=fp4"], "config key `train.precision`", out=RUNS),
    case("pretrain/fp8-without-a-float8-gpu", [*PRETRAIN, "train.precision=fp8"], "train.precision=fp8 needs an NVIDIA GPU with float8 (compute capability 8.9+, H100-class) and torchao; ", out=RUNS, skip=_trains_in_float8()),
    case("pretrain/fp8-with-deepspeed", [*PRETRAIN, "train.precision=fp8", "parallel.strategy=deepspeed"], "train.precision=fp8 runs under ddp and fsdp without tensor or pipeline parallel (got strategy=deepspeed", out=RUNS),
    case("pretrain/fp8-with-tensor-parallel", [*PRETRAIN, "train.precision=fp8", "parallel.tensor_parallel=2", "--nproc", "2"], "(got strategy=ddp, tensor_parallel=2, pipeline_parallel=1); use train.precision=bf16", out=RUNS),
    case("pretrain/compile-with-deepspeed", [*PRETRAIN, "train.compile=true", "parallel.strategy=deepspeed"], "`train.compile=true` is not supported with parallel.strategy=deepspeed", out=RUNS),
    case("pretrain/name-empty", [*PRETRAIN, "name="], "config key `name`", out=RUNS),
    case("pretrain/tensor-parallel-does-not-divide-nproc", [*PRETRAIN, "parallel.tensor_parallel=2", "--nproc", "3"], "world_size must be a multiple of tensor_parallel*pipeline_parallel=2", out=RUNS),
    case("pretrain/pipeline-does-not-divide-nproc", [*PRETRAIN, "parallel.pipeline_parallel=2", "--nproc", "3"], "world_size must be a multiple of tensor_parallel*pipeline_parallel=2", out=RUNS),
    case("pretrain/nproc-zero", [*PRETRAIN, "--nproc", "0"], "--nproc 0: give at least one process", out=RUNS),
    case("pretrain/nproc-not-a-number", [*PRETRAIN, "--nproc", "two"], "argument --nproc: invalid int value: 'two'", out=RUNS),
    case("pretrain/memory-does-not-fit", [*PRETRAIN, "model.n_layer=64", "model.d_model=8192", "model.n_head=64"], "(or parallel.check_memory=false to try anyway)", out=RUNS),
    case("pretrain/data-missing", [*PRETRAIN, "data.path={tmp}/none"], "no prepared data at {tmp}/none", out=RUNS),
    case("pretrain/data-is-a-file", [*PRETRAIN, "data.path={tmp}/f.txt"], "no prepared data at {tmp}/f.txt", files={"f.txt": "x"}, out=RUNS),
    case("pretrain/data-is-a-run", [*PRETRAIN, "data.path={run}"], "no prepared data at", out=RUNS),
    case("pretrain/data-binary-manifest", [*PRETRAIN, "data.path={tmp}/d"], "{tmp}/d/manifest.json is unreadable", files={"d/manifest.json": BINARY}, out=RUNS),
    case("pretrain/data-manifest-bad-dtype", [*PRETRAIN, "data.path={tmp}/d"], "{tmp}/d/manifest.json", files={"d/manifest.json": '{"format_version": 1, "dtype": "float99"}'}, out=RUNS),
    case("pretrain/runs-dir-is-a-file", [*PRETRAIN, "runs_dir={tmp}/f.txt"], "{tmp}/f.txt is a file", files={"f.txt": "x"}),
    case("pretrain/runs-dir-read-only", [*PRETRAIN, "runs_dir={tmp}/ro/runs"], "{tmp}/ro is not writable", files={"ro": READ_ONLY}),
    case("pretrain/run-exists", [*PRETRAIN, "runs_dir={tmp}/runs"], "run directory {tmp}/runs/r already exists", files={"runs/r/metrics.jsonl": ""}),
    case("pretrain/resume-missing", [*PRETRAIN, "resume={tmp}/none"], "resume={tmp}/none: no such checkpoint", out=RUNS),
    case("pretrain/resume-binary-pointer", [*PRETRAIN, "resume={tmp}/latest"], "{tmp}/latest", files={"latest": BINARY}, out=RUNS),
    case("pretrain/resume-data-of-another-tokenizer", ["pretrain", "name=tiny", "runs_dir={tmp}/runs", "data.path={other}", *TINY, "train.max_steps=4", "resume=auto"], "was trained with another tokenizer", files={"runs/tiny": _copy("{run}")}, proc=True),
    case("pretrain/resume-another-shape", ["pretrain", "name=tiny", "runs_dir={tmp}/runs", "data.path={data}", *TINY, "model.d_model=64", "train.max_steps=4", "resume=auto"], "model.d_model=32 but this run sets model.d_model=64", files={"runs/tiny": _copy("{run}")}, proc=True),
    case("pretrain/deepspeed-json-missing", [*DS, "parallel.deepspeed_config={tmp}/none.json"], "`parallel.deepspeed_config`: no such file {tmp}/none.json", out=RUNS),
    case("pretrain/deepspeed-json-invalid", DS_JSON, "`parallel.deepspeed_config` {tmp}/ds.json is not valid JSON (Expecting property name", files={"ds.json": '{"zero_optimization": {"stage": 3,}}'}, out=RUNS),
    case("pretrain/deepspeed-json-binary", DS_JSON, "`parallel.deepspeed_config` {tmp}/ds.json cannot be read", files={"ds.json": BINARY}, out=RUNS),
    case("pretrain/deepspeed-json-a-list", DS_JSON, "{tmp}/ds.json must hold a JSON object (a DeepSpeed config), not a list", files={"ds.json": "[1]"}, out=RUNS),
    case("pretrain/deepspeed-json-stage-5", DS_JSON, "{tmp}/ds.json: `zero_optimization.stage` must be 0, 1, 2 or 3, got 5", files={"ds.json": '{"zero_optimization": {"stage": 5}}'}, out=RUNS),
    case("pretrain/deepspeed-json-nvme", DS_JSON, '`zero_optimization.offload_optimizer.device` "nvme" is not supported by lmforge (offload goes to CPU memory); use "device": "cpu"', files={"ds.json": '{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}}'}, out=RUNS),
    case("pretrain/deepspeed-json-offload-param-without-zero3", [*DS_JSON, "parallel.zero_stage=2"], "ds.json's zero_optimization.offload_param needs parallel.zero_stage=3 (got stage 2 from parallel.zero_stage=2)", files={"ds.json": '{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}'}, out=RUNS),
    case("pretrain/deepspeed-json-old-cpu-offload", DS_JSON, "`zero_optimization.cpu_offload` is DeepSpeed's old spelling", files={"ds.json": '{"zero_optimization": {"stage": 2, "cpu_offload": true}}'}, out=RUNS),
    case("pretrain/deepspeed-json-optimizer-lr-differs", DS_JSON, "`optimizer.params.lr`=1e-05 differs from lmforge's 0.0003 (optim.lr)", files={"ds.json": '{"optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": "auto"}}}'}, out=RUNS),
    case("pretrain/deepspeed-json-optimizer-not-adamw", DS_JSON, 'optimizer type "Lamb": lmforge\'s trainer owns the optimizer', files={"ds.json": '{"optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}'}, out=RUNS),
    case("pretrain/deepspeed-json-scheduler-setting", DS_JSON, "`scheduler.params.cos_min_ratio`=0.1 is not a setting of lmforge's AdamW and schedule", files={"ds.json": '{"scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 0.1, "warmup_num_steps": "auto"}}}'}, out=RUNS),
    case("pretrain/deepspeed-json-scheduler-warmup-differs", DS_JSON, "`scheduler.params.warmup_num_steps`=1000 differs from lmforge's 100 (optim.warmup_steps)", files={"ds.json": '{"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 1000}}}'}, out=RUNS),
    case("pretrain/deepspeed-json-auto-not-filled", DS_JSON, '{tmp}/ds.json: `zero_optimization.allgather_bucket_size` is "auto", which lmforge does not fill in', files={"ds.json": '{"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}'}, out=RUNS),
    # --- finetune ---------------------------------------------------------------------------
    case("finetune/label-curve-size-above-train", [*CURVE, "--label-curve", "50"], "label_curve.sizes=50 is more than the 7 training examples; give at most 7", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/label-curve-label-short-of-2", [*CURVE, "--label-curve", "3,all"], "label_curve.sizes=3 gives label", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/label-curve-empty-grid", [*CURVE, "label_curve.lrs=[]", "--label-curve"], "`label_curve.lrs`=[]: give at least one learning rate", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/label-curve-sizes-fall", [*CURVE, "--label-curve", "6,4"], "must rise without repeats", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/label-curve-all-is-a-size", [*CURVE, "--label-curve", "4,7,all"], "all is 7 examples here, a size already listed", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/label-curve-not-classification", [*CURVE, "task.type=sft", "--label-curve"], "needs task.type=classification, not sft", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/label-curve-no-test-split", [*FINETUNE, "task.train={tmp}/t.csv", "--label-curve", "4"], "set label_curve.test=<the test split>", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/parallel-without-label-curve", [*FINETUNE, "--parallel", "2"], "--parallel 2 trains a label curve's runs side by side: add --label-curve", out=RUNS),
    case("finetune/label-curve-parallel-zero", [*CURVE, "--label-curve", "4", "--parallel", "0"], "--parallel 0: give at least 1 run at a time", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/label-curve-against-missing", [*CURVE, "label_curve.against={tmp}/nope", "--label-curve", "4"], "{tmp}/nope", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/label-curve-test-missing", [*FINETUNE, "task.train={tmp}/t.csv", "label_curve.test={tmp}/none.csv", "--label-curve", "4"], "label_curve.test={tmp}/none.csv: no such file", files={"t.csv": GOOD_CSV}, out="{tmp}/runs/f-curve"),
    case("finetune/template-read-as-a-mapping", [*FINETUNE, "task.template=Q: {prompt}"], "reads as a YAML mapping or list, not text; quote it as a YAML string", out=RUNS),
    case("finetune/template-with-a-bare-line-break", [*FINETUNE, "task.template=Q: {prompt}\nA:"], "has a line break, which YAML reads as a space", out=RUNS),
    case("finetune/train-missing", [*FINETUNE, "task.train={tmp}/none.csv"], "{tmp}/none.csv: no such file", out=RUNS),
    case("finetune/train-empty", [*FINETUNE, "task.train={tmp}/t.csv"], "{tmp}/t.csv", files={"t.csv": ""}, out=RUNS),
    case("finetune/train-binary-csv", [*FINETUNE, "task.train={tmp}/t.csv"], "{tmp}/t.csv", files={"t.csv": BINARY}, out=RUNS),
    case("finetune/train-invalid-utf8-csv", [*FINETUNE, "task.train={tmp}/t.csv"], "{tmp}/t.csv", files={"t.csv": b"text,label\n" + b"caf\xe9,pos\nok,neg\n" * 4}, out=RUNS),
    case("finetune/train-huge-line-csv", [*FINETUNE, "task.train={tmp}/t.csv"], "{tmp}/t.csv", files={"t.csv": f"text,label\n{HUGE},pos\n"}, out=RUNS),
    case("finetune/train-binary-jsonl", [*FINETUNE, "task.train={tmp}/t.jsonl"], "{tmp}/t.jsonl", files={"t.jsonl": BINARY}, out=RUNS),
    case("finetune/train-invalid-utf8-jsonl", [*FINETUNE, "task.train={tmp}/t.jsonl"], "{tmp}/t.jsonl", files={"t.jsonl": b'{"text": "caf\xe9", "label": "a"}\n' * 4}, out=RUNS),
    case("finetune/train-huge-line-jsonl", [*FINETUNE, "task.train={tmp}/t.jsonl"], "{tmp}/t.jsonl", files={"t.jsonl": f'{{"text": "{HUGE}", "label": "a"}}\n'}, out=RUNS),
    case("finetune/train-jsonl-not-objects", [*FINETUNE, "task.train={tmp}/t.jsonl"], "{tmp}/t.jsonl", files={"t.jsonl": "[1, 2]\n[3, 4]\n"}, out=RUNS),
    case("finetune/train-is-a-directory", [*FINETUNE, "task.train={tmp}/d"], "{tmp}/d", files={"d": DIR}, out=RUNS),
    case("finetune/train-is-text", [*FINETUNE, "task.train={tmp}/t.txt"], "{tmp}/t.txt: unknown file type", files={"t.txt": "text\n"}, out=RUNS),
    case("finetune/train-without-text-column", [*FINETUNE, "task.train={tmp}/t.csv"], "has no column 'text'", files={"t.csv": "a,label\nx,pos\ny,neg\n"}, out=RUNS),
    case("finetune/train-csv-backslash-quotes", [*FINETUNE, "task.train={tmp}/t.csv"], '{tmp}/t.csv holds backslash-escaped quotes (\\"): set `task.escapechar: "\\\\"`', files={"t.csv": ESCAPED_CSV}, out=RUNS),
    case("finetune/train-texts-all-empty", [*FINETUNE, "task.train={tmp}/t.csv"], "all 3 rows of {tmp}/t.csv have an empty `text`; set `task.text_column`", files={"t.csv": 'text,label\n,pos\n"  ",neg\n" ",pos\n'}, out=RUNS),
    case("finetune/escapechar-two-characters", [*FINETUNE, "task.train=t.csv", "task.escapechar=ab"], "`task.escapechar` must be one character", out=RUNS),
    case("finetune/train-header-only", [*FINETUNE, "task.train={tmp}/t.csv"], "{tmp}/t.csv has no examples", files={"t.csv": "text,label\n"}, out=RUNS),
    case("finetune/train-one-row", [*FINETUNE, "task.train={tmp}/t.csv"], "has 1 example(s); need >= 2", files={"t.csv": "text,label\nx,pos\n"}, out=RUNS),
    case("finetune/val-missing", [*FINETUNE, "task.train={tmp}/t.csv", "task.val={tmp}/none.csv"], "{tmp}/none.csv: no such file", files={"t.csv": GOOD_CSV}, out=RUNS),
    case("finetune/labels-not-in-data", [*FINETUNE, "task.train={tmp}/t.csv", "task.labels=[good,bad]"], "has label 'neg', which is not in the model's label set", files={"t.csv": GOOD_CSV}, out=RUNS),
    case("finetune/class-weights-count", [*FINETUNE, "task.train={tmp}/t.csv", "class_weights=1,2,3"], "`class_weights` has 3 weights for 2 labels", files={"t.csv": GOOD_CSV}, out=RUNS),
    case("finetune/class-weights-not-numbers", [*FINETUNE, "task.train=t.csv", "class_weights=heavy"], "`class_weights`='heavy'", out=RUNS),
    case("finetune/global-batch-zero", [*FINETUNE, "task.train=t.csv", "train.global_batch_size=0"], "`train.global_batch_size` must be >= 1, got 0", out=RUNS),
    case("finetune/epochs-negative", [*FINETUNE, "task.train=t.csv", "train.max_steps=null", "train.epochs=-1"], "`train.epochs` must be > 0, got -1", out=RUNS),
    case("finetune/lora-rank-zero", [*FINETUNE, "task.train=t.csv", "lora.enabled=true", "lora.r=0"], "`lora.r` must be >= 1", out=RUNS),
    case("finetune/max-len-one", [*FINETUNE, "task.train=t.csv", "task.max_len=1"], "`task.max_len` must be >= 2, got 1", out=RUNS),
    case("finetune/max-len-beyond-model", [*FINETUNE, "task.train={tmp}/t.csv", "task.max_len=64"], "task.max_len=64 exceeds the model's max_seq_len 32", files={"t.csv": GOOD_CSV}, out=RUNS),
    case("finetune/val-fraction-one", [*FINETUNE, "task.train=t.csv", "task.val_fraction=1"], "`task.val_fraction` must be in (0, 0.5), got 1", out=RUNS),
    case("finetune/template-without-prompt", [*FINETUNE, "task.train=t.csv", "task.type=sft", "task.template=hello"], "`task.template` must contain {prompt}", out=RUNS),
    case("finetune/task-type-unknown", [*FINETUNE, "task.train=t.csv", "task.type=regression"], "config key `task.type`", out=RUNS),
    case("finetune/no-base-no-tokenizer", ["finetune", "name=f", "runs_dir={tmp}/runs", "task.train=t.csv"], "set `init_from=runs/<pretrained run>`", out=RUNS),
    case("finetune/model-shape-override", [*FINETUNE, "task.train={tmp}/t.csv", "model.n_layer=3"], "model.n_layer=3 but {run} has model.n_layer=1", files={"t.csv": GOOD_CSV}, out=RUNS),
    case("finetune/init-from-missing", [*FINETUNE, "task.train={tmp}/t.csv", "init_from={tmp}/none"], "{tmp}/none: no such run, checkpoint or model directory", files={"t.csv": GOOD_CSV}, out=RUNS),
    case("finetune/init-from-a-file", [*FINETUNE, "task.train={tmp}/t.csv", "init_from={tmp}/t.csv"], "{tmp}/t.csv is neither a checkpoint", files={"t.csv": GOOD_CSV}, out=RUNS),
    case("finetune/init-from-empty-directory", [*FINETUNE, "task.train={tmp}/t.csv", "init_from={tmp}/d"], "{tmp}/d is neither a checkpoint", files={"t.csv": GOOD_CSV, "d": DIR}, out=RUNS),
    case("finetune/tokenizer-of-other-data", [*FINETUNE, "task.train={tmp}/t.csv", "tokenizer={other}/tokenizer.model"], "is not the tokenizer {run} was trained with", files={"t.csv": GOOD_CSV}, out=RUNS),
    case("finetune/tokenizer-binary", [*FINETUNE, "task.train={tmp}/t.csv", "tokenizer={tmp}/t.model"], "{tmp}/t.model is not a SentencePiece model", files={"t.csv": GOOD_CSV, "t.model": BINARY}, out=RUNS),
    case("finetune/token-tags-not-one-per-word", [*FINETUNE, "task.type=token_classification", "task.train={tmp}/t.jsonl"], "an example has 2 words but 1 tags", files={"t.jsonl": '{"tokens": ["a", "b"], "tags": ["O"]}\n' * 4}, out=RUNS),
    case("finetune/token-tags-not-a-list", [*FINETUNE, "task.type=token_classification", "task.train={tmp}/t.jsonl"], "tags", files={"t.jsonl": '{"tokens": ["a", "b"], "tags": 5}\n' * 4}, out=RUNS),
    case("finetune/token-tags-not-bio", [*FINETUNE, "task.type=token_classification", "task.train={tmp}/t.jsonl"], "X-THING", files={"t.jsonl": '{"tokens": ["a"], "tags": ["X-THING"]}\n' * 4}, out=RUNS),
    case("finetune/token-tags-empty", [*FINETUNE, "task.type=token_classification", "task.train={tmp}/t.jsonl"], "2 of 4 rows of {tmp}/t.jsonl have an empty tag in `tags` (empty, whitespace or null); drop those rows or tag every word", files={"t.jsonl": '{"tokens": ["a", "b"], "tags": ["O", "O"]}\n' * 2 + '{"tokens": ["a", "b"], "tags": ["O", ""]}\n{"tokens": ["a"], "tags": [null]}\n'}, out=RUNS),
    case("finetune/labels-empty-and-nan-text", [*FINETUNE, "task.train={tmp}/t.csv"], "2 of 11 rows of {tmp}/t.csv have an empty label in `label` (empty, whitespace or null); drop those rows or give them their label", files={"t.csv": GOOD_CSV + "a,\nb,NaN\nc,\" \"\n"}, out=RUNS),
    case("finetune/labels-nan-text", [*FINETUNE, "task.train={tmp}/t.csv"], "2 of 10 rows of {tmp}/t.csv have the label 'NaN' in `label`, a missing value written as text; drop those rows, or set `task.labels`", files={"t.csv": GOOD_CSV + "a,NaN\nb,NaN\n"}, out=RUNS),
    case("finetune/labels-null-jsonl", [*FINETUNE, "task.train={tmp}/t.jsonl"], "2 of 6 rows of {tmp}/t.jsonl have an empty label in `label`", files={"t.jsonl": '{"text": "a tale", "label": 1}\n{"text": "a tale", "label": 0}\n' * 2 + '{"text": "a tale", "label": null}\n{"text": "a tale", "label": NaN}\n'}, out=RUNS),
    case("finetune/labels-empty-in-val", [*FINETUNE, "task.train={tmp}/t.csv", "task.val={tmp}/v.csv", "task.labels=[neg,pos]"], "1 of 3 rows of {tmp}/v.csv have an empty label in `label`", files={"t.csv": GOOD_CSV, "v.csv": "text,label\na,pos\nb,\nc,neg\n"}, out=RUNS),
    case("finetune/labels-declared-empty", [*FINETUNE, "task.train=t.csv", "task.labels=[pos,'']"], "`task.labels` has an empty label: ['pos', '']; remove it", out=RUNS),
    case("finetune/sft-without-response-column", [*FINETUNE, "task.type=sft", "task.train={tmp}/t.csv"], "has no column 'response'", files={"t.csv": "prompt,answer\nhi,there\nyo,you\n"}, out=RUNS),
    case("finetune/runs-dir-is-a-file", [*FINETUNE, "task.train={tmp}/t.csv", "runs_dir={tmp}/f.txt"], "{tmp}/f.txt is a file", files={"t.csv": GOOD_CSV, "f.txt": "x"}),
    case("finetune/runs-dir-read-only", [*FINETUNE, "task.train={tmp}/t.csv", "runs_dir={tmp}/ro/runs"], "{tmp}/ro is not writable", files={"t.csv": GOOD_CSV, "ro": READ_ONLY}),
    case("finetune/resume-a-pretraining-run", [*FINETUNE, "task.train={tmp}/t.csv", "name=tiny", "resume=auto"], "task", files={"t.csv": GOOD_CSV, "runs/tiny": _copy("{run}")}, proc=True),
    # --- scaling ----------------------------------------------------------------------------
    case("scaling/no-subcommand", ["scaling"], "lmforge scaling needs a subcommand"),
    case("scaling/sweep-config-missing", ["scaling", "sweep", "{tmp}/none.yaml"], "config file not found: {tmp}/none.yaml"),
    case("scaling/sweep-config-a-list", ["scaling", "sweep", "{tmp}/s.yaml"], "{tmp}/s.yaml must hold a mapping", files={"s.yaml": "- 1e12\n"}),
    case("scaling/sweep-budgets-empty", ["scaling", "sweep", "name=s", "runs_dir={tmp}/runs", "budgets=[]"], "`budgets` is empty", out=RUNS),
    case("scaling/sweep-budget-negative", ["scaling", "sweep", "name=s", "runs_dir={tmp}/runs", "budgets=[-1e12]"], "`budgets` must hold FLOPs > 0, got -1e+12", out=RUNS),
    case("scaling/sweep-budgets-not-numbers", ["scaling", "sweep", "name=s", "runs_dir={tmp}/runs", "budgets=[lots]"], "budgets", out=RUNS),
    case("scaling/sweep-sizes-count-zero", ["scaling", "sweep", "name=s", "runs_dir={tmp}/runs", "budgets=[1e12]", "sizes.count=0"], "need sizes.count >= 1", out=RUNS),
    case("scaling/sweep-nproc-zero", ["scaling", "sweep", "name=s", "runs_dir={tmp}/runs", "budgets=[1e12]", "nproc=0"], "nproc >= 1", out=RUNS),
    case("scaling/sweep-sets-a-point-key", ["scaling", "sweep", "name=s", "runs_dir={tmp}/runs", "budgets=[1e12]", "pretrain.train.max_steps=5"], "`pretrain.train.max_steps` is set by the sweep", out=RUNS),
    case("scaling/sweep-data-missing", ["scaling", "sweep", "name=s", "runs_dir={tmp}/runs", "budgets=[1e12]", "pretrain.data.path={tmp}/none"], "no prepared data at {tmp}/none", out=RUNS),
    case("scaling/sweep-pretrain-unknown-key", ["scaling", "sweep", "name=s", "runs_dir={tmp}/runs", "budgets=[1e12]", "pretrain.data.path={data}", "pretrain.optim.lrr=1"], "did you mean `optim.lr`?", out=RUNS),
    case("scaling/sweep-every-point-left-out", ["scaling", "sweep", "name=s", "runs_dir={tmp}/runs", "budgets=[1e3]", "pretrain.data.path={data}"], "every point of the sweep was left out", out=RUNS),
    case("scaling/sweep-runs-dir-is-a-file", ["scaling", "sweep", "name=s", "runs_dir={tmp}/f.txt", "budgets=[1e12]", "pretrain.data.path={data}", "pretrain.train.seq_len=32", "pretrain.model.max_seq_len=32", "pretrain.train.global_batch_tokens=256", "pretrain.train.micro_batch_size=8", "min_steps=1"], "{tmp}/f.txt is a file", files={"f.txt": "x"}),
    case("scaling/fit-nothing", ["scaling", "fit"], "give the points to fit"),
    case("scaling/fit-csv-missing", ["scaling", "fit", "{tmp}/none.csv", "--out", "{tmp}/r"], "{tmp}/none.csv: no such CSV file", out="{tmp}/r"),
    case("scaling/fit-csv-empty", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r"], "{tmp}/p.csv is empty", files={"p.csv": ""}, out="{tmp}/r"),
    case("scaling/fit-csv-binary", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r"], "{tmp}/p.csv", files={"p.csv": BINARY}, out="{tmp}/r"),
    case("scaling/fit-csv-invalid-utf8", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r"], "{tmp}/p.csv", files={"p.csv": b"N,D,loss\n1e6,2e7,3.1\xe9\n"}, out="{tmp}/r"),
    case("scaling/fit-csv-huge-line", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r"], "{tmp}/p.csv", files={"p.csv": "N,D,loss\n" + HUGE + ",1,2\n"}, out="{tmp}/r"),
    case("scaling/fit-csv-without-loss", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r"], "need a loss column", files={"p.csv": "N,D\n1,2\n"}, out="{tmp}/r"),
    case("scaling/fit-csv-not-a-number", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r"], "'low' is not a number", files={"p.csv": "N,D,loss\n1e6,2e7,low\n"}, out="{tmp}/r"),
    case("scaling/fit-csv-negative-loss", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r"], "has loss -", files={"p.csv": POINTS_CSV.replace("\n1000000.0,20000000.0,", "\n1000000.0,20000000.0,-", 1)}, out="{tmp}/r"),
    case("scaling/fit-csv-too-few-points", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r"], "", files={"p.csv": "N,D,loss\n1e6,2e7,3.1\n"}, out="{tmp}/r"),
    case("scaling/fit-not-a-run", ["scaling", "fit", "{tmp}/d", "--out", "{tmp}/r"], "{tmp}/d is not a run directory", files={"d": DIR}, out="{tmp}/r"),
    case("scaling/fit-a-text-file", ["scaling", "fit", "{tmp}/f.txt", "--out", "{tmp}/r"], "{tmp}/f.txt: not a sweep directory", files={"f.txt": "x"}, out="{tmp}/r"),
    case("scaling/fit-out-is-a-file", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/f.txt", "--bootstrap", "0"], "{tmp}/f.txt is a file", files={"p.csv": POINTS_CSV, "f.txt": "x"}),
    case("scaling/fit-exclude-highest-negative", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r", "--exclude-highest", "-1"], "`fit.exclude_highest` and `fit.bootstrap` must be >= 0", files={"p.csv": POINTS_CSV}, out="{tmp}/r"),
    case("scaling/fit-bootstrap-negative", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r", "--bootstrap", "-5"], "`fit.exclude_highest` and `fit.bootstrap` must be >= 0", files={"p.csv": POINTS_CSV}, out="{tmp}/r"),
    case("scaling/fit-target-flops-negative", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r", "--target-flops", "-1"], "--target-flops -1", files={"p.csv": POINTS_CSV}, out="{tmp}/r"),
    case("scaling/fit-holdout-zero", ["scaling", "fit", "{tmp}/p.csv", "--out", "{tmp}/r", "--holdout", "0"], "must hold FLOPs > 0, got 0", files={"p.csv": POINTS_CSV}, out="{tmp}/r"),
    case("scaling/fit-finetune-not-a-finetune-run", ["scaling", "fit", "--finetune", "{run}", "--out", "{tmp}/r"], "not a finished finetune run", out="{tmp}/r"),
    case("scaling/fit-finetune-missing", ["scaling", "fit", "--finetune", "{tmp}/none", "--out", "{tmp}/r"], "{tmp}/none", out="{tmp}/r"),
    # --- launch -----------------------------------------------------------------------------
    case("launch/no-command", ["launch", "--nproc", "2"], "lmforge launch needs the command to run"),
    case("launch/unknown-command", ["launch", "--nproc", "2", "nosuch"], "`nosuch` is not an lmforge command"),
    case("launch/one-process-command", ["launch", "--nproc", "2", "prepare", "out={tmp}/o", f"sources=[{{path: {PLAY}}}]"], "runs once", out="{tmp}/o"),
    case("launch/node-rank-beyond-nodes", ["launch", "--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1", *PRETRAIN], "--node-rank 2", out=RUNS),
    case("launch/node-rank-negative", ["launch", "--nnodes", "2", "--node-rank", "-1", "--master-addr", "127.0.0.1", *PRETRAIN], "--node-rank -1", out=RUNS),
    case("launch/port-out-of-range", ["launch", "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", "70000", *PRETRAIN], "--master-port 70000", out=RUNS),
    case("launch/rendezvous-without-port", ["launch", "--nnodes", "2", "--rdzv-endpoint", "node0", *PRETRAIN], "--rdzv-endpoint 'node0'", out=RUNS),
    case("launch/nnodes-zero", ["launch", "--nnodes", "0", *PRETRAIN], "--nnodes 0: give at least one node", out=RUNS),
    case("launch/nproc-negative", ["launch", "--nproc", "-1", *PRETRAIN], "--nproc -1", out=RUNS),
    case("launch/bad-config", ["launch", "--nproc", "2", *PRETRAIN, "train.max_steps=0"], "`train.max_steps` must be >= 1, got 0", out=RUNS),
    case("launch/bad-data", ["launch", "--nproc", "2", *PRETRAIN, "data.path={tmp}/none"], "no prepared data at {tmp}/none", out=RUNS),
    case("launch/max-restarts", ["launch", "--max_restarts", "3", *PRETRAIN], "--max-restarts 3: lmforge launch does not restart failed workers", out=RUNS),
    case("launch/nnodes-elastic-range", ["launch", "--nnodes", "1:4", *PRETRAIN], "1:4: lmforge runs a fixed number of nodes, not an elastic range", out=RUNS),
    case("launch/standalone-with-endpoint", ["launch", "--standalone", "--rdzv-endpoint", "h:1", *PRETRAIN], "--standalone runs one node on a local rendezvous; drop --rdzv-endpoint", out=RUNS),
    case("launch/nproc-per-node-not-a-number", ["launch", "--nproc_per_node", "two", *PRETRAIN], "'two': give a number, gpu, cpu or auto", out=RUNS),
    case("launch/rdzv-backend-etcd", ["launch", "--rdzv_backend", "etcd", "--rdzv-endpoint", "h:1", *PRETRAIN], "invalid choice: 'etcd' (choose from 'c10d', 'static')", out=RUNS),
    case("launch/nproc-after-the-command", ["launch", "--nproc", "2", *PRETRAIN, "--nproc", "2"], "`--nproc` after `pretrain`: with lmforge launch", out=RUNS),
    case("launch/layout-does-not-divide", ["launch", "--nproc", "3", *PRETRAIN, "parallel.tensor_parallel=2"], "world_size must be a multiple", out=RUNS),
    # --- submit -----------------------------------------------------------------------------
    case("submit/profile-a-list", ["submit", "{tmp}/p.yaml", "--dry-run", "--", "prepare"], "{tmp}/p.yaml must hold a mapping", files={"p.yaml": "- a\n"}),
    case("submit/profile-missing", ["submit", "{tmp}/none.yaml", "--dry-run", "--", "prepare"], "config file not found: {tmp}/none.yaml"),
    case("submit/profile-unknown-key", ["submit", "nodez=2", "--dry-run", "--", "prepare"], "did you mean `nodes`?"),
    case("submit/job-bad-config", ["submit", "--dry-run", "--", *PRETRAIN, "train.max_steps=0"], "`train.max_steps` must be >= 1, got 0"),
    case("submit/job-name-with-a-bare-line-break", ["submit", "--dry-run", "--", *PRETRAIN, "name=a\n#SBATCH --x"], "has a line break, which YAML reads as a space"),
    case("pretrain/dry-run-name-with-a-bare-line-break", [*PRETRAIN, "name=a\n#SBATCH --x", "--dry-run"], "has a line break, which YAML reads as a space", out=RUNS),
    case("submit/job-unknown-command", ["submit", "--dry-run", "--", "nosuch", "x"], "`nosuch` is not an lmforge command"),
    case("submit/bad-array", ["submit", "--array", "1-x", "--dry-run", "--", "prepare"], "--array '1-x' is not a SLURM array"),
    case("submit/no-command", ["submit", "--dry-run"], "needs a command after `--`"),
    # --- runs -------------------------------------------------------------------------------
    case("runs/no-such-run", ["runs", "nosuch", "--runs-dir", "{tmp}"], "no run nosuch under {tmp}"),
    case("runs/run-is-a-file", ["runs", "f.txt", "--runs-dir", "{tmp}"], "no run f.txt under {tmp}", files={"f.txt": "x"}),
    case("runs/runs-dir-missing", ["runs", "--runs-dir", "{tmp}/none"], "--runs-dir {tmp}/none"),
    case("runs/runs-dir-is-a-file", ["runs", "--runs-dir", "{tmp}/f.txt"], "--runs-dir {tmp}/f.txt", files={"f.txt": "x"}),
    case("runs/tail-negative", ["runs", "--runs-dir", "{tmp}", "--tail", "-1"], "--tail -1"),
    case("runs/forecasts-dir-missing", ["runs", "--forecasts", "{tmp}/none"], "--forecasts {tmp}/none: no such directory"),
    case("runs/forecasts-none-finished", ["runs", "--forecasts", "{tmp}"], "no finished run there has a forecast.json", files={"r/forecast.json": "{\"dry_run\": true}", "q/forecast.json": BINARY}, out="{tmp}/forecasts.png"),
    case("runs/forecasts-with-a-run-name", ["runs", "r", "--forecasts", "{tmp}"], "drop the run names"),
    # --- forecasts of training runs ---------------------------------------------------------
    case("pretrain/law-missing", [*PRETRAIN, "--law", "{tmp}/none"], "--law {tmp}/none: no such file or directory", out=RUNS),
    case("pretrain/law-not-a-fit", [*PRETRAIN, "--law", "{tmp}/f.txt"], "--law {tmp}/f.txt: not a sweep", files={"f.txt": "x"}, out=RUNS),
    case("pretrain/law-half-given", [*PRETRAIN, "forecast.law.loss=2.5"], "`forecast.law` needs loss, low and high together", out=RUNS),
    case("pretrain/law-interval-upside-down", [*PRETRAIN, "forecast.law.loss=2.5", "forecast.law.low=2.6", "forecast.law.high=2.4"], "low <= loss <= high", out=RUNS),
    case("pretrain/forecast-refit-from-not-a-fraction", [*PRETRAIN, "forecast.refit_from=2"], "`forecast.refit_from`=2.0: give a fraction", out=RUNS),
    case("pretrain/forecast-mfu-above-one", [*PRETRAIN, "forecast.mfu=40"], "`forecast.mfu`=40.0", out=RUNS),
    case("pretrain/probe-too-few-steps", [*PRETRAIN, "--probe", "--probe-steps", "1"], "--probe 1: give at least 3 steps", out=RUNS),
    case("finetune/law-has-no-law", [*FINETUNE, "task.train={tmp}/t.csv", "--law", "{tmp}"], "`finetune` runs have no fixed tokens per step", files={"t.csv": GOOD_CSV}, out=RUNS),
    case("finetune/law-with-label-curve", [*CURVE, "--label-curve", "4", "--law", "{tmp}"], "--law and --probe forecast one run", files={"t.csv": GOOD_CSV}),
    # --- consolidate ------------------------------------------------------------------------
    case("consolidate/path-missing", ["consolidate", "{tmp}/none", "--out", "{tmp}/o"], "{tmp}/none", out="{tmp}/o"),
    case("consolidate/path-a-file", ["consolidate", "{tmp}/f.txt", "--out", "{tmp}/o"], "{tmp}/f.txt is neither a checkpoint", files={"f.txt": "x"}, out="{tmp}/o"),
    case("consolidate/out-not-empty", ["consolidate", "{run}", "--out", "{tmp}/o"], "--out {tmp}/o exists and is not empty", files={"o/x": "x"}),
    case("consolidate/out-is-a-file", ["consolidate", "{run}", "--out", "{tmp}/f.txt"], "{tmp}/f.txt", files={"f.txt": "x"}),
    case("consolidate/out-under-a-file", ["consolidate", "{run}", "--out", "{tmp}/f.txt/o"], "{tmp}/f.txt is a file", files={"f.txt": "x"}),
    case("consolidate/out-read-only", ["consolidate", "{run}", "--out", "{tmp}/ro/o"], "{tmp}/ro is not writable", files={"ro": READ_ONLY}),
    case("consolidate/binary-manifest", ["consolidate", "{tmp}/c", "--out", "{tmp}/o"], "{tmp}/c", files={"c": _copy("{ckpt}"), "c/manifest.json": BINARY}, out="{tmp}/o"),
    case("consolidate/dtype-unknown", ["consolidate", "{run}", "--out", "{tmp}/o", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'", out="{tmp}/o"),
    # --- export -----------------------------------------------------------------------------
    case("export/path-missing", ["export", "{tmp}/none", "--out", "{tmp}/o"], "{tmp}/none: no such run", out="{tmp}/o"),
    case("export/path-a-file", ["export", "{tmp}/f.txt", "--out", "{tmp}/o"], "{tmp}/f.txt is neither a checkpoint", files={"f.txt": "x"}, out="{tmp}/o"),
    case("export/out-inside-a-checkpoint", ["export", "{tmp}/c", "--out", "{tmp}/c/hf"], "--out {tmp}/c/hf is inside the checkpoint {tmp}/c", files={"c": _copy("{ckpt}")}, out="{tmp}/c/hf"),
    case("consolidate/out-inside-a-checkpoint", ["consolidate", "{tmp}/c", "--out", "{tmp}/c/full"], "--out {tmp}/c/full is inside the checkpoint {tmp}/c", files={"c": _copy("{ckpt}")}, out="{tmp}/c/full"),
    case("export/out-not-empty", ["export", "{run}", "--out", "{tmp}/o"], "--out {tmp}/o exists and is not empty", files={"o/x": "x"}),
    case("export/out-under-a-file", ["export", "{run}", "--out", "{tmp}/f.txt/o"], "{tmp}/f.txt is a file", files={"f.txt": "x"}),
    case("export/out-read-only", ["export", "{run}", "--out", "{tmp}/ro/o"], "{tmp}/ro is not writable", files={"ro": READ_ONLY}),
    case("export/hf-config-binary", ["export", "{tmp}/hf", "--out", "{tmp}/o"], "{tmp}/hf/config.json", files={"hf/config.json": BINARY}, out="{tmp}/o"),
    case("export/hf-config-a-list", ["export", "{tmp}/hf", "--out", "{tmp}/o"], "{tmp}/hf/config.json", files={"hf/config.json": "[1, 2]"}, out="{tmp}/o"),
    case("export/consolidated-config-binary", ["export", "{tmp}/m", "--out", "{tmp}/o"], "{tmp}/m", files={"m/consolidated.json": "{}", "m/config.yaml": BINARY}, out="{tmp}/o"),
    # --- generate ---------------------------------------------------------------------------
    case("generate/path-missing", ["generate", "{tmp}/none"], "{tmp}/none: no such run"),
    case("generate/path-empty-directory", ["generate", "{tmp}/d"], "{tmp}/d is neither a checkpoint", files={"d": DIR}),
    case("generate/temperature-nan", ["generate", "{run}", "--temperature", "nan"], "--temperature nan"),
    case("generate/top-k-negative", ["generate", "{run}", "--top-k", "-1"], "--top-k"),
    case("generate/max-new-tokens-not-a-number", ["generate", "{run}", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    case("generate/a-classifier", ["generate", "{cls}"], "is a classification model"),
    case("generate/hf-config-binary", ["generate", "{tmp}/hf"], "{tmp}/hf/config.json", files={"hf/config.json": BINARY}),
    # --- evaluate ---------------------------------------------------------------------------
    case("evaluate/text-and-data", ["evaluate", "{run}", "--text", "a.txt", "--data", "b.csv"], "give one of --text FILE"),
    case("evaluate/text-missing", ["evaluate", "{run}", "--text", "{tmp}/none.txt"], "cannot read {tmp}/none.txt"),
    case("evaluate/text-empty", ["evaluate", "{run}", "--text", "{tmp}/e.txt"], "no text to score", files={"e.txt": ""}),
    case("evaluate/text-binary", ["evaluate", "{run}", "--text", "{tmp}/b.txt"], "cannot read {tmp}/b.txt", files={"b.txt": BINARY}),
    case("evaluate/text-invalid-utf8", ["evaluate", "{run}", "--text", "{tmp}/b.txt"], "cannot read {tmp}/b.txt", files={"b.txt": INVALID_UTF8}),
    case("evaluate/text-is-a-directory", ["evaluate", "{run}", "--text", "{tmp}/d"], "cannot read {tmp}/d", files={"d": DIR}),
    case("evaluate/seq-len-zero", ["evaluate", "{run}", "--text", "{tmp}/t.txt", "--seq-len", "0"], "--seq-len 0", files={"t.txt": "some text to score\n"}),
    case("evaluate/seq-len-beyond-model", ["evaluate", "{run}", "--text", "{tmp}/t.txt", "--seq-len", "1000"], "--seq-len 1000", files={"t.txt": "some text to score\n" * 200}),
    case("evaluate/out-is-a-directory", ["evaluate", "{run}", "--text", "{tmp}/t.txt", "--out", "{tmp}/d"], "--out {tmp}/d is a directory", files={"t.txt": "some text\n", "d": DIR}),
    case("evaluate/text-on-a-classifier", ["evaluate", "{cls}", "--text", "{tmp}/t.txt"], "is a classifier", files={"t.txt": "some text\n"}),
    case("evaluate/data-on-a-language-model", ["evaluate", "{run}", "--data", "{tmp}/t.csv"], "is a base language model with no task", files={"t.csv": GOOD_CSV}),
    case("evaluate/data-missing", ["evaluate", "{cls}", "--data", "{tmp}/none.csv"], "{tmp}/none.csv: no such file"),
    case("evaluate/data-binary", ["evaluate", "{cls}", "--data", "{tmp}/t.csv"], "{tmp}/t.csv", files={"t.csv": BINARY}),
    case("evaluate/data-invalid-utf8", ["evaluate", "{cls}", "--data", "{tmp}/t.csv"], "{tmp}/t.csv", files={"t.csv": b"text,label\ncaf\xe9,pos\n"}),
    case("evaluate/data-unknown-label", ["evaluate", "{cls}", "--data", "{tmp}/t.csv"], "has label 'maybe', which is not in the model's label set", files={"t.csv": "text,label\nhello,maybe\n"}),
    case("evaluate/data-without-column", ["evaluate", "{cls}", "--data", "{tmp}/t.csv"], "has no column 'text'", files={"t.csv": "review,label\nhello,pos\n"}),
    case("evaluate/column-without-value", ["evaluate", "{cls}", "--data", "{tmp}/t.csv", "--column", "text_column"], "--column text_column", files={"t.csv": GOOD_CSV}),
    case("evaluate/column-unknown-key", ["evaluate", "{cls}", "--data", "{tmp}/t.csv", "--column", "txt_column=review"], "--column txt_column=review", files={"t.csv": GOOD_CSV}),
    case("evaluate/batch-size-zero", ["evaluate", "{run}", "--text", "{tmp}/t.txt", "--batch-size", "0"], "--batch-size 0", files={"t.txt": "some text to score\n"}),
    case("evaluate/predictions-without-data", ["evaluate", "{run}", "--text", "{tmp}/t.txt", "--predictions", "{tmp}/p.jsonl"], "--predictions {tmp}/p.jsonl needs --data FILE", files={"t.txt": "some text\n"}, out="{tmp}/p.jsonl"),
    case("evaluate/predictions-is-a-directory", ["evaluate", "{cls}", "--data", "{tmp}/t.csv", "--predictions", "{tmp}/d"], "--predictions {tmp}/d is a directory", files={"t.csv": GOOD_CSV, "d": DIR}),
    case("evaluate/predictions-in-missing-directory", ["evaluate", "{cls}", "--data", "{tmp}/t.csv", "--predictions", "{tmp}/none/p.jsonl"], "--predictions {tmp}/none/p.jsonl: no directory {tmp}/none", files={"t.csv": GOOD_CSV}, out="{tmp}/none"),
    case("evaluate/predictions-read-only", ["evaluate", "{cls}", "--data", "{tmp}/t.csv", "--predictions", "{tmp}/ro/p.jsonl"], "{tmp}/ro is not writable", files={"t.csv": GOOD_CSV, "ro": READ_ONLY}, out="{tmp}/ro/p.jsonl"),
    case("evaluate/predictions-same-as-out", ["evaluate", "{cls}", "--data", "{tmp}/t.csv", "--predictions", "{tmp}/r.json", "--out", "{tmp}/r.json"], "--out and --predictions both name {tmp}/r.json", files={"t.csv": GOOD_CSV}, out="{tmp}/r.json"),
    # --- bench ------------------------------------------------------------------------------
    case("bench/steps-zero", ["bench", "--models", "tiny", "--precisions", "fp32", "--steps", "0"], "--steps 0"),
    case("bench/gpu-without-one", ["bench", "--gpu", "--models", "tiny"], "bench --gpu needs a CUDA GPU"),
    case("bench/gpu-mode-unknown", ["bench", "--gpu", "--modes", "eager,fp4"], "--modes eager,fp4"),
    case("bench/windows-zero", ["bench", "--models", "tiny", "--precisions", "fp32", "--windows", "0"], "--windows 0"),
    case("bench/precision-unknown", ["bench", "--models", "tiny", "--precisions", "fp64", "--steps", "1"], "--precisions fp64"),
    case("bench/model-unknown", ["bench", "--models", "nosuch", "--precisions", "fp32", "--steps", "1"], "--models nosuch"),
    case("bench/checkpoint-model-unknown", ["bench", "--checkpoint", "--models", "nosuch"], "--models nosuch"),
    case("bench/new-tokens-too-many", ["bench", "--generate", "--models", "tiny", "--precisions", "fp32", "--new-tokens", "300"], "--new-tokens 300"),
    case("bench/new-tokens-zero", ["bench", "--generate", "--models", "tiny", "--precisions", "fp32", "--new-tokens", "0"], "--new-tokens 0"),
    case("bench/out-in-missing-directory", ["bench", "--models", "tiny", "--precisions", "fp32", "--steps", "1", "--out", "{tmp}/none/b.md"], "--out {tmp}/none/b.md", out="{tmp}/none"),
    case("bench/out-is-a-directory", ["bench", "--models", "tiny", "--precisions", "fp32", "--steps", "1", "--out", "{tmp}/d"], "--out {tmp}/d is a directory", files={"d": DIR}),
    case("bench/strategy-unknown", ["bench", "--strategies", "nosuch", "--data", "{data}", "--steps", "2"], "--strategies nosuch"),
    case("bench/strategy-data-missing", ["bench", "--strategies", "ddp", "--data", "{tmp}/none", "--steps", "2"], "no prepared data at {tmp}/none"),
    case("bench/strategy-nproc-zero", ["bench", "--strategies", "ddp", "--data", "{data}", "--nproc", "0"], "--nproc 0"),
    case("bench/strategy-without-data", ["bench", "--strategies", "ddp"], "--strategies needs --data DIR"),
]


# fmt: on

# A bad training command is refused alike by the run, by its --dry-run and through `lmforge
# submit` (all that the submitting host can check), with the same first line and exit code:
# the cases left out at submit, and why.
NOT_AT_SUBMIT = {
    "finetune/parallel-without-label-curve": "--parallel is the finetune command's own flag",
    **{
        f"finetune/label-curve-{k}": "--label-curve is the finetune command's own flag"
        for k in (
            "size-above-train",
            "label-short-of-2",
            "empty-grid",
            "sizes-fall",
            "all-is-a-size",
            "not-classification",
            "no-test-split",
            "test-missing",
            "parallel-zero",
            "against-missing",
        )
    },  # fmt: skip
    **{
        k: "--law and --probe are read where the run starts (its launching process or rank 0)"
        for k in (
            "pretrain/law-missing",
            "pretrain/law-not-a-fit",
            "pretrain/probe-too-few-steps",
            "finetune/law-has-no-law",
            "finetune/law-with-label-curve",
        )
    },
    "pretrain/run-exists": "a job continues its run: submit adds resume=auto",
    "pretrain/fp8-without-a-float8-gpu": "whether float8 runs is the job's nodes' to say",
    "pretrain/memory-does-not-fit": "the memory of the job's nodes is checked as the job starts",
    "pretrain/nproc-zero": "--nproc is the local launcher's flag (a job's: nproc_per_node)",
    "pretrain/nproc-not-a-number": "--nproc is the local launcher's flag",
}


def _other_starts(id_: str, argv: list[str]) -> dict[str, list[str]]:
    """``argv`` (a training command) under --dry-run and through `lmforge submit --dry-run`,
    whose profile gives the processes that ``--nproc`` gives a local run."""
    if argv[0] not in ("pretrain", "finetune"):
        return {}
    starts = {"--dry-run": [*argv, "--dry-run"]}
    if id_ not in NOT_AT_SUBMIT:
        job, profile = list(argv), []
        if "--nproc" in job:
            i = job.index("--nproc")
            profile = [f"nproc_per_node={job[i + 1]}"]
            del job[i : i + 2]
        starts["submit"] = ["submit", *profile, "--dry-run", "--", *job]
    return starts


# --- shared fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tiny_data, tmp_path_factory) -> dict:
    """The shared inputs: prepared data, a 2-step tiny run and its checkpoint, a classifier
    finetuned from it for 1 step, and data prepared with another tokenizer."""
    from lmforge.pretrain.config.schema import PrepareConfig, load_config
    from lmforge.pretrain.data.prepare import prepare

    root = tmp_path_factory.mktemp("bad-input")
    runs = root / "runs"
    lmforge(
        "pretrain",
        "name=tiny",
        f"runs_dir={runs}",
        f"data.path={tiny_data}",
        *TINY,
        "train.max_steps=2",
        "logging.plot=false",
    )
    task = root / "task.csv"
    task.write_text(GOOD_CSV + GOOD_CSV.split("\n", 1)[1] * 2)
    lmforge(
        *FINETUNE[:2],
        f"runs_dir={runs}",
        "name=cls",
        f"init_from={runs}/tiny",
        f"task.train={task}",
        *FINETUNE[4:],
    )
    other = str(root / "other")
    prepare(
        load_config(
            PrepareConfig,
            [
                f"out={other}",
                f"sources=[{{path: '{PLAY}', text_unit: paragraph}}]",
                "tokenizer.vocab_size=400",
                "val_fraction=0.1",
                "num_proc=1",
            ],
        ),
        log=lambda _: None,
    )
    run = str(runs / "tiny")
    return {
        "data": tiny_data,
        "run": run,
        "ckpt": os.path.join(run, "checkpoints", "step_00000002"),
        "cls": str(runs / "cls"),
        "other": other,
    }


def _tree(root: str) -> dict[str, tuple]:
    """Every path under ``root`` with its size and modification time."""
    out = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.lstat(path)  # a directory's entries are compared, not its times
            changes = name in files and name != ".lock"  # (a run's lock file is rewritten)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns) if changes else None
    return out


def _make_read_only(path: str) -> callable:
    """Make directory ``path`` unwritable, also for root (the immutable attribute); return the
    undo. Skips the test where neither works."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", path], capture_output=True).returncode
    ):
        pytest.skip("cannot make a directory read-only for root here (no chattr +i)")
    return lambda: subprocess.run(["chattr", "-i", path], check=True)


def _setup(root: str, files: dict, values: dict) -> list:
    undo = []
    for rel, content in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if content is DIR:
            os.makedirs(path, exist_ok=True)
        elif content is READ_ONLY:
            os.makedirs(path, exist_ok=True)
            undo.append(path)
        elif callable(content):
            content(path, values)
        else:
            with open(path, "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode())
    return [_make_read_only(p) for p in undo]


def _in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # what the user would see as a traceback
        out, err = capsys.readouterr()
        pytest.fail(f"exception escaped main:\n{traceback.format_exc()}\nstderr: {err[-2000:]}")
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,expect,files,out,proc", CASES)
def test_bad_input(env, tmp_path, capsys, monkeypatch, request, argv, expect, files, out, proc):
    """Non-zero exit, one error line (at most two lines on stderr) holding ``expect``, no
    traceback, and nothing written: the case's directory holds only what the test put there, the
    output the command would have written does not exist, the shared inputs are unchanged. A
    training command's --dry-run and its `lmforge submit` refuse it with the same line."""
    tmp = str(tmp_path / "case")
    os.mkdir(tmp)
    values = {**env, "tmp": tmp}
    argv = [_fill(a, values) for a in argv]
    expect = _fill(expect, values)
    undo = _setup(tmp, files, values)
    try:
        shared = {
            k: _tree(env[k])
            for k in ("data", "run", "cls", "other")
            if any(env[k] in a for a in argv)
        }
        before = _tree(tmp)
        if proc:
            res = lmforge(*argv, check=False, timeout=300)
            code, stdout, stderr = res.returncode, res.stdout, res.stderr
        else:
            monkeypatch.chdir(tmp)  # relative default outputs would land here
            code, stdout, stderr = _in_process(argv, capsys)
        lines = stderr.strip().splitlines()
        assert code != 0, (
            f"exit 0 for bad input\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
        )
        assert "Traceback" not in stdout + stderr, stdout[-3000:] + stderr[-3000:]
        assert 1 <= len(lines) <= 2, f"{len(lines)} lines on stderr:\n{stderr[-3000:]}"
        assert expect in stderr, f"{expect!r} not in stderr:\n{stderr[:3000]}"
        if out is not None:
            assert not os.path.exists(_fill(out, values)), f"{out} was written"
        assert _tree(tmp) == before, "the command left files behind (or changed the test's)"
        monkeypatch.chdir(tmp)
        for how, other in _other_starts(request.node.callspec.id, argv).items():
            got = _in_process(other, capsys)
            assert (got[0], got[2].strip().splitlines()[:1]) == (code, lines[:1]), (
                f"{how} differs from the run: exit {got[0]} vs {code}\nstderr: {got[2][-2000:]}"
            )
            assert _tree(tmp) == before, f"{how} left files behind"
        for key, tree in shared.items():
            assert _tree(env[key]) == tree, f"the shared {key} directory changed"
    finally:
        for u in undo:
            u()
