"""One line of meaning per TrainConfig key, and the ``train.py --help`` text built from them.

The table sits beside ``training/config.py`` rather than in field metadata so the dataclass keeps
its plain ``name: type = default`` shape; ``tests/test_cli_help.py`` fails when a field has no line.
"""

from __future__ import annotations

from dataclasses import MISSING, fields

from training.config import TrainConfig, to_toml

FIELD_HELP: dict[str, str] = {
    "stage": "domain (emrQA, answer loss) or task (ArchEHR-QA cases); picks configs/STAGE.toml",
    "preset": "model preset from model/presets.py: qwen3-4b, qwen3-4b-random or tiny",
    "out": "run folder (config, log.jsonl, checkpoints/, export/)",
    "data": "domain stage: hub id or local .jsonl/.json/.parquet in SQuAD v2 layout",
    "n_examples": "domain stage: a random sample of N records, drawn with --seed (0 = all)",
    "unanswerable": "domain stage: abstain (fixed 'not in the note' target) or skip unanswerable questions",
    "xml": "task stage: the official cases XML",
    "key": "task stage: the official key JSON",
    "init": "run or export folder whose adapter (and head) the stage starts from",
    "base": "local folder or hub id overriding the preset's base weights",
    "load_in_4bit": "auto (the preset's default), true or false: NF4-quantise the base model",
    "quant_storage": "dtype holding the packed NF4 weights: uint8, or bfloat16 to shard them with FSDP",
    "joint": "train the alignment head jointly (alignment + relevance losses)",
    "seed": "seed of data order, LoRA/head initialisation and dropout",
    "epochs": "passes over the training data (ignored when max_steps > 0)",
    "max_steps": "cap on optimizer steps (0 = run the epochs)",
    "batch_size": "rows per micro-batch (when batch_tokens = 0)",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate of the LoRA weights",
    "head_lr": "peak learning rate of the alignment head",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of the steps spent in linear warm-up",
    "schedule": "learning-rate schedule after warm-up: cosine, linear or constant",
    "max_grad_norm": "gradient-norm clip (0 = off)",
    "max_length": "longest tokenised training example; longer ones are skipped (said on screen)",
    "group_by_length": "batch rows of similar length together (less padding)",
    "batch_tokens": "> 0: fill batches to this many padded tokens instead of batch_size rows",
    "bf16": "bf16 autocast and bf16 embeddings/lm_head on CUDA (CPU stays fp32)",
    "compile": "torch.compile each decoder layer on CUDA (off on CPU)",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory, more time)",
    "lora_r": "LoRA rank on every attention and MLP projection",
    "lora_alpha": "LoRA scaling numerator (scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "head_proj_dim": "alignment head: projection size of each pooled sentence",
    "head_mlp_dim": "alignment head: hidden size of the pair-scoring MLP",
    "head_pooling": "alignment head: mean or attention pooling over a sentence's tokens",
    "head_layer": "alignment head: which hidden layer it reads (-1 = last)",
    "head_relevance": "alignment head: also predict a relevance logit per note sentence",
    "head_dropout": "alignment head: dropout on pooled sentence vectors",
    "align_weight": "weight of the alignment BCE in the joint loss",
    "pos_weight": "BCE weight of positive (supporting) answer x note pairs",
    "relevance_weight": "weight of the relevance BCE in the joint loss",
    "calibration_max_examples": "training cases used to calibrate the exported alignment threshold",
    "log_every": "log loss parts, lr and tokens/s every N optimizer steps",
    "save_every": "checkpoint every N optimizer steps (0 = only the final export)",
    "keep_checkpoints": "how many intermediate checkpoints to keep",
    "progress": "show progress bars",
    "plot": "write loss_curve.png at the end",
    "report_to": "also send log.jsonl's series to none, tensorboard (RUN/tensorboard), wandb, mlflow or trackio",
}


def _type_name(field) -> str:
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))


def stage_defaults() -> dict[str, TrainConfig]:
    """What each stage runs with when the command line sets nothing: its TOML over the dataclass."""
    from training.config import STAGES, build_config

    return {stage: build_config({"stage": stage}) for stage in STAGES}


def _shown(value) -> str:
    return repr(value) if not isinstance(value, str) or value else "''"


def config_keys_help() -> str:
    """Every TrainConfig key with its type, its default in each stage (the stage's TOML over the
    dataclass: what a run without that option uses) and its meaning (with its range for numbers),
    one line each."""
    from training.validation import RULES

    stages = stage_defaults()
    rows = [("key", "type", *(f"{stage}" for stage in stages), "meaning")]
    for field in fields(TrainConfig):
        values = ["" if field.default is MISSING else _shown(getattr(cfg, field.name)) for cfg in stages.values()]
        meaning = FIELD_HELP.get(field.name, "")
        rule = RULES.get(field.name)
        if rule is not None and _type_name(field) in ("int", "float"):  # the range, as the refusal words it
            meaning += f"; {rule.expect}"
        rows.append((f"--{field.name}", _type_name(field), *values, meaning))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        ("  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip() for row in rows
    )


def config_as_toml(cfg: TrainConfig) -> str:
    """The resolved config as ``--print-config`` shows it (the same text as ``RUN/config.toml``)."""
    return to_toml(cfg.to_dict())
