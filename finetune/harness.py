"""`lmforge evaluate PATH --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on a model.

The harness scores a Hugging Face causal LM through its ``hf`` model class, so a run or
checkpoint is first exported (finetune/export.py) to a temporary directory beside the results,
removed afterwards; an exported directory is scored as it is. Tasks are the harness's own names
or those of task YAML files in directories given with ``--lm-eval-include`` (local tasks run
offline: a ``dataset_path: json`` task reads its ``data_files``).

Results (the harness's metrics per task, with the settings that produced them) go beside what
was evaluated, merged with earlier results of other tasks:

    RUN or CHECKPOINT    <run>/eval/lm_eval_<step>.json (the checkpoint's training step)
    exported directory   <dir>/lm_eval.json, and every task's metrics in the model card's
                         front matter (README.md, ``model-index``: see update_model_card)
    consolidated dir     <dir>/lm_eval.json

The harness is an optional dependency (``pip install 'lmforge[lmeval]'``), imported only here.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import tempfile

import yaml

from lmforge.pretrain.core.durable import replace_durable
from lmforge.pretrain.core.errors import ConfigurationError

EXTRA = "lmeval"  # pip install 'lmforge[lmeval]'
HARNESS = "lm-evaluation-harness"
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_FRONT = re.compile(r"\A---\r?\n(.*?\r?\n)?---\r?\n?", re.S)


def import_harness():
    """The ``lm_eval`` package, or one line naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"--lm-eval needs EleutherAI's lm-evaluation-harness ({exc.name or 'lm_eval'} is "
            f"not importable): pip install 'lmforge[{EXTRA}]'"
        ) from None
    return lm_eval


