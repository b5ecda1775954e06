"""Speed and memory of training and inference on the Qwen3-4B shape (random weights).

    python -m bench.run --out bench/results            # one CUDA GPU
    python -m bench.run --smoke                         # tiny preset on CPU: checks the script only
    python -m bench.run --skip textbook,ours --skip-infer 0 --fast-caps 0,24,16   # inference only

Builds the ``qwen3-4b-random`` preset once (safetensors on local disk), then loads it
through the same NF4 path users take. Prints one table and writes JSON under ``--out``.
Columns: (a) our task-stage step with the joint head, in several configurations that
each add one optimisation; (b) a textbook QLoRA step (HF Trainer + PEFT, rows padded
to the maximum length). Same synthetic mixed-length rows for both. Inference: the plain
path (``generate``, fixed batches) beside the fast path (inference/fast.py: static KV cache,
CUDA-graphed decode, memory-planned batches) on the whole card and under emulated 24 / 16 GB
cards (``torch.cuda.set_per_process_memory_fraction``), with load, capture and decode timed apart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.flops import mfu, training_flops
from bench.synthetic import inference_cases, training_examples
from plumbing.atomic import check_out_folder
from plumbing.errors import CliParser, exit_on_input_error
from data.prompts import IGNORE_INDEX
from plumbing.ranges import integer


@dataclass
class StepVariant:
    name: str
    batching: str  # "rows" (fixed rows, padded to the batch's longest) or "tokens" (token budget)
    rows: int = 4
    max_tokens: int = 16384
    autocast: bool = False
    keep_bf16: bool = False  # skip the fp32 upcast of embeddings / lm_head / norms
    checkpointing: bool = True
    lm_chunk: int = 10**9  # answer-token CE chunk (10**9 = one chunk, no recompute)
    lora_dropout: float = 0.05
    compile_layers: bool = False
    grad_accum: int = 1
    quantise: bool = True  # NF4 base; False = bf16 base (``--load_in_4bit false``)


# Today's default step (variant 7): each variant after it changes one thing, the rest "as 7".
COMPILED_STEP = StepVariant(
    "+ torch.compile per decoder layer (dropout 0.05)",
    "tokens",
    autocast=True,
    keep_bf16=True,
    lm_chunk=1024,
    compile_layers=True,
)

VARIANTS = [
    StepVariant("ours: rows=4, fp32 upcast, no autocast", "rows"),
    StepVariant("+ token-budget batches (16k)", "tokens"),
    StepVariant("+ bf16 autocast", "tokens", autocast=True),
    StepVariant("+ bf16 embeddings/lm_head", "tokens", autocast=True, keep_bf16=True),
    StepVariant("+ chunked answer CE (1024)", "tokens", autocast=True, keep_bf16=True, lm_chunk=1024),
    StepVariant("+ 32k-token batches", "tokens", max_tokens=32768, autocast=True, keep_bf16=True, lm_chunk=1024),
    StepVariant("+ LoRA dropout 0 (16k)", "tokens", autocast=True, keep_bf16=True, lm_chunk=1024, lora_dropout=0.0),
    COMPILED_STEP,
    replace(COMPILED_STEP, name="bf16 base (--load_in_4bit false), otherwise as 7", quantise=False),
    # What the checkpoint recompute costs (issue 21): the same step at 8k-token batches, with and
    # without gradient checkpointing (without it every layer's activations are kept).
    replace(COMPILED_STEP, name="8k-token batches, otherwise as 7", max_tokens=8192),
    replace(
        COMPILED_STEP,
        name="8k-token batches, no gradient checkpointing, otherwise as 7",
        max_tokens=8192,
        checkpointing=False,
    ),
]

# The task stage (--joint) on synthetic ArchEHR-QA cases, through the same step: today's
# configs/task.toml (one case per forward, 4 micro-batches a step) and token-budget batches.
TASK_VARIANTS = [
    replace(
        COMPILED_STEP,
        name="task: one case per forward, grad_accum 4 (task.toml before issue 21)",
        batching="rows",
        rows=1,
        grad_accum=4,
    ),
    replace(COMPILED_STEP, name="task: 4k-token batches", max_tokens=4096),
    replace(COMPILED_STEP, name="task: 8k-token batches (task.toml now)", max_tokens=8192),
    replace(COMPILED_STEP, name="task: 16k-token batches", max_tokens=16384),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
    }


def versions() -> dict:
    from model.export_folder import package_versions

    out = {**package_versions(("transformers", "peft", "bitsandbytes", "accelerate")), "torch": torch.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
    return out


def release() -> None:
    """Return freed memory to the card (callers ``del`` their references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- our step --------------------------------------------------------------------------


def load_ours(
    model_dir: str,
    preset: str,
    device: torch.device,
    quantise: bool,
    keep_bf16: bool,
    checkpointing: bool,
    lora_dropout: float = 0.05,
    compile_layers: bool = False,
):
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.backbone import LoraSettings, load_backbone
    from training.joint import JointModel, LossSettings

    backbone = load_backbone(
        preset,
        load_in_4bit=quantise,
        device=device,
        lora=LoraSettings(dropout=lora_dropout),
        gradient_checkpointing=checkpointing,
        base_path=model_dir,
        keep_bf16=keep_bf16,
    )
    if compile_layers:
        from model.backbone import compile_decoder_layers

        compile_decoder_layers(backbone)
    hidden = backbone.get_base_model().config.hidden_size
    head = NotePairHead(HeadConfig(hidden_size=hidden)).to(device)
    model = JointModel(backbone, head, LossSettings())
    model.train()
    return model


@torch.no_grad()
def our_reference_loss(model, examples, device) -> float:
    """LM loss of our step's forward on the rows the textbook reference used (fresh LoRA)."""
    from accelerate.utils import send_to_device

    from training.batching import collate
    from training.data import TrainItem

    batch = send_to_device(collate([TrainItem(e) for e in examples], pad_id=0), device)  # as the loop sends it
    # Eager: a no-grad call of the compiled layers would compile a second set of graphs, outside any row.
    with torch.autocast(device.type, dtype=torch.bfloat16), torch.compiler.set_stance("force_eager"):
        return float(model(batch)["lm"])


def loop_config(variant: StepVariant, stage: str = "domain"):
    """The TrainConfig a user would run this variant with (constant lr: the schedule is not timed)."""
    from training.config import TrainConfig

    tokens = variant.batching == "tokens"
    return TrainConfig(
        stage=stage,
        joint=True,
        bf16=variant.autocast,
        batch_tokens=variant.max_tokens if tokens else 0,
        batch_size=variant.rows,
        group_by_length=False,
        grad_accum=variant.grad_accum,
        lr=1e-4,
        warmup_ratio=0.0,
        schedule="constant",
        log_every=10**9,
    )


def make_trainer(model, items, cfg):
    """The :class:`training.loop.Trainer` train.py builds (training.run's own pieces), minus the run folder."""
    from training.hooks import train_hooks
    from training.loop import Trainer
    from training.run import make_accelerator, make_optimizer, make_sampler, make_scheduler

    accelerator, _ = make_accelerator(cfg)
    optimizer = make_optimizer(model, cfg)
    sampler = make_sampler(items, cfg)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    total = 10**6
    return Trainer(
        cfg,
        Path("/tmp/bench-loop"),
        accelerator,
        wrapped,
        model,
        optimizer,
        make_scheduler(optimizer, cfg, total),
        sampler,
        list(items),
        0,
        total,
        train_hooks(),
    )


def step_groups(t, n: int) -> list:
    """The first ``n`` optimizer steps' micro-batches, in train.py's order (epochs repeat as needed)."""
    from training import loop
    from training.batching import rank_micro_batches

    groups, epoch = [], 0
    while len(groups) < n:
        groups += list(loop.optimizer_steps(rank_micro_batches(t.sampler.batches(epoch), 0, 1, 0, t.cfg.grad_accum)))
        epoch += 1
    return groups[:n]


EXTRA_WARMUP = 6
SYNCED_STEPS = False  # --synced-steps: time each step alone (the bench's timing before 2026-12-04)


def run_ours(
    model, items, variant: StepVariant, steps: int, warmup: int, device, stage: str = "domain", profile: int = 0
) -> dict:
    """Time ``training.loop.train_step``, the step train.py's loop runs, on ``items``: ``warmup``
    steps first, more while a step still compiles (compilation lands there: ``warmup_s``), then
    ``steps`` timed ones; ``recompiles`` counts graphs compiled during the timed steps
    (``torch._dynamo`` counters). ``profile`` > 0: that many more steps under ``torch.profiler``
    (top ops and kernels by GPU time, kernel time per step) and dynamo's compile times."""
    from training import joint, loop

    joint.LM_CHUNK_TOKENS = variant.lm_chunk
    t = make_trainer(model, items, loop_config(variant, stage))
    state = loop.LoopState()
    params = [p for group in t.optimizer.param_groups for p in group["params"]]
    t.model.train()
    reset_peak(device)
    graphs_start = loop.compiled_graphs()
    times, lengths, supervised, warm_s, graphs_timed = [], [], 0, 0.0, None
    # Warm up for at least ``warmup`` steps and on while a step still compiles (at most
    # EXTRA_WARMUP more): on the H200 run of 2026-12-03 the second batch shape recompiled
    # after 3 warm-up steps and landed in the timed steps.
    warm_steps, compiled_last, timed_steps, timed_from, first_lm = 0, True, 0, 0.0, float("nan")
    groups = step_groups(t, steps + warmup + EXTRA_WARMUP + profile)
    for g, group in enumerate(groups):
        timed = warm_steps >= warmup and (not compiled_last or warm_steps >= warmup + EXTRA_WARMUP)
        if timed and timed_steps == steps:
            break
        if timed and graphs_timed is None:
            graphs_timed = loop.compiled_graphs()
            sync(device)
            timed_from = time.perf_counter()
        if timed:
            # Back to back, as train.py's loop runs them: one step's host work overlaps the GPU's
            # work of the step before. SYNCED_STEPS waits for the GPU around each step instead.
            t0 = time.perf_counter()
            loop.train_step(t, state, group, params)  # what train.py runs for each optimizer step
            if SYNCED_STEPS:
                sync(device)
                times.append(time.perf_counter() - t0)
            timed_steps += 1
            for mb in group:
                lengths += [len(items[i]) for i in mb.indices]
                supervised += sum(sum(1 for x in items[i].encoded.labels[1:] if x != IGNORE_INDEX) for i in mb.indices)
            continue
        before = loop.compiled_graphs()
        sync(device)
        t0 = time.perf_counter()
        loop.train_step(t, state, group, params)
        sync(device)
        warm_s += time.perf_counter() - t0
        if warm_steps == 0:  # the first step's LM loss, before any update: a check across code versions
            loop.settle(t, state)
            first_lm = state.window.get("lm", float("nan")) / max(state.window_micro, 1)
        warm_steps += 1
        compiled_last = loop.compiled_graphs() > before
    sync(device)
    if not SYNCED_STEPS:
        times = [time.perf_counter() - timed_from] if timed_steps else []
    loop.settle(t, state)  # the last step's losses, read back
    row = summarise(
        times,
        lengths,
        supervised,
        device,
        batches=timed_steps,
        step_timing="synced" if SYNCED_STEPS else "back to back",
        warmup_steps=warm_steps,
        warmup_s=round(warm_s, 1),
        recompiles=loop.compiled_graphs() - (graphs_timed or 0),
        compiled_graphs=loop.compiled_graphs() - graphs_start,
        tokens_per_step=round(sum(lengths) / max(timed_steps, 1)),
        first_lm_loss=round(first_lm, 4),
        mean_lm_loss=round(state.window.get("lm", float("nan")) / max(state.window_micro, 1), 4),  # all steps run
    )
    if profile:
        row.update(profiled_steps(t, state, groups[g : g + profile], params, device))
    t.accelerator.free_memory()
    del t
    release()
    return row


def profiled_steps(t, state, groups: list, params, device) -> dict:
    """``groups`` more train steps under ``torch.profiler``: where the step's GPU time goes
    (bench.decode_profile's table: kernel time per step, to set beside a timed step's wall
    time; the profiled wall time is slower by the profiler's own cost), dynamo's compile-time
    breakdown of the process so far and the compile caches' hits."""
    from bench.decode_profile import profile_table
    from training import loop

    pending = list(groups)
    sync(device)
    t0 = time.perf_counter()
    table = profile_table(lambda: loop.train_step(t, state, pending.pop(0), params), device, reps=len(groups))
    wall_ms = (time.perf_counter() - t0) * 1e3 / len(groups)
    try:
        from torch._dynamo.utils import compile_times

        compile_report = str(compile_times(repr="str", aggregate=True))
    except Exception as err:  # noqa: BLE001 - a torch without the breakdown: said in the row
        compile_report = f"unavailable ({type(err).__name__})"
    table["profiled_wall_ms_per_step"] = round(wall_ms, 1)  # under the profiler: slower than timed
    return {"profile": table, "compile_times": compile_report, "compile_caches": compile_cache_counters()}


def compile_cache_counters() -> dict:
    """Inductor's and AOTAutograd's on-disk cache hits and misses in this process so far:
    whether a second run reused the first one's compiled graphs."""
    from torch._dynamo.utils import counters

    return {
        f"{group}.{name}": int(n)
        for group in ("inductor", "aot_autograd")
        for name, n in counters[group].items()
        if "cache" in name
    }


def summarise(times, lengths, supervised, device, arch=None, **extra) -> dict:
    seconds = sum(times)
    tokens = sum(lengths)
    row = {"seconds": round(seconds, 3), "real_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
    if ARCH is not None:
        row["mfu"] = round(mfu(training_flops(ARCH, lengths, supervised), seconds), 4)
    row.update(peaks(device))
    row.update(extra)
    return row


ARCH: dict | None = None


# --- textbook step --------------------------------------------------------------------


def run_textbook_column(model, examples, seq_len: int, rows: int, steps: int, warmup: int, device) -> dict:
    from bench.textbook import reference_loss, run_textbook

    first = reference_loss(model, examples[:rows], seq_len, device)
    raw = run_textbook(
        model, examples, seq_len, rows, steps, warmup, pad_id=0, out_dir="/tmp/bench-textbook", device=device
    )
    mean_len = sum(len(e.input_ids) for e in examples[: rows * (steps + warmup)]) / (rows * (steps + warmup))
    n_rows = raw["steps"] * rows
    lengths = [int(mean_len)] * n_rows  # the Trainer shuffles rows: use the mean real length
    sup_mean = sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in examples) / len(examples)
    row = summarise(
        [raw["seconds"]], lengths, int(sup_mean * n_rows), device, first_lm_loss=first, batches=raw["steps"]
    )
    row.update(peak_allocated_gb=raw["peak_allocated_gb"], peak_reserved_gb=raw["peak_reserved_gb"])
    return row


# --- inference ------------------------------------------------------------------------


def ensure_adapter(model_dir: str, preset: str, device, adapter_dir: str) -> None:
    """A fresh LoRA saved as a user's would be, once (every inference column loads it)."""
    from model.backbone import load_backbone

    if not Path(adapter_dir, "adapter_config.json").is_file():
        fresh = load_backbone(preset, load_in_4bit=True, device=device, base_path=model_dir, trainable=False)
        fresh.save_pretrained(adapter_dir)
        del fresh
        release()


def run_inference(
    model_dir: str,
    preset: str,
    device,
    merged: bool,
    n_answers: int,
    n_align: int,
    max_new_tokens: int,
    gen_batch: int,
    align_batch: int,
    adapter_dir: str,
    cache: str | None = None,
) -> dict:
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.backbone import load_adapted, load_tokenizer
    from model.loaded_export import LoadedExport

    ensure_adapter(model_dir, preset, device, adapter_dir)
    sync(device)
    t0 = time.perf_counter()
    load_times: dict = {}
    backbone = load_adapted(
        preset, adapter_dir, merge=merged, load_in_4bit=True, device=device, base_path=model_dir, timings=load_times
    )
    hidden = backbone.config.hidden_size
    head = NotePairHead(HeadConfig(hidden_size=hidden)).to(device).eval()
    ckpt = LoadedExport(manifest={}, threshold=0.5, tokenizer=load_tokenizer(preset), model=backbone, head=head)
    sync(device)
    load_s = time.perf_counter() - t0
    answer_cases = inference_cases(n_answers, seed=1)
    align_cases = inference_cases(n_align, seed=2)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    answers = ckpt.generate_answers(
        answer_cases, max_new_tokens=max_new_tokens, batch_size=gen_batch, cache_implementation=cache
    )
    sync(device)
    gen_s = time.perf_counter() - t0
    new_tokens = sum(len(ckpt.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    t0 = time.perf_counter()
    scores = ckpt.score_all(align_cases, batch_size=align_batch)
    sync(device)
    align_s = time.perf_counter() - t0
    assert len(scores) == n_align
    del ckpt, backbone, head
    release()
    return {
        "load_s": round(load_s, 1),
        "load_steps_s": load_times,
        "generate_s": round(gen_s, 2),
        "align_s": round(align_s, 2),
        "total_s": round(gen_s + align_s, 2),
        "new_tokens": new_tokens,
        "gen_batch": gen_batch,
        "align_batch": align_batch,
        "decode_tokens_per_s": round(new_tokens / gen_s, 1),
        **peaks(device),
    }


def relevance_row(fast, cases, device) -> dict:
    """Subtask 2 relevance of ``cases`` on the fast engine (packed forwards of question + note)
    and one forward per case, each timed, with their largest difference."""
    import numpy as np

    from inference.fast import FastEngine
    from inference.predictions import case_relevance

    inner = fast.inner
    sync(device)
    t0 = time.perf_counter()
    packed = FastEngine(inner, max_memory_gb=fast.max_memory_gb).predict(cases, relevance=True).relevance
    sync(device)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The plain path runs transformers' forward, which the standalone model (infer.py's load
    # where it applies) does not have: there each case gets a packed forward of its own.
    standalone = getattr(inner, "loader", "") == "standalone"
    if standalone:
        one = [FastEngine(inner).predict([c], relevance=True).relevance[c.case_id] for c in cases]
    else:
        one = [case_relevance(inner, c) for c in cases]
    sync(device)
    per_case_s = time.perf_counter() - t0
    diff = max(float(np.abs(packed[c.case_id] - o).max()) for c, o in zip(cases, one))
    return {
        "relevance_s": round(seconds, 2),
        "relevance_per_case_s": round(per_case_s, 2),
        "relevance_per_case_path": "packed, one case a forward" if standalone else "plain (transformers' forward)",
        "relevance_max_abs_diff": diff,
        "relevance_checked_cases": len(one),
    }


def one_pass_row(fast, cases, max_new_tokens: int, device) -> dict:
    """What infer.py runs for Subtasks 2, 3 and 4 on the same cases: one predict call, the head
    outputs read off the generation prefill; against generation and the head's own packed
    forwards one after the other."""
    from inference.fast import FastEngine

    times = {}
    for name, shared in (("one_pass_s", True), ("separate_passes_s", False)):
        engine = FastEngine(fast.inner, max_memory_gb=fast.max_memory_gb)
        sync(device)
        t0 = time.perf_counter()
        if shared:
            engine.predict(cases, answers=True, pairs=True, relevance=True, max_new_tokens=max_new_tokens)
        else:
            engine.predict(cases, answers=True, max_new_tokens=max_new_tokens)
            engine.predict(cases, pairs=True, relevance=True)
        sync(device)
        times[name] = round(time.perf_counter() - t0, 2)
        times[f"{name[:-2]}_head_cases"] = engine.report()["head_cases"]
    return times


def run_fast_inference(
    model_dir: str,
    preset: str,
    device,
    n_answers: int,
    n_align: int,
    max_new_tokens: int,
    adapter_dir: str,
    cap_gb: float | None = None,
) -> dict:
    """The fast path (inference/fast.py) as infer.py runs it: under ``cap_gb`` (the process's
    memory fraction, emulating a smaller card) the merge decision and the batch sizes come
    from the memory left; load (base, dequantise, adapter + merge), generation (prefill,
    CUDA-graph capture, decode) and alignment are timed separately."""
    from inference.fast import FastEngine
    from inference.memory import apply_memory_cap

    ensure_adapter(model_dir, preset, device, adapter_dir)  # before the cap: not part of the user's load
    release()
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
        apply_memory_cap(cap_gb, device)
    try:
        ckpt, load = _load_fast(preset, device, adapter_dir, cap_gb)
        answer_cases = inference_cases(n_answers, seed=1)
        align_cases = inference_cases(n_align, seed=2)
        fast = FastEngine(ckpt, max_memory_gb=cap_gb)
        reset_peak(device)
        answers, gen_s, align_s = _time_job(fast, answer_cases, align_cases, max_new_tokens, device)
        relevance = relevance_row(fast, align_cases, device)  # Subtask 2, apart from total_s
        relevance.update(one_pass_row(fast, answer_cases, max_new_tokens, device))  # Subtasks 2+3+4 of 47 cases
        new_tokens = sum(len(ckpt.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        row = _fast_row(cap_gb, load, gen_s, align_s, fast.report(), new_tokens, relevance, device)
        del fast, ckpt
    except torch.OutOfMemoryError as err:
        row = {"cap_gb": cap_gb, "error": f"out of memory: {str(err)[:200]}"}
    finally:
        release()
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    return row


def _load_fast(preset: str, device, adapter_dir: str, cap_gb: float | None):
    """The user's load under the cap (merge where the dense weights fit), timed: (export, record).
    The base is the preset's own (the random base the bench saved), as an export of it names it."""
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from inference.memory import GB, available_bytes, should_merge
    from model.backbone import RANDOM_INIT_SEED
    from model.loaded_export import LoadedExport, load_backbone_for_inference
    from model.packed import layer_ops
    from model.presets import get_preset
    from plumbing.timing import StepClock

    budget = available_bytes(device, cap_gb)
    merge, merge_reason = should_merge(get_preset(preset).arch, budget)
    reset_peak(device)
    load_times: dict = {}
    sync(device)
    t0 = time.perf_counter()
    backbone, tokenizer, loader = load_backbone_for_inference(  # infer.py's own load (standalone where it applies)
        get_preset(preset), Path(adapter_dir), merge=merge, load_in_4bit=True, device=str(device),
        base_path=None, seed=RANDOM_INIT_SEED, engine_only=True, timings=load_times,
    )  # fmt: skip
    head = NotePairHead(HeadConfig(hidden_size=backbone.config.hidden_size)).to(device).eval()
    ckpt = LoadedExport(manifest={}, threshold=0.5, tokenizer=tokenizer, model=backbone, head=head, loader=loader)
    sync(device)
    clock = StepClock(load_times)
    layer_ops(backbone)  # as load_export does: the fused kernels probed and compiled at load
    clock("kernels_s")
    return ckpt, {
        "merged": merge,
        "merge_reason": merge_reason,
        "loader": loader,
        "budget_before_load_gb": None if budget is None else round(budget / GB, 2),
        "load_s": round(time.perf_counter() - t0, 2),
        "load_steps_s": load_times,
        "load_peak_allocated_gb": peaks(device)["peak_allocated_gb"],
    }


def _time_job(fast, answer_cases, align_cases, max_new_tokens: int, device) -> tuple[list[str], float, float]:
    """The job: answers for one set of cases, then alignments of the other (answers, gen s, align s)."""
    sync(device)
    t0 = time.perf_counter()
    answers = fast.generate_answers(answer_cases, max_new_tokens=max_new_tokens)
    sync(device)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = fast.score_all(align_cases)
    sync(device)
    align_s = time.perf_counter() - t0
    assert len(scores) == len(align_cases) and len(answers) == len(answer_cases)
    return answers, gen_s, align_s


def _fast_row(cap_gb, load: dict, gen_s: float, align_s: float, report: dict, new_tokens: int, relevance, device):
    decode = report["decode"]
    return {
        "cap_gb": cap_gb,
        **load,
        "generate_s": round(gen_s, 2),
        "align_s": round(align_s, 2),
        "total_s": round(gen_s + align_s, 2),
        "prefill_s": decode["prefill_s"],
        "capture_s": decode["capture_s"],
        "decode_s": decode["decode_s"],
        "cuda_graph": decode["cuda_graph"],
        "graph_fallback": decode["graph_fallback"],
        "prefill_attention": decode.get("prefill_attention"),
        "alignment_attention": report["alignment"].get("attention"),
        # generated tokens as decoded (stop token included); the old path counts re-tokenised text,
        # the same number when (as with random weights) no answer stops early
        "new_tokens": decode["new_tokens"],
        "retokenized_new_tokens": new_tokens,
        "decode_tokens_per_s": round(decode["new_tokens"] / gen_s, 1),
        "decode_only_tokens_per_s": round(decode["new_tokens"] / max(decode["decode_s"], 1e-9), 1),
        "gen_batches": decode["batches"],
        "plans": report["plans"],
        "alignment": report["alignment"],
        **relevance,
        "head_cases": report["head_cases"],
        **peaks(device),
    }


# --- main -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results", help="folder for the JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny preset on CPU, few steps: checks the script")
    p.add_argument("--seq", nargs="+", default=[1024, 2048], **integer(16, 131_072).option())
    p.add_argument("--steps", default=6, **integer(1, 10**6).option())
    p.add_argument("--warmup", default=2, **integer(0, 10**6).option())
    p.add_argument("--variants", default="all", help="comma-separated indices of VARIANTS, or 'all'")
    p.add_argument(
        "--task-variants",
        default="",
        help="comma-separated indices of TASK_VARIANTS (the task stage, --joint), 'all', or '' for none",
    )
    p.add_argument(
        "--task-cases", default=120, **integer(1, 10**6).option("synthetic ArchEHR-QA cases for the task stage")
    )
    p.add_argument("--export", action="store_true", help="also time export_run after each stage")
    p.add_argument(
        "--profile-steps", default=0, **integer(0, 100).option("train steps profiled after the timed ones (0 = none)")
    )
    p.add_argument(
        "--synced-steps", action="store_true", help="wait for the GPU around each timed train step (the old timing)"
    )
    p.add_argument("--max-tokens", default=0, **integer(0, 2**24).option("override every variant's token budget"))
    p.add_argument("--skip", default="", help="comma list of: textbook,ours,infer")
    p.add_argument("--gen-batch", default=48, **integer(1, 4096).option())
    p.add_argument("--align-batch", default=16, **integer(1, 4096).option())
    p.add_argument("--infer-before", action="store_true", help="also time the first inference settings")
    p.add_argument("--static-cache", action="store_true", help="also time generation with a static KV cache")
    p.add_argument("--skip-infer", default="", help="comma list of inference config indices to skip")
    p.add_argument(
        "--fast-caps",
        default="0,24,16",
        help="fast inference path under these memory caps in GB (0 = the whole card); '' = none",
    )
    return p


@dataclass
class Bench:
    """One benchmark run: its settings, the random base on disk and the result saved after every row."""

    args: argparse.Namespace
    preset: str
    device: torch.device
    model_dir: str
    steps: int
    warmup: int
    seqs: list[int]
    path: Path
    result: dict

    def add(self, table: str, row: dict) -> None:
        """One result row, printed and saved at once: a run cut short still leaves its numbers."""
        self.result.setdefault(table, []).append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.result, indent=2), encoding="utf-8")


def set_up(args: argparse.Namespace) -> Bench | None:
    """Preset, device and the random base (built once); None without a GPU outside --smoke."""
    global ARCH, SYNCED_STEPS
    from model.backbone import random_base_cache_dir, save_random_base
    from model.presets import get_preset

    preset = "tiny" if args.smoke else "qwen3-4b-random"
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.smoke:
        return None
    ARCH = dict(get_preset(preset).arch)
    SYNCED_STEPS = args.synced_steps
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    seqs = [256] if args.smoke else args.seq
    t0 = time.perf_counter()
    # Initialise on the GPU when there is one: random init of 4B parameters on CPU is slow.
    with torch.device(device):
        model_dir = str(save_random_base(preset, random_base_cache_dir(preset)))
    print(f"random base ready in {time.perf_counter() - t0:.0f}s: {model_dir}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = f"{'smoke' if args.smoke else 'h'}-{stamp}.json"
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": preset,
        "machine": platform.node(),
        "versions": versions(),
        "train": [],
        "infer": [],
        "flops_note": "model FLOPs = 2 x forward (dense + causal attention + lm_head on labelled tokens); "
        "recompute not counted; peak 790 TFLOP/s bf16",
    }
    return Bench(args, preset, device, model_dir, steps, warmup, seqs, out / name, result)


def pick(table: list[StepVariant], spec: str) -> list[StepVariant]:
    return list(table) if spec == "all" else [table[int(i)] for i in spec.split(",") if i.strip()]


def chosen_variants(args: argparse.Namespace) -> tuple[list[StepVariant], list[StepVariant]]:
    variants, task_variants = pick(VARIANTS, args.variants), pick(TASK_VARIANTS, args.task_variants)
    for v in variants:
        if args.smoke:
            v.max_tokens = 1024
        elif args.max_tokens:
            v.max_tokens = args.max_tokens
    if args.smoke:  # CPU: no compile, fp32 (the loop turns bf16 off without CUDA anyway)
        for v in variants + task_variants:
            v.compile_layers = False
    return variants, task_variants


def textbook_rows(b: Bench, data: dict) -> None:
    """(b) the textbook QLoRA step (HF Trainer + PEFT, rows padded to the maximum length)."""
    from bench.textbook import load_textbook_model

    textbook = load_textbook_model(b.model_dir, b.device)
    for s in b.seqs:
        row = run_textbook_column(textbook, data[s], s, 4, b.steps, b.warmup, b.device)
        b.result.setdefault("numerics", []).append(
            {"variant": "textbook", "seq": s, "hf_loss_first_4_rows": row["first_lm_loss"]}
        )
        row.update(column="textbook", variant="HF Trainer + PEFT, padded to max length", seq=s)
        b.add("train", row)
    del textbook
    release()


def guarded(run, device) -> dict:
    """One row's measurement; an error (out of memory or any other) becomes the row, not the end of the run."""
    import traceback

    try:
        return run()
    except torch.OutOfMemoryError:
        release()
        return {"error": "out of memory"}
    except Exception as err:  # noqa: BLE001 - a benchmark row reports its failure and the run goes on
        traceback.print_exc()
        release()
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


@dataclass
class HeldModel:
    """The one model the bench holds, under its load settings. Only this holds it, so that it is
    freed before the next one loads: a variant's peak memory is its own (a bf16 base left
    alive once added its 8 GB to the next variant's peak)."""

    key: tuple | None = None
    model: torch.nn.Module | None = None


def ensure_model(b: Bench, v: StepVariant, held: HeldModel, data: dict) -> torch.nn.Module:
    """``v``'s model: the held one when its load settings match, else the held one freed first
    and a fresh load."""
    key = (v.keep_bf16, v.checkpointing, v.lora_dropout, v.compile_layers, v.quantise)
    if key == held.key and held.model is not None:
        return held.model
    held.key, held.model = None, None
    release()
    held.model = load_ours(
        b.model_dir, b.preset, b.device, v.quantise, v.keep_bf16, v.checkpointing, v.lora_dropout, v.compile_layers
    )
    held.key = key
    b.result.setdefault("numerics", []).append(
        {
            "variant": v.name,
            "seq": b.seqs[-1],
            "our_lm_loss_first_4_rows": our_reference_loss(held.model, data[b.seqs[-1]][:4], b.device),
        }
    )
    return held.model


def task_data(b: Bench, n_cases: int):
    """Synthetic keyed ArchEHR-QA cases written as the official XML + key, read back through
    train.py's data path (training.run.stage_data): the task stage's config and items."""
    from bench.synthetic import keyed_cases, write_keyed_cases
    from model.backbone import load_tokenizer
    from training.config import TrainConfig
    from training.run import stage_data

    folder = Path("/tmp/bench-task")
    folder.mkdir(parents=True, exist_ok=True)
    write_keyed_cases(keyed_cases(n_cases, seed=11), folder / "train.xml", folder / "train_key.json")
    cfg = TrainConfig(
        stage="task",
        joint=True,
        preset=b.preset,
        base=b.model_dir,
        xml=str(folder / "train.xml"),
        key=str(folder / "train_key.json"),
    )
    tokenizer = load_tokenizer(b.preset)
    items, sources = stage_data(cfg, tokenizer)
    return cfg, items, sources, tokenizer


def our_rows(b: Bench, data: dict, variants: list[StepVariant], task_variants: list[StepVariant]) -> None:
    """(a) our step (training.loop.train_step): the domain stage per variant and sequence length,
    then the task stage (--joint) per batching, then the export of both stages."""
    from training.data import TrainItem

    held = HeldModel()  # the only reference to the model: no local keeps one across loads
    items = {s: [TrainItem(e) for e in data[s]] for s in b.seqs}
    for v in variants:
        ensure_model(b, v, held, data)
        for s in b.seqs:
            row = guarded(
                lambda: run_ours(held.model, items[s], v, b.steps, b.warmup, b.device, profile=b.args.profile_steps),
                b.device,
            )
            row.update(column="ours", stage="domain", variant=v.name, seq=s)
            b.add("train", row)
    if not task_variants and not b.args.export:
        return
    task_cfg, task_items, sources, tokenizer = task_data(b, 6 if b.args.smoke else b.args.task_cases)
    for v in task_variants:
        ensure_model(b, v, held, data)
        row = guarded(
            lambda: run_ours(
                held.model, task_items, v, b.steps, b.warmup, b.device, stage="task", profile=b.args.profile_steps
            ),
            b.device,
        )
        row.update(column="ours", stage="task", variant=v.name, seq=None, cases=len(task_items))
        b.add("train", row)
    if b.args.export and held.model is not None:
        export_rows(b, held.model, items[b.seqs[-1]], task_cfg, task_items, sources, tokenizer)


def export_rows(b: Bench, model, domain_items, task_cfg, task_items, sources, tokenizer) -> None:
    """``training.export.export_run`` as train.py calls it after each stage, timed whole and its
    calibration alone; then the calibration export did before issue 21 (one case per forward
    through the compiled layers, pair and relevance forwards apart) on the same task items."""
    import dataclasses
    import shutil
    import tempfile

    from model.head_scoring import pair_probabilities, relevance_probabilities
    from training.export import calibrated_thresholds, export_run

    domain_cfg = dataclasses.replace(task_cfg, stage="domain", xml="", key="")
    for stage, cfg, stage_items, stage_sources in (
        ("domain", domain_cfg, domain_items, []),
        ("task", task_cfg, task_items, sources),
    ):

        def timed() -> dict:
            folder = Path(tempfile.mkdtemp(prefix="bench-export-"))
            sync(b.device)
            steps: dict = {}
            t0 = time.perf_counter()
            export_run(
                folder,
                model.backbone,
                model.head,
                tokenizer,
                cfg,
                stage_items,
                stage_sources,
                None,
                None,
                steps=0,
                final_loss=None,
                timings=steps,
            )
            sync(b.device)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            calibrated_thresholds(model.backbone, model.head, stage_items, cfg.calibration_max_examples)
            sync(b.device)
            calibration_s = time.perf_counter() - t0
            t0 = time.perf_counter()  # the path before the merged view: the same forwards through the LoRA modules
            calibrated_thresholds(model.backbone, model.head, stage_items, cfg.calibration_max_examples, merged=False)
            sync(b.device)
            shutil.rmtree(folder, ignore_errors=True)
            return {
                "export_s": round(export_s, 2),
                "export_steps_s": steps,
                "calibration_s": round(calibration_s, 2),
                "calibration_lora_modules_s": round(time.perf_counter() - t0, 2),
            }

        row = guarded(timed, b.device)
        row.update(stage=stage, variant="export_run (now)", examples=len(stage_items))
        b.add("export", row)

    def before() -> dict:
        cited = [it.encoded for it in task_items if it.encoded.pairs and it.encoded.answer_spans][:200]
        sync(b.device)
        t0 = time.perf_counter()
        pair_probabilities(model.backbone, model.head, cited, batch_size=1)
        relevance_probabilities(model.backbone, model.head, [it.encoded for it in task_items][:200])
        sync(b.device)
        return {"calibration_s": round(time.perf_counter() - t0, 2)}

    row = guarded(before, b.device)
    row.update(
        stage="task",
        variant="calibration before issue 21 (one case per forward, compiled no-grad graphs)",
        examples=len(task_items),
    )
    b.add("export", row)


def inference_rows(b: Bench) -> None:
    """The plain inference path in its configurations, then the fast path under each memory cap."""
    args = b.args
    n_ans, n_align, new_tok = (3, 4, 8) if args.smoke else (47, 147, 100)
    adapter_dir = str(Path(b.model_dir).parent / "bench-adapter")
    configs = [(False, 8, 1, None, "NF4 + LoRA (before: batch 8, one case per forward)")] if args.infer_before else []
    configs += [
        (False, args.gen_batch, args.align_batch, None, "NF4 + LoRA"),
        (True, args.gen_batch, args.align_batch, None, "merged dense (from NF4)"),
    ]
    if args.static_cache:
        configs.append(
            (
                True,
                args.gen_batch,
                args.align_batch,
                "static",
                "merged dense (from NF4), static KV cache (compiled decode, compile time included)",
            )
        )
    configs = [c for i, c in enumerate(configs) if str(i) not in set(args.skip_infer.split(","))]
    for merged, gen_batch, align_batch, cache, label in configs:
        row = run_inference(
            b.model_dir, b.preset, b.device, merged, n_ans, n_align, new_tok, gen_batch, align_batch, adapter_dir, cache
        )
        row.update(weights=label)
        b.add("infer", row)
    for cap in [float(c) for c in args.fast_caps.split(",") if c.strip()]:
        row = run_fast_inference(
            b.model_dir, b.preset, b.device, n_ans, n_align, new_tok, adapter_dir, cap_gb=cap or None
        )
        row.update(weights=f"fast path{'' if not cap else f', {cap:g} GB cap'}")
        b.add("infer_fast", row)


@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_out_folder(Path(args.out))  # before any work
    b = set_up(args)
    if b is None:
        print("bench needs a CUDA GPU (use --smoke for a CPU check)", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    n_examples = 400 if not args.smoke else 24
    variants, task_variants = chosen_variants(args)
    if "ours" not in skip and any(v.compile_layers for v in variants + task_variants) and b.device.type == "cuda":
        from model.backbone import start_compile_workers

        start_compile_workers()  # as train.py does, before the data and models
    data = {s: training_examples(n_examples, s, ARCH["vocab_size"], seed=s) for s in b.seqs}
    if "textbook" not in skip:
        textbook_rows(b, data)
    if "ours" not in skip:
        our_rows(b, data, variants, task_variants)
    if "infer" not in skip:
        inference_rows(b)
    b.save()
    print_table(b.result)
    print(f"wrote {b.path}")
    return 0


def print_table(result: dict) -> None:
    print(
        "\n| column | stage | variant | seq | tokens/s | MFU | peak alloc GB | peak reserved GB | warm-up s | "
        "recompiles |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["train"]:
        if "error" in r:
            print(
                f"| {r['column']} | {r.get('stage', 'domain')} | {r['variant']} | {r['seq']} | {r['error']} | | | | | |"
            )
            continue
        print(
            f"| {r['column']} | {r.get('stage', 'domain')} | {r['variant']} | {r['seq']} | {r['tokens_per_s']:.0f} | "
            f"{100 * r.get('mfu', 0):.1f}% | {r['peak_allocated_gb']} | {r['peak_reserved_gb']} | "
            f"{r.get('warmup_s', '')} | {r.get('recompiles', '')} |"
        )
    for r in result.get("export", []):
        print(
            f"export | {r['stage']} | {r['variant']} | {r.get('export_s', '')} s | calibration "
            f"{r.get('calibration_s', '')} s | through the LoRA modules {r.get('calibration_lora_modules_s', '')} s | "
            f"{r.get('error', '')}"
        )
    print("\n| weights | generate 47 (s) | align 147 (s) | total (s) | decode tok/s | peak alloc GB |")
    print("|---|---|---|---|---|---|")
    for r in result["infer"]:
        print(
            f"| {r['weights']} | {r['generate_s']} | {r['align_s']} | {r['total_s']} | "
            f"{r['decode_tokens_per_s']} | {r['peak_allocated_gb']} |"
        )
    if result.get("infer_fast"):
        print(
            "\n| fast path | merged | load (s) | generate (s) | of which capture (s) | align (s) | total (s) | "
            "decode tok/s | decode-only tok/s | peak alloc GB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in result["infer_fast"]:
            if "error" in r:
                print(f"| {r['weights']} | {r['error']} | | | | | | | | |")
                continue
            print(
                f"| {r['weights']} | {r['merged']} | {r['load_s']} | {r['generate_s']} | {r['capture_s']} | "
                f"{r['align_s']} | {r['total_s']} | {r['decode_tokens_per_s']} | {r['decode_only_tokens_per_s']} | "
                f"{r['peak_allocated_gb']} |"
            )


if __name__ == "__main__":
    raise SystemExit(main())
