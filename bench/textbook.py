"""The reference column: a textbook QLoRA step (HF Trainer + PEFT, rows padded to max length).

Kept deliberately plain (default Trainer settings, HF forward with labels, full
logits) so the speed-up of our step is measured against what most users run.
"""

from __future__ import annotations

import time

import torch

from data.prompts import IGNORE_INDEX, EncodedExample
from plumbing.hf_loading import local_code_only


def load_textbook_model(model_dir: str, device: torch.device, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quant,
        dtype=torch.bfloat16,
        device_map={"": device},
        use_safetensors=True,
        **local_code_only(),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(model, lora)


def padded_rows(examples: list[EncodedExample], seq_len: int, pad_id: int) -> list[dict]:
    rows = []
    for ex in examples:
        n = len(ex.input_ids)
        pad = seq_len - n
        rows.append(
            {
                "input_ids": ex.input_ids + [pad_id] * pad,
                "attention_mask": [1] * n + [0] * pad,
                "labels": ex.labels + [IGNORE_INDEX] * pad,
            }
        )
    return rows


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {k: torch.tensor(v) for k, v in self.rows[i].items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def reference_loss(model, examples: list[EncodedExample], seq_len: int, device: torch.device) -> float:
    """HF forward-with-labels loss on padded rows: the numerics our step must reproduce."""
    rows = padded_rows(examples, seq_len, pad_id=0)
    batch = {k: torch.tensor([r[k] for r in rows], device=device) for k in rows[0]}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return float(model(**batch).loss)


def run_textbook(
    model,
    examples: list[EncodedExample],
    seq_len: int,
    batch_rows: int,
    steps: int,
    warmup: int,
    pad_id: int,
    out_dir: str,
    device: torch.device,
) -> dict:
    """Train with transformers.Trainer; time the steps after `warmup`."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            times.append(time.perf_counter() - self.t0)

    n_rows = batch_rows * (steps + warmup)
    rows = padded_rows(examples[:n_rows], seq_len, pad_id)
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batch_rows,
        max_steps=steps + warmup,
        gradient_checkpointing=True,
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        learning_rate=2e-4,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=0,
        remove_unused_columns=False,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(rows), callbacks=[StepTimer()])
    trainer.train()
    timed = times[warmup:]
    used = examples[batch_rows * warmup : n_rows]
    return {
        "seconds": sum(timed),
        "steps": len(timed),
        "real_tokens": sum(len(e.input_ids) for e in used),
        "lengths": [len(e.input_ids) for e in used],
        "supervised_tokens": sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in used),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2) if device.type == "cuda" else None,
    }
