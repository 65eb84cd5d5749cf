"""`lmforge export RUN|CHECKPOINT|DIR --out DIR`: a Hugging Face `transformers` model directory.

    config.json               LlamaConfig; architectures LlamaForCausalLM, or
                              LlamaForSequenceClassification / LlamaForTokenClassification with
                              id2label / label2id and pad_token_id (the classifier reads the last
                              token that is not padding)
    model.safetensors         weights under transformers' names, LoRA adapters merged
    generation_config.json    BOS/EOS/pad ids and sampling defaults
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                              a fast tokenizer whose ids equal lmforge's SentencePiece ids
                              (finetune/hf_tokenizer.py); tokenizer.model, the SentencePiece
                              model itself
    lmforge.json              source checkpoint, task, compute (tokens and FLOPs of every stage)
    README.md                 model card: data, compute, metrics, how to load

Any parallel layout exports the same (weights are rebuilt from the shards). Written to a temp
directory and renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from finetune.hf import ARCHITECTURES, llama_config, to_hf_name
from finetune.model import Source, build_model, load_source
from pretrain.consolidate import DTYPES
from pretrain.durable import atomic_directory, check_new_dir, check_writable, write_durable
from pretrain.errors import ConfigurationError
from pretrain.tokenizer import Tokenizer


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
            f"{path} does not name its SentencePiece tokenizer (or the file moved); an export "
            "needs it: put tokenizer.model next to the weights"
        )
    tok = Tokenizer(src.tokenizer)
    if tok.vocab_size != src.model.vocab_size:
        raise ConfigurationError(
            f"{src.tokenizer} has {tok.vocab_size} pieces but the model's vocabulary is "
            f"{src.model.vocab_size}: the checkpoint and its tokenizer do not belong together"
        )
    model = build_model(src)
    task = src.task or {}
    kind = task.get("type")
    head = "lm_head" if src.n_out is None else "score"
    weights = {
        to_hf_name(k, head=head): v.detach().to(DTYPES[dtype]).contiguous()
        for k, v in model.state_dict().items()
        if not (model.tied and k == "output.weight")  # transformers re-ties lm_head itself
    }
    extra: dict = {
        "architectures": [ARCHITECTURES[kind]],
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.eos_id,  # the SentencePiece model has no pad piece
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
    config = llama_config(src.model, **extra)

    with atomic_directory(out, prefix=".export-") as tmp:
        config.save_pretrained(tmp)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _generation_config(tok, kind).save_pretrained(tmp)
        from finetune.hf_tokenizer import write_hf_tokenizer

        write_hf_tokenizer(str(tok.path), tmp, model_max_length=src.model.max_seq_len)
        if kind == "classification":  # the head reads the last token: cut long texts' starts
            _update_json(os.path.join(tmp, "tokenizer_config.json"), truncation_side="left")
        shutil.copyfile(tok.path, os.path.join(tmp, "tokenizer.model"))
        meta = {
            "source": os.path.abspath(src.path),
            "task": task or None,
            "compute": src.compute,
            "dtype": dtype,
            "parameters": sum(v.numel() for v in model.state_dict().values()),
            "tokenizer_sha256": tok.sha256,
        }
        write_durable(os.path.join(tmp, "lmforge.json"), json.dumps(meta, indent=1).encode())
        card = model_card(src, meta, arch=ARCHITECTURES[kind], out=out)
        write_durable(os.path.join(tmp, "README.md"), card.encode())
    print(
        f"exported {src.path} ({ARCHITECTURES[kind]}, {meta['parameters']:,} parameters, "
        f"{dtype}) -> {out}"
    )
    return out


def _update_json(path: str, **values) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(values)
    write_durable(path, json.dumps(data, indent=2).encode())


def _generation_config(tok: Tokenizer, kind: str | None):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.eos_id,
        do_sample=kind != "sft",  # an instruction model answers greedily by default
        temperature=0.8 if kind != "sft" else None,
        top_k=50 if kind != "sft" else None,
        max_new_tokens=128,
    )


def _run_metrics(src: Source) -> dict | None:
    """The last eval row of the run the checkpoint belongs to (when it is a run's)."""
    run = os.path.dirname(os.path.dirname(src.path))
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if r["kind"] == "eval"]
    return evals[-1] if evals else None


def model_card(src: Source, meta: dict, *, arch: str, out: str) -> str:
    task = src.task or {}
    m = src.model
    lines = [
        f"# {os.path.basename(os.path.abspath(out))}",
        "",
        f"A Llama-style decoder trained with lmforge, exported as `{arch}`.",
        "",
        "## Model",
        "",
        f"- {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads ({m.kv_heads} KV), "
        f"SwiGLU hidden {m.hidden_dim}, RoPE theta {m.rope_theta:g}, context {m.max_seq_len}",
        f"- {meta['parameters']:,} parameters, {meta['dtype']}; SentencePiece vocabulary of "
        f"{m.vocab_size} (tokenizer.json reproduces its ids exactly; no BOS/EOS added to text)",
        "",
        "## Data and task",
        "",
    ]
    if task:
        lines.append(f"- task: {task.get('type')}; training data `{task.get('train')}`")
        if task.get("labels"):
            lines.append(f"- labels: {', '.join(map(str, task['labels']))}")
        if task.get("type") == "sft":
            lines.append(f"- prompt template: `{task.get('template')!r}`")
    else:
        lines.append("- a base language model (pretraining only)")
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
    ev = _run_metrics(src)
    if ev:
        lines += ["", "## Validation metrics (last evaluation of the run)", ""]
        for key in ("val_loss", "accuracy", "macro_f1", "f1", "precision", "recall"):
            if key in ev:
                lines.append(f"- {key}: {ev[key]:.4f}")
    auto = {
        "LlamaForCausalLM": "AutoModelForCausalLM",
        "LlamaForSequenceClassification": "AutoModelForSequenceClassification",
        "LlamaForTokenClassification": "AutoModelForTokenClassification",
    }[arch]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto}",
        f'tok = AutoTokenizer.from_pretrained("{out}")',
        f'model = {auto}.from_pretrained("{out}")',
        "```",
        "",
        f"Source checkpoint: `{meta['source']}`.",
        "",
    ]
    return "\n".join(lines)
