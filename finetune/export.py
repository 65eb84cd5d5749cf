"""`lmforge export RUN|CHECKPOINT|DIR --out DIR`: a Hugging Face `transformers` model directory.

    config.json               the config of the model's family (Llama, Mistral, Qwen2, Qwen3:
                              `model.family`); architectures ...ForCausalLM, or
                              ...ForSequenceClassification / ...ForTokenClassification with
                              id2label / label2id and pad_token_id (the classifier reads the last
                              token that is not padding)
    model.safetensors         weights under transformers' names, LoRA adapters merged
    generation_config.json    BOS/EOS/pad ids and sampling defaults
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                              a fast tokenizer whose ids equal lmforge's SentencePiece ids
                              (finetune/hf_tokenizer.py), set to cut, pad and template inputs as
                              lmforge does for this head (`preprocessing` below); tokenizer.model,
                              the SentencePiece model itself
    lmforge.json              source checkpoint, task, base model, evaluation, compute (tokens
                              and FLOPs of every stage)
    README.md                 model card: Hub front matter (license, pipeline_tag, tags,
                              base_model, datasets, model-index), preprocessing, data, compute,
                              metrics, how to load

What an export says about where it came from names runs, checkpoints and data files by their
names only (`<run>/checkpoints/step_…`, `train.csv`): a path of the machine that made it would
be useless to whoever it is shared with. `datasets` names and `pkg://` sources are kept whole.

Any parallel layout exports the same (weights are rebuilt from the shards). Written to a temp
directory and renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
import yaml

from lmforge.finetune.hf_tokenizer import (
    instruction_chat_template,
    write_tokenizer,
)
from lmforge.finetune.model import build_model
from lmforge.finetune.prompts import DEFAULT_TEMPLATE, PromptFormat
from lmforge.pretrain.checkpoint.consolidate import DTYPES
from lmforge.pretrain.checkpoint.model_source import ModelSource, check_tokenizer_fits, load_source
from lmforge.pretrain.core.durable import (
    atomic_directory,
    check_new_dir,
    check_writable,
    write_durable,
)
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.pretrain.model.hf_mapping import architecture, hf_config, to_hf_name

PIPELINE_TAGS = {
    None: "text-generation",
    "sft": "text-generation",
    "classification": "text-classification",
    "token_classification": "token-classification",
}
_TASK_NAMES = {
    "text-generation": "Text Generation",
    "text-classification": "Text Classification",
    "token-classification": "Token Classification",
}
# eval row key -> (model-index metric type, its name on the card), per head
_METRICS = {
    "classification": {
        "accuracy": ("accuracy", "accuracy"),
        "macro_f1": ("f1", "macro-F1"),
        "val_loss": ("loss", "cross-entropy"),
    },
    "token_classification": {
        "f1": ("f1", "entity F1"),
        "precision": ("precision", "entity precision"),
        "recall": ("recall", "entity recall"),
        "accuracy": ("accuracy", "token accuracy"),
        "val_loss": ("loss", "cross-entropy"),
    },
    None: {
        "val_loss": ("loss", "cross-entropy per token"),
        "val_ppl": ("perplexity", "perplexity"),
    },
}
LICENSE_PLACEHOLDER = "unknown"
# A Hugging Face cache snapshot: .../models--<org>--<name>/snapshots/<revision>
_HUB_CACHE = re.compile(r"models--([\w.-]+?)--([\w.-]+)[/\\]snapshots[/\\]")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".gz", ".bz2", ".xz")


def export(path: str, *, out: str, dtype: str = "fp32") -> str:
    """Export the model at ``path`` to ``out`` (a new directory); return ``out``."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ConfigurationError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    check_new_dir(out)
    check_writable(out, "--out ")
    src = load_source(path)
    if src.tokenizer is None:
        raise ConfigurationError(
            f"{path} does not name its tokenizer (or the file moved); an export needs it: put "
            "the tokenizer.model (or tokenizer.json and its files) it trained with next to the "
            "weights"
        )
    tok = load_tokenizer(src.tokenizer)
    check_tokenizer_fits(src.tokenizer, tok.vocab_size, src.model.vocab_size)
    model = build_model(src)
    task = src.task or {}
    kind = task.get("type")
    prep = preprocessing(task or None, context=src.model.max_seq_len, tok=tok)
    head = "lm_head" if src.n_out is None else "score"
    arch = architecture(src.model.family, kind)
    weights = {
        to_hf_name(k, head=head): v.detach().to(DTYPES[dtype]).contiguous()
        for k, v in model.state_dict().items()
        if not (model.tied and k == "output.weight")  # transformers re-ties lm_head itself
    }
    extra: dict = {
        "architectures": [arch],
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        # lmforge's SentencePiece models have no pad piece: padded positions are masked anyway
        "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eos_id,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
    }
    if src.n_out is not None:
        labels = task["labels"]
        extra.update(
            id2label={i: name for i, name in enumerate(labels)},
            label2id={name: i for i, name in enumerate(labels)},
        )
        if kind == "token_classification":  # transformers' token head has a bias: zero here
            weights["score.bias"] = torch.zeros(len(labels), dtype=DTYPES[dtype])
    config = hf_config(src.model, **extra)
    origin = _origin(src)
    meta = {
        "source": origin["source"],
        "task": _shareable_task(task) or None,
        "base_model": origin["base"],
        "datasets": origin["datasets"],
        "evaluation": origin["evaluation"],
        "compute": src.compute,
        "dtype": dtype,
        "parameters": sum(v.numel() for v in model.state_dict().values()),
        "tokenizer_sha256": tok.sha256,
    }

    with atomic_directory(out, prefix=".export-") as tmp:
        config.save_pretrained(tmp)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _generation_config(tok, task).save_pretrained(tmp)
        tokenizer_settings = {
            "model_max_length": prep.model_max_length,
            "truncation_side": prep.truncation_side,
            "padding_side": prep.padding_side,
            "chat_template": prep.chat_template,
        }
        write_tokenizer(tok, tmp, **tokenizer_settings)
        write_durable(os.path.join(tmp, "lmforge.json"), json.dumps(meta, indent=1).encode())
        card = model_card(src, meta, arch=arch, out=out, prep=prep)
        write_durable(os.path.join(tmp, "README.md"), card.encode())
    print(f"exported {src.path} ({arch}, {meta['parameters']:,} parameters, {dtype}) -> {out}")
    return out


