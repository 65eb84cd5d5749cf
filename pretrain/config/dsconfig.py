"""The user's DeepSpeed JSON (``parallel.deepspeed_config``): read, checked, and reconciled with
the run's config before any process starts.

What comes from where:

- **ZeRO stage and offload.** ``parallel.zero_stage``, ``parallel.offload_optimizer`` and
  ``parallel.offload_params`` win when they are set (in a config file, a preset such as
  configs/parallel/zero3.yaml, or on the command line); left unset (null) the JSON's
  ``zero_optimization.stage``, ``offload_optimizer`` and ``offload_param`` decide, else stage 2
  without offload. The engine's first line says which won (:func:`zero_choice`). Offload goes to
  the CPU; ``"device": "nvme"`` is refused.
- **Batch, precision, clipping** (``train_micro_batch_size_per_gpu``,
  ``gradient_accumulation_steps``, ``train_batch_size``, ``gradient_clipping``, ``bf16`` /
  ``fp16.enabled``) always come from the train section; a JSON value that differs is replaced
  with a warning, ``"auto"`` silently.
- **"auto"** is filled in as transformers' DeepSpeed integration does: the batch keys, clipping
  and precision from the train section; ``optimizer.params`` (lr, betas, eps, weight_decay) from
  ``optim.*``; ``scheduler.params`` (warmup_min_lr 0, warmup_max_lr = optim.lr,
  warmup_num_steps = optim.warmup_steps (at least 1), total_num_steps = the run's steps); in
  ``zero_optimization``, reduce_bucket_size = hidden², stage3_prefetch_bucket_size =
  0.9·hidden², stage3_param_persistence_threshold = 10·hidden (hidden: the model's width). An
  "auto" anywhere else is refused, naming the key.
- **optimizer / scheduler blocks.** lmforge's trainer owns the optimizer (torch AdamW with
  decay/no-decay groups) and the learning-rate schedule: both are checkpointed with the run and
  resume under any strategy. A block whose values are all "auto" or equal to what ``optim.*``
  gives is accepted and not passed to DeepSpeed (the engine's first lines say so); any other
  value is refused in one line that names it and the ``optim.*`` key to set instead.

Imports neither torch nor deepspeed: the config checks the JSON when it is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from lmforge.pretrain.core.errors import ConfigurationError

AUTO = "auto"

# The keys the train section decides; the JSON may leave them out, say "auto" or agree.
OWNED_DS_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "bf16",
    "fp16",
)
# DeepSpeed's optimizer types that are AdamW (DeepSpeed's "Adam" is AdamW unless
# adam_w_mode=false), and settings of theirs that do not change the update.
ADAM_TYPES = ("adam", "adamw")
ADAM_SAME_AS_ADAMW = {"adam_w_mode": True, "bias_correction": True, "amsgrad": False}
ADAM_IMPLEMENTATION = ("torch_adam", "fused")
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")
# Scheduler settings that match lmforge's schedule whatever the run (linear warmup, no offset).
SCHEDULER_NEUTRAL = {"last_batch_iteration": -1, "warmup_type": "linear"}

_cache: dict[tuple, dict] = {}


def read_deepspeed_json(path: str) -> dict:
    """The JSON object in ``path`` (a fresh copy; the file is parsed once per version), or one
    line saying what is wrong with it."""
    try:
        st = os.stat(path)
    except OSError:
        raise ConfigurationError(f"`parallel.deepspeed_config`: no such file {path}") from None
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _cache:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"`parallel.deepspeed_config` {path} is not valid JSON ({exc.msg} at line "
                f"{exc.lineno} column {exc.colno}); fix the file"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"`parallel.deepspeed_config` {path} cannot be read ({exc}); give a readable "
                "UTF-8 JSON file"
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigurationError(
                f"`parallel.deepspeed_config` {path} must hold a JSON object (a DeepSpeed "
                f"config), not a {type(loaded).__name__}"
            )
        _cache[key] = loaded
    return json.loads(json.dumps(_cache[key]))  # callers may change their copy


def user_json(parallel) -> dict:
    """The run's DeepSpeed JSON, or {} without one."""
    return read_deepspeed_json(parallel.deepspeed_config) if parallel.deepspeed_config else {}