def _task_manager(lm_eval, tasks: list[str], include: list[str]):
    """The harness's task index. When every task is one of the include directories', only
    those are indexed (the harness's own thousands of task files take a while to read)."""
    for path in include:
        if not os.path.exists(path):
            raise ConfigurationError(
                f"--lm-eval-include {path}: no such directory of task YAML files"
            )
    include_path = [os.path.abspath(p) for p in include]
    if include_path:
        local = lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=False)
        if all(task in set(local.all_tasks) for task in tasks):
            return local
    manager = lm_eval.tasks.TaskManager(include_path=include_path or None)
    known = set(manager.all_tasks)
    for task in tasks:
        if task in known:
            continue
        close = difflib.get_close_matches(task, sorted(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = f" or in {', '.join(include)}" if include else ""
        raise ConfigurationError(
            f"--lm-eval {task}: no such task among the harness's tasks{where}{hint}; give a "
            "task name, or the directory of your task YAML with --lm-eval-include DIR"
        )
    return manager


def _where(path: str) -> tuple[str | None, str, int | None, str]:
    """(export dir or None, results file, training step, causal-LM check's subject)."""
    from lmforge.pretrain.checkpoint.model_source import load_source
    from lmforge.pretrain.checkpoint.store import read_trainer_state

    if os.path.isfile(os.path.join(path, "config.json")):  # an exported directory
        with open(os.path.join(path, "config.json")) as f:
            arch = (json.load(f).get("architectures") or [""])[0]
        if not arch.endswith("ForCausalLM"):
            raise ConfigurationError(
                f"{path} is a {arch or 'non-causal'} model; the harness scores language models "
                "(an export of a pretrained or sft model)"
            )
        return path, os.path.join(path, "lm_eval.json"), None, path
    src = load_source(path)  # a run, checkpoint or consolidated directory (weights not read)
    if src.n_out is not None:
        raise ConfigurationError(
            f"{path} is a {src.task['type']} model with a classifier head; the harness scores "
            "language models (a pretrained or sft run)"
        )
    if src.kind == "consolidated":
        return None, os.path.join(src.path, "lm_eval.json"), None, src.path
    step = int(read_trainer_state(src.path)["step"])
    run = os.path.dirname(os.path.dirname(os.path.abspath(src.path)))
    return None, os.path.join(run, "eval", f"lm_eval_{step}.json"), step, src.path


def _metrics(task_results: dict) -> dict[str, float]:
    """``{"acc": 0.5, "acc_stderr": 0.1, ...}`` from the harness's ``{"acc,none": 0.5, ...}``
    (a filter other than ``none`` stays in the name: ``exact_match,strict``)."""
    out = {}
    for key, value in task_results.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, comma, filt = key.partition(",")
        if not comma:  # bookkeeping (sample_len), not a metric
            continue
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out


def run_lm_eval(
    path: str,
    *,
    tasks: list[str],
    include: list[str] = (),
    batch_size: str = "1",
    device: str | None = None,
    dtype: str = "fp32",
    limit: float | None = None,
    num_fewshot: int | None = None,
) -> dict:
    """Score the model at ``path`` on ``tasks``; write and return the results (see the module
    docstring for where)."""
    if dtype not in _TORCH_DTYPES:
        raise ConfigurationError(f"--dtype {dtype}: use one of {', '.join(_TORCH_DTYPES)}")
    tasks = [t for t in tasks if t]
    if not tasks:
        raise ConfigurationError("--lm-eval: give task names, e.g. --lm-eval hellaswag,arc_easy")
    if limit is not None and limit <= 0:
        raise ConfigurationError(f"--lm-eval-limit {limit:g}: give a positive number")
    if not re.fullmatch(r"auto(:[1-9]\d*)?|[1-9]\d*", str(batch_size)):
        raise ConfigurationError(
            f"--lm-eval-batch-size {batch_size}: give a number of examples, or auto"
        )
    lm_eval = import_harness()
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    export_dir, results_path, step, source = _where(path)
    manager = _task_manager(lm_eval, tasks, list(include))
    results_dir = os.path.dirname(results_path)
    created = not os.path.isdir(results_dir)
    os.makedirs(results_dir, exist_ok=True)

    tmp = None
    try:
        if export_dir is None:
            from lmforge.finetune.export import export

            # private (mkdtemp's 0700) on purpose: an export only the harness reads, removed
            # when it is done
            tmp = tempfile.mkdtemp(prefix=".lm-eval-", dir=os.path.dirname(results_path))
            model_dir = export(path, out=os.path.join(tmp, "model"), dtype=dtype)
        else:
            model_dir = export_dir
        raw = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": model_dir, "dtype": _TORCH_DTYPES[dtype]},
            tasks=tasks,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp = None
        if created:  # a failed evaluation leaves no empty eval/ behind
            with contextlib.suppress(OSError):
                os.rmdir(results_dir)
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if raw is None:  # not rank 0 of a distributed harness run
        return {}
    result = {
        "harness": HARNESS,
        "harness_version": getattr(lm_eval, "__version__", None),
        "model": source,
        "step": step,
        "settings": {
            "dtype": dtype,
            "device": device,
            "batch_size": batch_size,
            "limit": limit,
            "num_fewshot": num_fewshot,
        },
        "results": {
            task: {
                "metrics": _metrics(values),
                "n_shot": (raw.get("n-shot") or {}).get(task),
                "samples": (raw.get("n-samples") or {}).get(task),
                "version": (raw.get("versions") or {}).get(task),
                "higher_is_better": (raw.get("higher_is_better") or {}).get(task),
            }
            for task, values in raw["results"].items()
        },
    }
    _save(results_path, result)
    if export_dir is not None:
        update_model_card(export_dir, result)
    result["file"] = results_path
    return result


def _save(path: str, result: dict) -> None:
    """Write ``result``, keeping the other tasks of an earlier file (a task evaluated again is
    replaced)."""
    merged = dict(result)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
            merged["results"] = {**old.get("results", {}), **result["results"]}
        except (OSError, ValueError, AttributeError):
            pass  # an unreadable earlier file is replaced
    replace_durable(path, (json.dumps(merged, indent=1, default=str) + "\n").encode())


def update_model_card(export_dir: str, result: dict) -> str:
    """Put the harness's metrics into the model card's YAML front matter (``model-index``, the
    Hub's schema): one result per task, tagged with the harness as its source, replacing that
    task's earlier result; the other results and the card's text are kept. A card without
    front matter gets one. Returns the card's path."""
    card = os.path.join(export_dir, "README.md")
    text = ""
    if os.path.isfile(card):
        with open(card, encoding="utf-8") as f:
            text = f.read()
    match = _FRONT.match(text)
    matter = (yaml.safe_load(match.group(1) or "") if match else None) or {}
    body = text[match.end() :] if match else text
    if not isinstance(matter, dict):
        matter = {}
    index = matter.get("model-index")
    if not isinstance(index, list) or not index or not isinstance(index[0], dict):
        index = [{"name": os.path.basename(os.path.abspath(export_dir))}]
    entry = index[0]
    entries = [r for r in entry.get("results") or [] if isinstance(r, dict)]
    tasks = set(result["results"])
    kept = [
        r
        for r in entries
        if not (
            (r.get("source") or {}).get("name") == HARNESS
            and (r.get("dataset") or {}).get("name") in tasks
        )
    ]
    for task, info in result["results"].items():
        shots = info.get("n_shot")
        shot = f", {shots}-shot" if shots is not None else ""
        metrics = [
            {"type": name, "value": value, "name": f"{name} ({HARNESS}{shot})"}
            for name, value in info["metrics"].items()
            if not name.split(",")[0].endswith("_stderr")
        ]
        kept.append(
            {
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": {"name": task, "type": task},
                "metrics": metrics,
                "source": {"name": HARNESS},
            }
        )
    entry["results"] = kept
    matter["model-index"] = [entry, *index[1:]]
    front = yaml.safe_dump(matter, sort_keys=False, allow_unicode=True, width=1000)
    new = f"---\n{front}---\n" + (body if body.startswith("\n") or not body else "\n" + body)
    replace_durable(card, new.encode("utf-8"))
    return card