# --------------------------------------------------------------------------------------------
# preprocessing: what lmforge feeds each head, as tokenizer settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How lmforge turns an input into model input for one head (finetune/data.py for
    training and `lmforge evaluate`, finetune/inference.py for `lmforge generate`), in the
    terms of a transformers tokenizer, and in words for the model card."""

    model_max_length: int
    truncation_side: str
    padding_side: str
    chat_template: str | None
    lines: tuple[str, ...]


def preprocessing(
    task: dict | None, *, context: int, tok: Tokenizer | None = None
) -> Preprocessing:
    """The tokenizer settings under which transformers' usual ``truncation=True`` (and
    ``padding=True``) give a model exactly the input lmforge gives it (``tok``: the model's
    tokenizer, for the card's words; None: a SentencePiece model of lmforge's)."""
    kind = (task or {}).get("type")
    # a Hugging Face directory lmforge did not write has no task.max_len: the context then
    known = (task or {}).get("max_len") is not None
    n = int(task["max_len"]) if known else context
    ids = "SentencePiece ids" if tok is None else f"ids of {tok.file_name}"
    if tok is None or tok.pad_id is None:
        eos = "</s>" if tok is None else tok.id_to_piece(tok.eos_id)
        pad = f"`{eos}` (the model has no padding piece; padded positions are masked)"
    else:
        pad = f"`{tok.id_to_piece(tok.pad_id)}` (padded positions are masked)"
    if kind == "classification":
        if not known:
            length = "The context: no finetuning length (`task.max_len`) is recorded."
        elif n < context:
            length = (
                f"This is the finetuning length `task.max_len`, shorter than the {context}-token "
                f"context: a text read whole (up to {context} tokens) can be classified "
                "differently."
            )
        else:
            length = "This is the finetuning length `task.max_len`, the context."
        return Preprocessing(
            n,
            "left",
            "right",
            None,
            (
                f"Text → {ids}, no BOS/EOS added.",
                f"A text longer than {n} tokens keeps its last {n} (`model_max_length: {n}`, "
                f"`truncation_side: left`): the head reads the last token. {length}",
                f"Batches are padded on the right (`padding_side: right`) with {pad}; the head "
                "reads the last token that is not padding.",
                "Pass `truncation=True` to the tokenizer or the pipeline (transformers does not "
                "truncate by default).",
            ),
        )
    if kind == "token_classification":
        words = _words_line(ids, tok)
        return Preprocessing(
            n,
            "right",
            "right",
            None,
            (
                f"{words}, no BOS/EOS added; a word's label is read at its first sub-word.",
                f"An example longer than {n} tokens keeps its first {n} "
                f"(`model_max_length: {n}`, `truncation_side: right`): lmforge keeps the "
                "words that fit whole; transformers cuts inside a word, so a word cut at the "
                "limit gets a label from its first sub-words where lmforge gives it none. "
                "Every other word gets the same label.",
                f"Batches are padded on the right (`padding_side: right`) with {pad}.",
                "Pass `truncation=True` to the tokenizer (transformers does not truncate by "
                "default).",
            ),
        )
    lines = [
        f"Text → {ids}, no BOS/EOS added.",
        f"Generation reads the prompt's last {context} tokens, the context "
        f"(`model_max_length: {context}`, `truncation_side: left`), as `lmforge generate` "
        "does; past the context lmforge slides its window while transformers keeps all tokens.",
        f"Batches are padded on the left (`padding_side: left`) with {pad}, as generation with "
        "an attention mask needs; lmforge generates one prompt at a time.",
    ]
    if kind != "sft":
        return Preprocessing(context, "left", "left", None, tuple(lines))
    chat_template, sft_lines = _sft_lines(task, n, tok)
    lines[1:1] = sft_lines
    return Preprocessing(context, "left", "left", chat_template, tuple(lines))


def _words_line(ids: str, tok: Tokenizer | None) -> str:
    """How token classification encodes its words, for the card."""
    if tok is not None and tok.encode_word("a") != tok.encode("a"):  # (a byte-level BPE)
        return (
            f"Words → {ids}, each word encoded on its own after a space, as inside running "
            "text (with transformers: the words as `[' ' + w for w in words]` and "
            "`is_split_into_words=True`)"
        )
    return (
        f"Words → {ids}, each word encoded on its own with its leading space "
        "(`is_split_into_words=True`)"
    )


def _sft_lines(task: dict, n: int, tok: Tokenizer | None) -> tuple[str | None, list[str]]:
    """An instruction model's prompt format for the card, and the chat template its tokenizer
    gets (None: the tokenizer's own, kept as it is; finetune/prompts.py)."""
    packed = ", and short examples were packed together." if task.get("packing") else "."
    length = (
        f"Finetuned on examples of at most {n} tokens (`task.max_len`): a longer prompt lost "
        f"its start, a longer response its end{packed}"
    )
    if task.get("template") is None and (tok is None or tok.chat_template is not None):
        ends = "its end of turn" if tok is None else _stop_names(tok, task)
        return None, [
            "A prompt is one user message in the tokenizer's own `chat_template`, rendered with "
            "`add_generation_prompt=True` (`apply_chat_template`); the response is the "
            f"assistant's turn as the template writes it, ending with {ends} (generation stops "
            "there: `eos_token_id` in generation_config.json).",
            length,
        ]
    template = task.get("template") or DEFAULT_TEMPLATE
    return instruction_chat_template(template), [
        f"A prompt is put into the template {json.dumps(template, ensure_ascii=False)} "
        "(`{prompt}` replaced); the tokenizer's `chat_template` renders one user message "
        "exactly so, response header included (with or without `add_generation_prompt`). "
        "The response follows the template directly and ends with "
        f"`{'</s>' if tok is None else tok.id_to_piece(tok.eos_id)}`.",
        length,
    ]


# --------------------------------------------------------------------------------------------
# provenance, without this machine's paths
# --------------------------------------------------------------------------------------------


def _local_name(path: str) -> str:
    """A run, checkpoint or file by name: `<run>/checkpoints/<step>` or the base name."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return "/".join(parts[-3:])
    return parts[-1]


def _hub_dataset(source: str) -> str | None:
    """``source`` when it is a `datasets` name (not a file, directory or package path)."""
    if source.startswith(("pkg://", ".", "~")) or not _HUB_ID.fullmatch(source):
        return None
    if source.lower().endswith(_FILE_SUFFIXES) or os.path.exists(source):
        return None
    return source


def _data_name(source: str | None) -> str | None:
    """How a data source is named in a shared export."""
    if not source:
        return None
    if source.startswith("pkg://") or _hub_dataset(source):
        return source
    return _local_name(source)


def _shareable_task(task: dict) -> dict:
    return {k: _data_name(v) if k in ("train", "val") else v for k, v in task.items()}


def _hub_model(path: str | None) -> str | None:
    """The Hub id of a model directory that is a Hugging Face cache snapshot."""
    match = _HUB_CACHE.search(os.path.abspath(path) + os.sep) if path else None
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _origin(src: ModelSource) -> dict:
    """Where the model came from: its source, base model and last evaluation (at its step)."""
    from lmforge.pretrain.checkpoint.store import (
        read_checkpoint_config,
        read_json_file,
        read_trainer_state,
    )

    if src.kind == "hf":  # an export (read back) or a foreign Hugging Face directory
        file = os.path.join(src.path, "lmforge.json")
        meta = read_json_file(file) if os.path.isfile(file) else {}
        hub = _hub_model(src.path)
        return {
            "source": meta.get("source") or hub or _local_name(src.path),
            "base": meta.get("base_model"),
            "datasets": meta.get("datasets") or [],
            "evaluation": meta.get("evaluation"),
        }
    cfg = read_checkpoint_config(src.path)
    if src.kind == "consolidated":
        info = read_json_file(os.path.join(src.path, "consolidated.json"))
        checkpoint, step = str(info.get("checkpoint") or src.path), info.get("step")
    else:
        checkpoint, step = src.path, read_trainer_state(src.path).get("step")
    task = cfg.get("task")  # (finetuning configs only have one)
    sources = [(task or {}).get(k) for k in ("train", "val")]
    base = None
    if cfg.get("init_from"):
        base = {
            "name": _local_name(cfg["init_from"]),
            "hub_id": _hub_model(cfg["init_from"]),
            "from_scratch": bool(cfg.get("from_scratch")),
        }
    return {
        "source": _local_name(checkpoint),
        "base": base,
        "datasets": list(dict.fromkeys(d for d in map(_hub_dataset, filter(None, sources)) if d)),
        "evaluation": _evaluation(checkpoint, step, cfg, task),
    }


def _evaluation(checkpoint: str, step: int | None, cfg: dict, task: dict | None) -> dict | None:
    """The run's eval row at the checkpoint's own step (other steps' rows describe other
    weights), with the data it was computed on."""
    path = os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "metrics.jsonl")
    if step is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    row = next((r for r in reversed(rows) if r.get("kind") == "eval" and r["step"] == step), None)
    if row is None:
        return None
    dataset_id = None
    if task:
        data = _data_name(task.get("val"))
        dataset_id = _hub_dataset(task.get("val") or "")
        if data is None:
            train = _data_name(task.get("train"))
            data = f"{train} (held-out {task.get('val_fraction', 0.1):g})"
        split = task.get("val_split", "validation") if task.get("val") else "held-out"
    else:
        data, split = _data_name((cfg.get("data") or {}).get("path")) or "pretraining data", "val"
    kind = (task or {}).get("type")
    keys = _METRICS.get(kind, _METRICS[None])
    return {
        "step": step,
        "data": data,
        "dataset_id": dataset_id,
        "split": split,
        "metrics": {k: row[k] for k in keys if isinstance(row.get(k), (int, float))},
    }


# --------------------------------------------------------------------------------------------
# generation config and model card
# --------------------------------------------------------------------------------------------


def _stop_names(tok: Tokenizer, task: dict) -> str:
    stops = PromptFormat(tok, task.get("template")).stop_ids
    return " or ".join(f"`{tok.id_to_piece(i)}`" for i in stops)


def _generation_config(tok: Tokenizer, task: dict):
    from transformers import GenerationConfig

    kind = task.get("type")
    stops = PromptFormat(tok, task.get("template")).stop_ids if kind == "sft" else ()
    return GenerationConfig(
        bos_token_id=tok.bos_id,
        # an instruction model's answer ends where lmforge's does (a chat's end of turn)
        eos_token_id=list(stops) if len(stops) > 1 else tok.eos_id,
        pad_token_id=tok.eos_id,
        do_sample=kind != "sft",  # an instruction model answers greedily by default
        temperature=0.8 if kind != "sft" else None,
        top_k=50 if kind != "sft" else None,
        max_new_tokens=128,
    )


def front_matter(src: ModelSource, meta: dict, *, name: str) -> dict:
    """The card's YAML metadata, in the Hub's schema."""
    task = meta["task"] or {}
    kind = task.get("type")
    tag = PIPELINE_TAGS[kind]
    data: dict = {
        "license": LICENSE_PLACEHOLDER,
        "library_name": "transformers",
        "pipeline_tag": tag,
        "tags": ["lmforge", "llama", tag]
        + ([kind] if kind in ("sft", "classification") else [])
        + (["lora"] if src.lora else []),
    }
    base = meta.get("base_model") or {}
    if base.get("hub_id") and not base.get("from_scratch"):
        data["base_model"] = base["hub_id"]
    if meta.get("datasets"):
        data["datasets"] = list(meta["datasets"])
    ev = meta.get("evaluation")
    if ev and ev["metrics"]:
        names = _METRICS.get(kind, _METRICS[None])
        dataset = {"name": ev["data"], "type": ev.get("dataset_id") or ev["data"]}
        dataset["split"] = ev["split"]
        data["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": tag, "name": _TASK_NAMES[tag]},
                        "dataset": dataset,
                        "metrics": [
                            {
                                "type": names[key][0],
                                "value": float(value),
                                "name": f"validation {names[key][1]}",
                            }
                            for key, value in ev["metrics"].items()
                        ],
                    }
                ],
            }
        ]
    return data


def model_card(src: ModelSource, meta: dict, *, arch: str, out: str, prep: Preprocessing) -> str:
    name = os.path.basename(os.path.abspath(out))
    matter = yaml.safe_dump(
        front_matter(src, meta, name=name), sort_keys=False, allow_unicode=True, width=1000
    )
    matter = matter.replace(
        f"license: {LICENSE_PLACEHOLDER}\n",
        f"license: {LICENSE_PLACEHOLDER}  # set the license of these weights (see License)\n",
        1,
    )
    task = meta["task"] or {}
    kind = task.get("type")
    m = src.model
    lines = [
        "---",
        matter.rstrip("\n"),
        "---",
        "",
        f"# {name}",
        "",
        f"A {src.model.family.capitalize()}-family decoder trained with lmforge, exported as "
        f"`{arch}`.",
        "",
        "## Model",
        "",
        f"- {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads ({m.kv_heads} KV), "
        f"SwiGLU hidden {m.hidden_dim}, RoPE theta {m.rope_theta:g}, context {m.max_seq_len}",
        f"- {meta['parameters']:,} parameters, {meta['dtype']}; SentencePiece vocabulary of "
        f"{m.vocab_size} (tokenizer.json reproduces its ids exactly; no BOS/EOS added to text)",
        "",
        "## Preprocessing",
        "",
        "What lmforge feeds the model; `tokenizer_config.json` holds the same settings, so "
        "transformers' tokenizer with `truncation=True` gives the model the same input.",
        "",
        *(f"- {line}" for line in prep.lines),
        "",
        "## Data and task",
        "",
    ]
    base = meta.get("base_model")
    if task:
        lines.append(f"- task: {kind}; training data `{task.get('train')}`")
        if task.get("val"):
            lines.append(f"- validation data `{task['val']}`")
        if task.get("labels"):
            lines.append(f"- labels: {', '.join(map(str, task['labels']))}")
    else:
        lines.append("- a base language model (pretraining only)")
    if base:
        what = "the shape (new weights) of" if base.get("from_scratch") else "finetuned from"
        lines.append(f"- {what} `{base.get('hub_id') or base['name']}`")
    lines += ["", "## Compute", ""]
    for stage in src.compute.get("stages", []):
        lines.append(
            f"- {stage['stage']} `{stage.get('name')}`: {stage['tokens']:,} tokens, "
            f"{stage['flops']:.3e} FLOPs"
        )
    if src.compute.get("flops"):
        lines.append(
            f"- total: {src.compute['tokens']:,} tokens, {src.compute['flops']:.3e} FLOPs "
            "(PaLM's convention: 6N + attention per token, counting in finetuning only what "
            "trains)"
        )
    ev = meta.get("evaluation")
    if ev and ev["metrics"]:
        lines += [
            "",
            f"## Validation metrics (step {ev['step']}, on `{ev['data']}`)",
            "",
            *(f"- {key}: {value:.4f}" for key, value in ev["metrics"].items()),
        ]
    lines += ["", "## Use", "", "```python", *_usage(kind, arch, name), "```", ""]
    lines += [
        "## License",
        "",
        f"Not set (`license: {LICENSE_PLACEHOLDER}`): lmforge does not know the terms of the "
        "data and base model these weights come from. Set `license:` in the front matter "
        "before sharing them.",
        "",
        f"Exported by `lmforge export` from `{meta['source']}`.",
        "",
    ]
    return "\n".join(lines)


def _usage(kind: str | None, arch: str, name: str) -> list[str]:
    auto = "AutoModel" + arch[arch.index("For") :]  # e.g. Qwen3ForCausalLM -> AutoModelForCausalLM
    head = [
        f"from transformers import AutoTokenizer, {auto}",
        "",
        f'path = "{name}"  # this directory, or the Hub repository it is uploaded to',
        "tok = AutoTokenizer.from_pretrained(path)",
        f"model = {auto}.from_pretrained(path)",
    ]
    if kind == "classification":
        return [
            *head,
            'batch = tok(["A gorgeous, witty movie."], truncation=True, padding=True, '
            'return_tensors="pt")',
            "labels = [model.config.id2label[i] for i in model(**batch).logits.argmax(-1).tolist()]",
            "# or: pipeline('text-classification', model=path, truncation=True)",
        ]
    if kind == "token_classification":
        return [
            *head,
            'words = ["Then", "Hamlet", "sailed", "to", "Denmark", "."]',
            'batch = tok([words], is_split_into_words=True, truncation=True, return_tensors="pt")',
            "ids = model(**batch).logits.argmax(-1)[0].tolist()",
            "first = {}  # word -> its first sub-word, where its label is read",
            "for pos, word in enumerate(batch.word_ids(0)):",
            "    if word is not None:",
            "        first.setdefault(word, pos)",
            "tags = [model.config.id2label[ids[pos]] for pos in first.values()]",
        ]
    if kind == "sft":
        return [
            *head,
            'messages = [{"role": "user", "content": "Summarise: ..."}]',
            "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, "
            'truncation=True, return_dict=True, return_tensors="pt")',
            "out = model.generate(**inputs, max_new_tokens=128)",
            'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        ]
    return [
        *head,
        'inputs = tok("To be, or not", truncation=True, return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=50)",
        "print(tok.decode(out[0], skip_special_tokens=True))",
    ]