def zero_section(config: dict, path: str = "the DeepSpeed JSON") -> dict:
    """The JSON's ``zero_optimization`` as a dict (DeepSpeed's old ``true``/``false`` form is
    stage 1 / 0)."""
    zero = config.get("zero_optimization", {})
    if isinstance(zero, bool):
        return {"stage": 1 if zero else 0}
    if not isinstance(zero, dict):
        raise ConfigurationError(
            f'{path}: `zero_optimization` must be an object, e.g. {{"stage": 2}}, not '
            f"{json.dumps(zero)}"
        )
    for old, new in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param")):
        if old in zero:
            raise ConfigurationError(
                f"{path}: `zero_optimization.{old}` is DeepSpeed's old spelling; write "
                f'"{new}": {{"device": "cpu"}} instead'
            )
    return dict(zero)


@dataclass(frozen=True)
class ZeroChoice:
    """The ZeRO stage and offloads a deepspeed run uses, and where each came from."""

    stage: int
    offload_optimizer: bool
    offload_params: bool
    stage_from: str
    offload_optimizer_from: str
    offload_params_from: str
    notes: tuple[str, ...]

    def describe(self) -> str:
        """``ZeRO-3 (ds.json), optimizer offloaded to cpu (parallel.offload_optimizer=true)``"""
        out = f"ZeRO-{self.stage} ({self.stage_from})"
        if self.offload_optimizer:
            out += f", optimizer state offloaded to cpu ({self.offload_optimizer_from})"
        if self.offload_params:
            out += f", parameters offloaded to cpu ({self.offload_params_from})"
        return out


def _json_offload(zero: dict, key: str, path: str) -> bool | None:
    """What the JSON says of one offload: True (cpu), False (none), None (nothing)."""
    if key not in zero or zero[key] is None:
        return None
    value = zero[key]
    if not isinstance(value, dict):
        raise ConfigurationError(
            f'{path}: `zero_optimization.{key}` must be an object such as {{"device": "cpu"}}, '
            f"not {json.dumps(value)}"
        )
    device = value.get("device", "none")
    if device == "nvme":
        raise ConfigurationError(
            f'{path}: `zero_optimization.{key}.device` "nvme" is not supported by lmforge '
            '(offload goes to CPU memory); use "device": "cpu"'
        )
    if device not in ("cpu", "none"):
        raise ConfigurationError(
            f'{path}: `zero_optimization.{key}.device` must be "cpu" or "none", got '
            f"{json.dumps(device)}"
        )
    return device == "cpu"


def zero_choice(parallel) -> ZeroChoice:
    """Stage and offloads of a deepspeed run: ``parallel``'s where set, else the JSON's, else
    stage 2 without offload; ``notes`` says where each setting of the JSON went."""
    path = parallel.deepspeed_config or ""
    name = os.path.basename(path)
    zero = zero_section(user_json(parallel), path) if path else {}
    notes = []

    json_stage = zero.get("stage")
    if json_stage is not None and (
        isinstance(json_stage, bool)
        or not isinstance(json_stage, int)
        or json_stage not in range(4)
    ):
        raise ConfigurationError(
            f"{path}: `zero_optimization.stage` must be 0, 1, 2 or 3, got {json.dumps(json_stage)}"
        )
    if parallel.zero_stage is not None:
        stage, stage_from = parallel.zero_stage, f"parallel.zero_stage={parallel.zero_stage}"
        if json_stage is not None and json_stage != stage:
            notes.append(f"{stage_from} wins over {name}'s zero_optimization.stage={json_stage}")
    elif json_stage is not None:
        stage, stage_from = json_stage, name
        notes.append(f"ZeRO stage {stage} from {name} (parallel.zero_stage not set)")
    else:
        stage, stage_from = 2, "the default"

    def offload(field: str, json_key: str) -> tuple[bool, str]:
        theirs = _json_offload(zero, json_key, path) if zero else None
        ours = getattr(parallel, field)
        word = {True: "cpu", False: "none"}
        if ours is not None:
            where = f"parallel.{field}={str(bool(ours)).lower()}"
            if theirs is not None and theirs != bool(ours):
                notes.append(f"{where} wins over {name}'s {json_key} device {word[theirs]}")
            return bool(ours), where
        if theirs is not None:
            if theirs:
                notes.append(f"{json_key} to cpu from {name} (parallel.{field} not set)")
            return theirs, name
        return False, "the default"

    off_opt, off_opt_from = offload("offload_optimizer", "offload_optimizer")
    off_par, off_par_from = offload("offload_params", "offload_param")
    return ZeroChoice(stage, off_opt, off_par, stage_from, off_opt_from, off_par_from, tuple(notes))


