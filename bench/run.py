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
import contextlib
import datetime as dt
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.flops import mfu, training_flops
from bench.synthetic import inference_cases, training_examples
from plumbing.atomic import check_out_folder
from plumbing.errors import CliParser, exit_on_input_error
from data.prompts import IGNORE_INDEX


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


VARIANTS = [
    StepVariant("ours: rows=4, fp32 upcast, no autocast", "rows"),
    StepVariant("+ token-budget batches (16k)", "tokens"),
    StepVariant("+ bf16 autocast", "tokens", autocast=True),
    StepVariant("+ bf16 embeddings/lm_head", "tokens", autocast=True, keep_bf16=True),
    StepVariant("+ chunked answer CE (1024)", "tokens", autocast=True, keep_bf16=True, lm_chunk=1024),
    StepVariant("+ 32k-token batches", "tokens", max_tokens=32768, autocast=True, keep_bf16=True, lm_chunk=1024),
    StepVariant("+ LoRA dropout 0 (16k)", "tokens", autocast=True, keep_bf16=True, lm_chunk=1024, lora_dropout=0.0),
    StepVariant("+ torch.compile per decoder layer (dropout 0.05)", "tokens", autocast=True, keep_bf16=True,
                lm_chunk=1024, compile_layers=True),
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


def our_batches(examples, variant: StepVariant, seq_len: int) -> list[list[int]]:
    from training.batching import token_budget_batches

    lengths = [len(e.input_ids) for e in examples]
    if variant.batching == "rows":
        return [list(range(i, i + variant.rows)) for i in range(0, len(examples) - variant.rows + 1, variant.rows)]
    return token_budget_batches(lengths, variant.max_tokens, seed=0)


def load_ours(model_dir: str, preset: str, device: torch.device, quantise: bool, keep_bf16: bool, checkpointing: bool,
              lora_dropout: float = 0.05, compile_layers: bool = False):
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.backbone import LoraSettings, load_backbone
    from training.joint import JointModel, LossSettings

    backbone = load_backbone(
        preset, load_in_4bit=quantise, device=device, lora=LoraSettings(dropout=lora_dropout),
        gradient_checkpointing=checkpointing, base_path=model_dir, keep_bf16=keep_bf16,
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
    from training.batching import collate
    from training.data import TrainItem

    batch = {k: v.to(device) for k, v in collate([TrainItem(e) for e in examples], pad_id=0).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return float(model(batch)["lm"])


def run_ours(model, examples, variant: StepVariant, seq_len: int, steps: int, warmup: int, device) -> dict:
    from training.batching import collate
    from training.data import TrainItem

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batches = our_batches(examples, variant, seq_len)[: steps + warmup]
    items = [TrainItem(e) for e in examples]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if variant.autocast else contextlib.nullcontext()
    from training import joint

    joint.LM_CHUNK_TOKENS = variant.lm_chunk
    reset_peak(device)
    times, lengths, supervised, losses = [], [], 0, []
    for k, idx in enumerate(batches):
        batch = {key: v.to(device) for key, v in collate([items[i] for i in idx], pad_id=0).items()}
        sync(device)
        t0 = time.perf_counter()
        with amp:
            out = model(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        losses.append(float(out["lm"]))
        if k >= warmup:
            times.append(time.perf_counter() - t0)
            lengths += [len(examples[i].input_ids) for i in idx]
            supervised += sum(sum(1 for x in examples[i].labels[1:] if x != IGNORE_INDEX) for i in idx)
    del opt
    return summarise(times, lengths, supervised, device, first_lm_loss=losses[0], batches=len(times))


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
    raw = run_textbook(model, examples, seq_len, rows, steps, warmup, pad_id=0, out_dir="/tmp/bench-textbook", device=device)
    mean_len = sum(len(e.input_ids) for e in examples[: rows * (steps + warmup)]) / (rows * (steps + warmup))
    n_rows = raw["steps"] * rows
    lengths = [int(mean_len)] * n_rows  # the Trainer shuffles rows: use the mean real length
    sup_mean = sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in examples) / len(examples)
    row = summarise([raw["seconds"]], lengths, int(sup_mean * n_rows), device, first_lm_loss=first, batches=raw["steps"])
    row.update(peak_allocated_gb=raw["peak_allocated_gb"], peak_reserved_gb=raw["peak_reserved_gb"])
    return row


# --- inference ------------------------------------------------------------------------


def run_inference(model_dir: str, preset: str, device, merged: bool, n_answers: int, n_align: int,
                  max_new_tokens: int, gen_batch: int, align_batch: int, adapter_dir: str,
                  cache: str | None = None) -> dict:
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.backbone import load_adapted, load_backbone, load_tokenizer
    from model.loaded_export import LoadedExport

    if not Path(adapter_dir, "adapter_config.json").is_file():  # a fresh LoRA, saved as a user's would be
        fresh = load_backbone(preset, load_in_4bit=True, device=device, base_path=model_dir, trainable=False)
        fresh.save_pretrained(adapter_dir)
        del fresh
        release()
    sync(device)
    t0 = time.perf_counter()
    load_times: dict = {}
    backbone = load_adapted(preset, adapter_dir, merge=merged, load_in_4bit=True, device=device, base_path=model_dir,
                            timings=load_times)
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
    answers = ckpt.generate_answers(answer_cases, max_new_tokens=max_new_tokens, batch_size=gen_batch,
                                    cache_implementation=cache)
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
        "load_s": round(load_s, 1), "load_steps_s": load_times, "generate_s": round(gen_s, 2), "align_s": round(align_s, 2),
        "total_s": round(gen_s + align_s, 2), "new_tokens": new_tokens, "gen_batch": gen_batch,
        "align_batch": align_batch, "decode_tokens_per_s": round(new_tokens / gen_s, 1), **peaks(device),
    }


def relevance_row(fast, cases, device) -> dict:
    """Subtask 2 relevance of ``cases`` as infer.py gets it after Subtask 4 (read off the
    alignment forwards), in its own token-budget groups, and one forward per case (the path
    before batching): each timed, with its largest difference from the per-case path."""
    import numpy as np

    from data.prompts import encode_example, example_from_case
    from model.head_scoring import relevance_probabilities

    from inference.fast import FastCheckpoint

    inner = fast.inner
    sync(device)
    t0 = time.perf_counter()  # infer.py's path: read off the alignment forwards ``fast`` just ran
    reused = fast.score_relevance_all(cases)
    sync(device)
    reused_s = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()  # its own forwards (Subtask 2 alone, or cases without answers)
    batched = FastCheckpoint(inner, max_memory_gb=fast.max_memory_gb).score_relevance_all(cases)
    sync(device)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = [relevance_probabilities(inner.model, inner.head,
                                   [encode_example(inner.tokenizer, example_from_case(c, with_answer=False))])[0]
           for c in cases]
    sync(device)
    per_case_s = time.perf_counter() - t0
    diff = max(float(np.abs(a - b).max()) for a, b in zip(batched, one))
    reused_diff = max(float(np.abs(a - b).max()) for a, b in zip(reused, one))
    return {"relevance_s": round(seconds, 2), "relevance_per_case_s": round(per_case_s, 2),
            "relevance_after_alignment_s": round(reused_s, 2),
            "relevance_reused_cases": fast.relevance["reused_from_alignment"],
            "relevance_max_abs_diff": diff, "relevance_reused_max_abs_diff": reused_diff,
            "relevance_checked_cases": len(one)}


def run_fast_inference(model_dir: str, preset: str, device, n_answers: int, n_align: int, max_new_tokens: int,
                       adapter_dir: str, cap_gb: float | None = None) -> dict:
    """The fast path (inference/fast.py) as infer.py runs it: under ``cap_gb`` (the process's
    memory fraction, emulating a smaller card) the merge decision and the batch sizes come
    from the memory left; load (base, dequantise, adapter + merge), generation (prefill,
    CUDA-graph capture, decode) and alignment are timed separately."""
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from inference.fast import FastCheckpoint
    from inference.memory import GB, apply_memory_cap, available_bytes, should_merge
    from model.backbone import load_adapted, load_tokenizer
    from model.loaded_export import LoadedExport
    from model.presets import get_preset

    release()
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
        apply_memory_cap(cap_gb, device)
    try:
        budget = available_bytes(device, cap_gb)
        merge, merge_reason = should_merge(get_preset(preset).arch, budget)
        reset_peak(device)
        load_times: dict = {}
        sync(device)
        t0 = time.perf_counter()
        backbone = load_adapted(preset, adapter_dir, merge=merge, load_in_4bit=True, device=device,
                                base_path=model_dir, timings=load_times)
        head = NotePairHead(HeadConfig(hidden_size=backbone.config.hidden_size)).to(device).eval()
        ckpt = LoadedExport(manifest={}, threshold=0.5, tokenizer=load_tokenizer(preset), model=backbone, head=head)
        sync(device)
        load_s = time.perf_counter() - t0
        load_peak = peaks(device)["peak_allocated_gb"]
        answer_cases = inference_cases(n_answers, seed=1)
        align_cases = inference_cases(n_align, seed=2)
        fast = FastCheckpoint(ckpt, max_memory_gb=cap_gb)
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        answers = fast.generate_answers(answer_cases, max_new_tokens=max_new_tokens)
        sync(device)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = fast.score_all(align_cases)
        sync(device)
        align_s = time.perf_counter() - t0
        assert len(scores) == n_align and len(answers) == n_answers
        relevance = relevance_row(fast, align_cases, device)  # Subtask 2, apart from total_s
        new_tokens = sum(len(ckpt.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        report = fast.report()
        decode = report["decode"]
        row = {
            "cap_gb": cap_gb, "merged": merge, "merge_reason": merge_reason,
            "budget_before_load_gb": None if budget is None else round(budget / GB, 2),
            "load_s": round(load_s, 2), "load_steps_s": load_times, "load_peak_allocated_gb": load_peak,
            "generate_s": round(gen_s, 2), "align_s": round(align_s, 2), "total_s": round(gen_s + align_s, 2),
            "prefill_s": decode["prefill_s"], "capture_s": decode["capture_s"], "decode_s": decode["decode_s"],
            "cuda_graph": decode["cuda_graph"], "graph_fallback": decode["graph_fallback"],
            # generated tokens as decoded (stop token included); the old path counts re-tokenised text,
            # the same number when (as with random weights) no answer stops early
            "new_tokens": decode["new_tokens"], "retokenized_new_tokens": new_tokens,
            "decode_tokens_per_s": round(decode["new_tokens"] / gen_s, 1),
            "decode_only_tokens_per_s": round(decode["new_tokens"] / max(decode["decode_s"], 1e-9), 1),
            "gen_batches": decode["batches"], "plans": report["plans"], "alignment": report["alignment"],
            **relevance, "relevance": report["relevance"], **peaks(device),
        }
        del fast, ckpt, backbone, head
    except torch.OutOfMemoryError as err:
        row = {"cap_gb": cap_gb, "error": f"out of memory: {str(err)[:200]}"}
    finally:
        release()
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    return row


# --- main -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results", help="folder for the JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny preset on CPU, few steps: checks the script")
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="all", help="comma-separated indices of VARIANTS, or 'all'")
    p.add_argument("--max-tokens", type=int, default=0, help="override every variant's token budget")
    p.add_argument("--skip", default="", help="comma list of: textbook,ours,infer")
    p.add_argument("--gen-batch", type=int, default=48)
    p.add_argument("--align-batch", type=int, default=16)
    p.add_argument("--infer-before", action="store_true", help="also time the first inference settings")
    p.add_argument("--static-cache", action="store_true", help="also time generation with a static KV cache")
    p.add_argument("--skip-infer", default="", help="comma list of inference config indices to skip")
    p.add_argument("--fast-caps", default="0,24,16",
                   help="fast inference path under these memory caps in GB (0 = the whole card); '' = none")
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
    global ARCH
    from model.backbone import random_base_cache_dir, save_random_base
    from model.presets import get_preset

    preset = "tiny" if args.smoke else "qwen3-4b-random"
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.smoke:
        return None
    ARCH = dict(get_preset(preset).arch)
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
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "preset": preset,
              "machine": platform.node(), "versions": versions(), "train": [], "infer": [],
              "flops_note": "model FLOPs = 2 x forward (dense + causal attention + lm_head on labelled tokens); "
                            "recompute not counted; peak 790 TFLOP/s bf16"}
    return Bench(args, preset, device, model_dir, steps, warmup, seqs, out / name, result)


def chosen_variants(args: argparse.Namespace) -> list[StepVariant]:
    variants = VARIANTS if args.variants == "all" else [VARIANTS[int(i)] for i in args.variants.split(",")]
    for v in variants:
        if args.smoke:
            v.max_tokens = 1024
        elif args.max_tokens:
            v.max_tokens = args.max_tokens
    return variants


def textbook_rows(b: Bench, data: dict) -> None:
    """(b) the textbook QLoRA step (HF Trainer + PEFT, rows padded to the maximum length)."""
    from bench.textbook import load_textbook_model

    textbook = load_textbook_model(b.model_dir, b.device)
    for s in b.seqs:
        row = run_textbook_column(textbook, data[s], s, 4, b.steps, b.warmup, b.device)
        b.result.setdefault("numerics", []).append({"variant": "textbook", "seq": s,
                                                    "hf_loss_first_4_rows": row["first_lm_loss"]})
        row.update(column="textbook", variant="HF Trainer + PEFT, padded to max length", seq=s)
        b.add("train", row)
    del textbook
    release()


def our_rows(b: Bench, data: dict, variants: list[StepVariant]) -> None:
    """(a) our task-stage step, one row per variant and sequence length (a model per load setting)."""
    loaded_key, model = None, None
    for v in variants:
        key = (v.keep_bf16, v.checkpointing, v.lora_dropout, v.compile_layers)
        if key != loaded_key:
            if model is not None:
                model = None
                release()
            model = load_ours(b.model_dir, b.preset, b.device, True, v.keep_bf16, v.checkpointing, v.lora_dropout,
                              v.compile_layers)
            loaded_key = key
            b.result.setdefault("numerics", []).append({
                "variant": v.name, "seq": b.seqs[-1],
                "our_lm_loss_first_4_rows": our_reference_loss(model, data[b.seqs[-1]][:4], b.device)})
        for s in b.seqs:
            try:
                row = run_ours(model, data[s], v, s, b.steps, b.warmup, b.device)
            except torch.OutOfMemoryError:
                row = {"error": "out of memory"}
                torch.cuda.empty_cache()
            row.update(column="ours", variant=v.name, seq=s)
            b.add("train", row)
    model = None
    release()


def inference_rows(b: Bench) -> None:
    """The plain inference path in its configurations, then the fast path under each memory cap."""
    args = b.args
    n_ans, n_align, new_tok = (3, 4, 8) if args.smoke else (47, 147, 100)
    adapter_dir = str(Path(b.model_dir).parent / "bench-adapter")
    configs = [(False, 8, 1, None, "NF4 + LoRA (before: batch 8, one case per forward)")] if args.infer_before else []
    configs += [(False, args.gen_batch, args.align_batch, None, "NF4 + LoRA"),
                (True, args.gen_batch, args.align_batch, None, "merged dense (from NF4)")]
    if args.static_cache:
        configs.append((True, args.gen_batch, args.align_batch, "static",
                        "merged dense (from NF4), static KV cache (compiled decode, compile time included)"))
    configs = [c for i, c in enumerate(configs) if str(i) not in set(args.skip_infer.split(","))]
    for merged, gen_batch, align_batch, cache, label in configs:
        row = run_inference(b.model_dir, b.preset, b.device, merged, n_ans, n_align, new_tok, gen_batch,
                            align_batch, adapter_dir, cache)
        row.update(weights=label)
        b.add("infer", row)
    for cap in [float(c) for c in args.fast_caps.split(",") if c.strip()]:
        row = run_fast_inference(b.model_dir, b.preset, b.device, n_ans, n_align, new_tok, adapter_dir,
                                 cap_gb=cap or None)
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
    variants = chosen_variants(args)
    data = {s: training_examples(n_examples, s, ARCH["vocab_size"], seed=s) for s in b.seqs}
    if "textbook" not in skip:
        textbook_rows(b, data)
    if "ours" not in skip:
        our_rows(b, data, variants)
    if "infer" not in skip:
        inference_rows(b)
    b.save()
    print_table(b.result)
    print(f"wrote {b.path}")
    return 0


def print_table(result: dict) -> None:
    print("\n| column | variant | seq | tokens/s | MFU | peak alloc GB | peak reserved GB |")
    print("|---|---|---|---|---|---|---|")
    for r in result["train"]:
        if "error" in r:
            print(f"| {r['column']} | {r['variant']} | {r['seq']} | {r['error']} | | | |")
            continue
        print(f"| {r['column']} | {r['variant']} | {r['seq']} | {r['tokens_per_s']:.0f} | "
              f"{100 * r.get('mfu', 0):.1f}% | {r['peak_allocated_gb']} | {r['peak_reserved_gb']} |")
    print("\n| weights | generate 47 (s) | align 147 (s) | total (s) | decode tok/s | peak alloc GB |")
    print("|---|---|---|---|---|---|")
    for r in result["infer"]:
        print(f"| {r['weights']} | {r['generate_s']} | {r['align_s']} | {r['total_s']} | "
              f"{r['decode_tokens_per_s']} | {r['peak_allocated_gb']} |")
    if result.get("infer_fast"):
        print("\n| fast path | merged | load (s) | generate (s) | of which capture (s) | align (s) | total (s) | "
              "decode tok/s | decode-only tok/s | peak alloc GB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in result["infer_fast"]:
            if "error" in r:
                print(f"| {r['weights']} | {r['error']} | | | | | | | | |")
                continue
            print(f"| {r['weights']} | {r['merged']} | {r['load_s']} | {r['generate_s']} | {r['capture_s']} | "
                  f"{r['align_s']} | {r['total_s']} | {r['decode_tokens_per_s']} | {r['decode_only_tokens_per_s']} | "
                  f"{r['peak_allocated_gb']} |")


if __name__ == "__main__":
    raise SystemExit(main())