# --- "auto" ---------------------------------------------------------------------------------------
def _node(config: dict, dotted: str) -> tuple[dict | None, str]:
    """The dict holding ``dotted``'s last part (None when a parent is missing) and that part."""
    *parents, leaf = dotted.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None, leaf
    return (node if isinstance(node, dict) else None), leaf


def fill_auto(config: dict, values: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Replace each "auto" at a dotted key of ``values`` with its value (in place); return the
    keys the JSON sets to something else, as (key, JSON's value, ours)."""
    differ = []
    for dotted, ours in values.items():
        node, leaf = _node(config, dotted)
        if node is None or leaf not in node:
            continue
        if node[leaf] == AUTO:
            node[leaf] = ours
        elif not _same(node[leaf], ours):
            differ.append((dotted, node[leaf], ours))
    return differ


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def autos_left(config: Any, prefix: str = "") -> list[str]:
    """Dotted keys still holding "auto"."""
    if isinstance(config, dict):
        return [k for key, v in config.items() for k in autos_left(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if config == AUTO else []


def refuse_autos_left(config: dict, path: str) -> None:
    left = autos_left(config)
    if left:
        raise ConfigurationError(
            f'{path}: `{left[0]}` is "auto", which lmforge does not fill in (it fills the '
            "batch, clipping, precision, optimizer, scheduler and ZeRO bucket keys); give a value"
        )


def zero_autos(hidden_size: int) -> dict[str, int]:
    """``zero_optimization`` values of "auto" keys for a model of width ``hidden_size``."""
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


# --- the optimizer and scheduler blocks -----------------------------------------------------------
def optimizer_values(optim) -> dict[str, Any]:
    """What an "optimizer" block's params resolve to (``optim`` is the run's OptimConfig)."""
    return {
        "optimizer.params.lr": optim.lr,
        "optimizer.params.betas": [optim.beta1, optim.beta2],
        "optimizer.params.eps": optim.eps,
        "optimizer.params.weight_decay": optim.weight_decay,
    }


def scheduler_values(optim, total_steps: int | None) -> dict[str, Any]:
    """What a "scheduler" block's params resolve to (``total_steps``: the run's length, None
    when it depends on the data)."""
    values = {
        "scheduler.params.warmup_min_lr": 0,
        "scheduler.params.warmup_max_lr": optim.lr,
        # DeepSpeed refuses 0 warmup steps; lmforge's warmup of 0 is the same as 1 step.
        "scheduler.params.warmup_num_steps": max(1, optim.warmup_steps),
    }
    if total_steps is not None:
        values["scheduler.params.total_num_steps"] = total_steps
    return values


# optimizer.params / scheduler.params key -> the optim.* key to set instead
_OPTIM_KEYS = {
    "lr": "optim.lr",
    "betas": "optim.beta1 and optim.beta2",
    "eps": "optim.eps",
    "weight_decay": "optim.weight_decay",
    "warmup_max_lr": "optim.lr",
    "warmup_num_steps": "optim.warmup_steps",
    "warmup_min_lr": "optim.min_lr_ratio / optim.schedule",
    "total_num_steps": "train.max_steps",
}


def resolve_blocks(parallel, optim, *, total_steps: int | None) -> dict[str, dict]:
    """The JSON's "optimizer" and "scheduler" blocks with their "auto" values filled in from
    ``optim`` (and ``total_steps``), or one line refusing a block that would train differently
    from lmforge's AdamW and schedule. Returns the blocks there are, resolved (they are never
    passed to DeepSpeed: lmforge's own optimizer and schedule run with these values)."""
    path = parallel.deepspeed_config
    config = user_json(parallel)
    out: dict[str, dict] = {}
    why = (
        "lmforge's trainer owns the optimizer (torch AdamW with decay groups) and its schedule, "
        "checkpointed and resumed with the run"
    )
    for block in ("optimizer", "scheduler"):
        if block not in config or config[block] is None:
            continue
        section = config[block]
        if not isinstance(section, dict) or not isinstance(section.get("params", {}), dict):
            raise ConfigurationError(
                f'{path}: `{block}` must be an object with "type" and "params"; {why}: remove '
                f"the block and set optim.* instead"
            )
        kind = str(section.get("type", ""))
        params = section.setdefault("params", {})
        if block == "optimizer":
            if kind.lower() not in ADAM_TYPES:
                raise ConfigurationError(
                    f'{path}: optimizer type "{kind}": {why}; remove the "optimizer" block '
                    "(lmforge trains with AdamW, set optim.* for its values)"
                )
            values = optimizer_values(optim)
            neutral = {**ADAM_SAME_AS_ADAMW, **{k: params.get(k) for k in ADAM_IMPLEMENTATION}}
        else:
            if kind not in SCHEDULER_TYPES:
                raise ConfigurationError(
                    f'{path}: scheduler type "{kind}" is not a DeepSpeed scheduler '
                    f'({", ".join(SCHEDULER_TYPES)}); {why}: remove the "scheduler" block'
                )
            values = scheduler_values(optim, total_steps)
            neutral = dict(SCHEDULER_NEUTRAL)
        differ = fill_auto({block: section}, values)
        known = {k.rsplit(".", 1)[1] for k in values}
        for key, value in params.items():
            if key in known or (key in neutral and _same(value, neutral[key])):
                continue
            if key == "total_num_steps" and total_steps is None:
                raise ConfigurationError(
                    f"{path}: `scheduler.params.total_num_steps`={json.dumps(value)}: the run's "
                    f'length depends on its data; write "auto" (or remove the "scheduler" block)'
                )
            raise ConfigurationError(
                f"{path}: `{block}.params.{key}`={json.dumps(value)} is not a setting of "
                f'lmforge\'s AdamW and schedule ({why}); remove it, or the "{block}" block'
            )
        if differ:
            key, theirs, ours = differ[0]
            leaf = key.rsplit(".", 1)[1]
            raise ConfigurationError(
                f"{path}: `{key}`={json.dumps(theirs)} differs from lmforge's {json.dumps(ours)} "
                f'({_OPTIM_KEYS[leaf]}); {why}: write "auto" or remove the "{block}" block, '
                f"and set {_OPTIM_KEYS[leaf]} instead"
            )
        left = autos_left(section)
        if left:
            raise ConfigurationError(
                f'{path}: `{block}.{left[0].removeprefix(block + ".")}` is "auto", which lmforge '
                f'does not fill in; give a value or remove the "{block}" block'
            )
        out[block] = section
    return out


# The "auto" keys lmforge fills in outside the optimizer and scheduler blocks.
FILLED_AUTOS = (
    *(k for k in OWNED_DS_KEYS if k not in ("bf16", "fp16")),
    "bf16.enabled",
    "fp16.enabled",
    *(f"zero_optimization.{k}" for k in zero_autos(1)),
)


def check_deepspeed_json(parallel, optim=None, *, total_steps: int | None = None) -> None:
    """Everything about the JSON that can be checked before any process starts: its ZeRO
    section (stage, offload), "auto" where lmforge fills none in, and, given ``optim``, its
    optimizer and scheduler blocks."""
    if not parallel.deepspeed_config:
        return
    path = parallel.deepspeed_config
    zero_choice(parallel)
    config = user_json(parallel)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if isinstance(config.get("zero_optimization"), dict):
        config["zero_optimization"] = zero_section(config, path)
    fill_auto(config, dict.fromkeys(FILLED_AUTOS, 0))
    refuse_autos_left(config, path)
    if optim is not None:
        resolve_blocks(parallel, optim, total_steps=total_steps)
