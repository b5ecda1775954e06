"""The training loop shared by both stages.

``run_training(cfg)`` loads data, backbone (+ the init export's adapter and head for
the task stage), builds AdamW over the LoRA and head parameters with a warmup +
cosine/linear schedule, and runs seeded, resumable optimisation under
``accelerate`` (single process by default; ``accelerate launch`` shards batches).
Each optimizer step is :func:`train_step` calls over ``grad_accum`` micro-batches.
Every ``log_every`` steps: loss parts, lr and non-padding tokens/s to stdout and
``RUN/log.jsonl``; every ``save_every`` steps a checkpoint; at the end a loss-curve
PNG and ``RUN/export/``.

Several processes (``accelerate launch``, DDP; gloo on CPU, NCCL on GPUs): each
rank trains on every P-th global batch of the same deterministic epoch order, every
rank running the same number of micro-steps (:mod:`training.sharding`, not
accelerate's batch-sampler sharding), gradients are averaged, logged losses are
averaged over ranks, and only the main process writes the log, checkpoints (apart
from its own ``rng-R`` files per rank) and the export. The data position in a
checkpoint counts *global* batches, and an optimizer step is ``P * grad_accum``
global batches: resuming with a different process count keeps that product (the
resumed run's ``grad_accum`` becomes ``batches_per_step / P``), so the schedule,
total steps and data position carry over unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.errors import InputError
from heads.alignment import NotePairHead, load_head
from heads.config import HeadConfig
from model.backbone import LoraSettings, compile_decoder_layers, load_backbone, load_tokenizer, resolve_preset
from model.export_folder import find_export, read_manifest

from . import checkpoints as ckpts
from . import gather
from .config import TrainConfig
from .interrupt import TrainingDiverged, check_finite, non_finite, stop_requested
from .data import (
    EpochBatches,
    TokenBudgetBatches,
    TrainItem,
    collate,
    domain_examples,
    encode_items,
    ESSENTIAL_LABELS,
    relevance_targets,
    task_cases,
    task_examples,
    task_sources,
)
from .init_settings import adopt_init_settings
from .joint import JointModel, LossSettings
from .sharding import rank_micro_batches, steps_in_epoch

LOG_FILE = "log.jsonl"
CURVE_FILE = "loss_curve.png"


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    interrupted: bool
    export_dir: Path | None
    history: list[dict] = field(default_factory=list)
    # The live trained objects (unwrapped), for callers that go on in-process.
    backbone: object = None
    head: NotePairHead | None = None


# --- pieces --------------------------------------------------------------------------


def resolve_init(init: str | Path) -> Path:
    """An export folder, given a run folder (uses RUN/export) or the export folder itself."""
    return find_export(init)


def stage_data(cfg: TrainConfig, tokenizer) -> tuple[list[TrainItem], list[str]]:
    """Encoded training items of the configured stage and the data files they came from."""
    if cfg.stage == "domain":
        examples, sources = domain_examples(cfg)
        items, dropped = encode_items(tokenizer, examples, cfg.max_length)
    else:
        cases = task_cases(cfg)
        examples, relevance = task_examples(cases, cfg.joint)
        items, dropped = encode_items(tokenizer, examples, cfg.max_length, relevance,
                                      essential=[relevance_targets(c, ESSENTIAL_LABELS) for c in cases])
        sources = task_sources(cfg)
    if dropped:
        print(f"note: skipped {dropped} example(s) longer than max_length={cfg.max_length}", file=sys.stderr)
    if not items:
        raise InputError(f"no example fits max_length={cfg.max_length}", sources[0])
    return items, [str(s) for s in sources]


def build_head(cfg: TrainConfig, hidden_size: int, init_export: Path | None, device) -> NotePairHead:
    """The init export's head when it has one (continued training), else a fresh one."""
    if init_export is not None and (init_export / "head.safetensors").is_file():
        return load_head(init_export, device=device)
    head_cfg = HeadConfig(
        hidden_size=hidden_size,
        proj_dim=cfg.head_proj_dim,
        mlp_dim=cfg.head_mlp_dim,
        pooling=cfg.head_pooling,
        relevance=cfg.head_relevance,
        dropout=cfg.head_dropout,
        layer=cfg.head_layer,
    )
    return NotePairHead(head_cfg).to(device)


def make_optimizer(model: JointModel, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": cfg.lr}]
    if model.head is not None:
        groups.append({"params": list(model.head.parameters()), "lr": cfg.head_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = int(round(cfg.warmup_ratio * total_steps))
    if cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    make = get_cosine_schedule_with_warmup if cfg.schedule == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, warmup, total_steps)


def train_step(model, batch: dict, accelerator, grad_accum: int = 1, weight: float = 1.0) -> dict[str, float]:
    """Forward + backward of one micro-batch; returns the (unscaled) loss parts as floats.
    ``weight`` 0 is a filler micro-step (training.sharding): it only keeps ranks in step."""
    losses = model(batch)
    accelerator.backward(losses["loss"] / grad_accum if weight == 1.0 else losses["loss"] * (weight / grad_accum))
    return {k: float(v.detach()) for k, v in losses.items()}


LOSS_PARTS = {"loss": "total (weighted sum)", "lm": "answer tokens (LM)", "align": "alignment pairs",
              "relevance": "note-sentence relevance"}


def plot_losses(log_path: Path, out_png: Path) -> list[str]:
    """Every logged loss part against the step; returns the parts drawn (for tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    drawn = []
    for key, meaning in LOSS_PARTS.items():
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            # Markers keep a short run (one or a few logged points) visible; long runs stay lines.
            ax.plot(steps, values, label=f"{key}: {meaning}", marker="o" if len(rows) <= 50 else None, markersize=4)
            drawn.append(key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over the logging window)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return drawn


def merged_window(accelerator, window: dict[str, float], window_micro: int) -> tuple[dict[str, float], int]:
    """Sum the loss windows of all processes (so logged losses are global means)."""
    if accelerator.num_processes == 1:
        return window, window_micro
    from accelerate.utils import gather_object

    merged: dict[str, float] = {}
    total = 0
    for part, micro in gather_object([(window, window_micro)]):
        for k, v in part.items():
            merged[k] = merged.get(k, 0.0) + v
        total += micro
    return merged, total


def resume_layout(state: dict, cfg: TrainConfig, processes: int) -> TrainConfig:
    """``cfg`` with ``grad_accum`` set so one optimizer step is still the checkpoint's
    ``batches_per_step`` global batches under ``processes`` processes."""
    per_step = state.get("batches_per_step")
    if per_step is None or per_step == processes * cfg.grad_accum:
        return cfg
    if per_step % processes:
        raise InputError(
            f"the checkpoint takes {per_step} global batches per optimizer step, which {processes} "
            f"processes cannot split evenly; resume with a process count that divides {per_step}"
        )
    return dataclasses.replace(cfg, grad_accum=per_step // processes)


def fsdp_wrap_policy(model: JointModel):
    """FSDP auto-wrap policy (``torch.distributed.fsdp`` signature) for QLoRA + head.

    FSDP flattens each unit's parameters into one tensor, which needs one dtype. So
    every decoder layer is a unit (bf16-stored NF4 weights and bf16/fp32 norms), every
    trainable leaf (LoRA A/B, fp32) is a unit of its own, and so is the fp32 head; the
    root keeps the embeddings, final norm and lm_head.
    """
    from model.backbone import decoder

    layer_types = tuple({type(layer) for layer in decoder(model.backbone).layers})
    head = model.head
    inside_head = {id(m) for m in head.modules() if m is not head} if head is not None else set()

    def own_unit(module: torch.nn.Module) -> bool:
        if head is not None and module is head:
            return True
        if id(module) in inside_head:  # one unit for the whole (small, fp32) head
            return False
        if isinstance(module, layer_types):
            return True
        is_leaf = next(module.children(), None) is None
        weight = getattr(module, "weight", None)
        return is_leaf and isinstance(weight, torch.nn.Parameter) and weight.requires_grad

    def policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return True if recurse else own_unit(module)

    return policy


def _truncate_log(log_path: Path, last_step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not log_path.is_file():
        return
    rows = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# --- the loop ------------------------------------------------------------------------


def run_training(cfg: TrainConfig, resume: bool = False) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if not cfg.out:
        raise InputError("--out is required")
    out = Path(cfg.out)
    if not resume and ((out / "export").exists() or ckpts.checkpoint_dirs(out)):
        raise InputError("output folder already holds a run; use --resume or another --out", out)
    preset = resolve_preset(cfg.preset) if cfg.preset else None
    if preset is None:
        raise InputError("--preset is required")
    init_export = resolve_init(cfg.init) if cfg.stage == "task" and cfg.init else None
    init_manifest = read_manifest(init_export) if init_export is not None else None
    if preset.source is not None:  # a hub id neither cached nor reachable: one line in seconds
        from model.export_checks import check_base_available

        check_base_available(cfg.base_path or (init_manifest or {}).get("base_model", {}).get("path")
                             or preset.source, "--base_path")
    if init_manifest is not None:  # the adapter and head load as trained: record their real settings
        cfg = adopt_init_settings(cfg, init_manifest)
    if init_manifest is not None and init_manifest.get("preset") != preset.name:
        raise InputError(
            f"--init was trained with preset {init_manifest.get('preset')!r}, not {preset.name!r}", init_export
        )

    use_bf16 = cfg.bf16 and torch.cuda.is_available()
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(
        mixed_precision="bf16" if use_bf16 else "no",
        # Without CUDA, say so: accelerate then runs a launched multi-process job as
        # MULTI_CPU over gloo instead of silently starting P independent runs.
        cpu=not torch.cuda.is_available(),
        # The head's parts can sit out a batch (no citations, no relevance labels).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.joint)],
    )
    gather.check_fsdp_version(accelerator)
    resume_from = ckpts.latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        raise InputError("no checkpoint to resume from (checkpoints/step-N)", out)
    if resume_from is not None:
        resumed = resume_layout(ckpts.read_state(resume_from), cfg, accelerator.num_processes)
        if resumed.grad_accum != cfg.grad_accum and accelerator.is_main_process:
            print(f"note: resuming on {accelerator.num_processes} process(es) with grad_accum "
                  f"{resumed.grad_accum} (was {cfg.grad_accum}): same global batches per step", file=sys.stderr)
        cfg = resumed
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.base_path or preset)
    items, sources = stage_data(cfg, tokenizer)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            cfg.save(out)

    base_path = cfg.base_path or (init_manifest or {}).get("base_model", {}).get("path") or None
    backbone = load_backbone(
        preset,
        load_in_4bit=cfg.quantise(),
        device=accelerator.device,
        lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout),
        gradient_checkpointing=cfg.gradient_checkpointing,
        base_path=base_path,
        adapter_dir=init_export,
        keep_bf16=use_bf16,
        quant_storage=cfg.quant_storage,
    )
    if cfg.compile and torch.cuda.is_available():
        compile_decoder_layers(backbone)
    hidden_size = backbone.get_base_model().config.hidden_size
    head = build_head(cfg, hidden_size, init_export, accelerator.device)
    model = JointModel(
        backbone,
        head if cfg.joint else None,
        LossSettings(cfg.align_weight, cfg.pos_weight, cfg.relevance_weight),
    )
    optimizer = make_optimizer(model, cfg)

    lengths = [len(it) for it in items]
    if cfg.batch_tokens:
        sampler = TokenBudgetBatches(lengths, cfg.batch_tokens, cfg.seed, True)
    else:
        sampler = EpochBatches(lengths, cfg.batch_size, cfg.seed, True, cfg.group_by_length)
    pad_id = tokenizer.pad_token_id
    record = Path(cfg.record_batches) if cfg.record_batches else None
    procs = accelerator.num_processes
    steps_per_epoch = steps_in_epoch(sampler.num_batches(), 0, procs, cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    from accelerate.utils import DistributedType, send_to_device

    if accelerator.distributed_type == DistributedType.FSDP:
        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_wrap_policy(model)
    # No data loader through accelerate: training.sharding splits the batches itself.
    model, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(model)

    step, epoch, position, tokens_seen = 0, 0, 0, 0
    if record is not None:
        record.mkdir(parents=True, exist_ok=True)
        record_file = record / f"batches-rank{accelerator.process_index}.jsonl"
    if resume_from is not None:
        state = ckpts.load_checkpoint(resume_from, plain, optimizer, scheduler, accelerator, model)
        step, epoch, position, tokens_seen = state["step"], state["epoch"], state["position"], state["tokens"]
        if accelerator.is_main_process:
            _truncate_log(out / LOG_FILE, step)
            if ckpts.skipped_newer(out, resume_from):  # never silent: the fallback goes in the run's log
                with (out / LOG_FILE).open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": step, "resumed_from": resume_from.name,
                                         "skipped_torn": ckpts.skipped_newer(out, resume_from)}) + "\n")

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc=f"{cfg.stage}", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
    history: list[dict] = []
    window: dict[str, float] = {}
    window_micro, window_tokens, window_start = 0, 0, time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    interrupted = False
    bad_losses: list[str] = []  # loss parts that were not finite in this optimizer step
    model.train()

    while step < total_steps:
        micro_batches = rank_micro_batches(sampler.batches(epoch), position, procs, accelerator.process_index,
                                           cfg.grad_accum)
        if resume_from is not None:
            # After the iterator exists: the RNG stream continues exactly where it was saved.
            ckpts.load_rng(resume_from, accelerator.process_index)
            resume_from = None
        for micro_batch in micro_batches:
            real = micro_batch.weight > 0
            if record is not None and real:
                seen = {"rank": accelerator.process_index, "step": step + 1, "epoch": epoch,
                        "index": micro_batch.indices}
                with record_file.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(seen) + "\n")
            batch = send_to_device(collate([items[i] for i in micro_batch.indices], pad_id), accelerator.device)
            boundary = micro_batch.last_of_step
            sync = contextlib.nullcontext() if boundary else accelerator.no_sync(model)
            with sync:
                losses = train_step(model, batch, accelerator, cfg.grad_accum, micro_batch.weight)
            bad_losses += non_finite(losses)
            if real:
                for k, v in losses.items():
                    window[k] = window.get(k, 0.0) + v
                window_micro += 1
                window_tokens += sum(lengths[i] for i in micro_batch.indices)
            if not boundary:
                continue
            grad_norm = None
            if cfg.max_grad_norm > 0:
                # FSDP: the root's own clip (global norm over all shards) is used only when handed
                # all of the model's parameters; a subset would clip each rank's shard by its own norm.
                norm = accelerator.clip_grad_norm_(model.parameters() if gather.is_fsdp(accelerator) else params,
                                                   cfg.max_grad_norm)
                grad_norm = float(norm) if norm is not None else None
            try:  # before optimizer.step: a NaN never reaches the weights or a checkpoint
                check_finite(step + 1, bad_losses, grad_norm, accelerator, lambda: ckpts.latest_checkpoint(out), out)
            except TrainingDiverged as err:
                if accelerator.is_main_process:
                    with (out / LOG_FILE).open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps({"step": step + 1, "epoch": epoch, "diverged": err.problem}) + "\n")
                raise
            optimizer.step()
            step_lr = scheduler.get_last_lr()[0]  # the rate this step used (step() moves on to the next)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                tokens = int(accelerator.reduce(torch.tensor(window_tokens, device=accelerator.device), "sum"))
                window, window_micro = merged_window(accelerator, window, window_micro)
                tokens_seen += tokens
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                row = {"step": step, "epoch": epoch}
                row.update({k: round(v / window_micro, 5) for k, v in window.items() if k != "answer_tokens"})
                row.update(lr=step_lr, tokens=tokens_seen, tokens_per_s=round(tokens / elapsed, 1))
                if torch.cuda.is_available():
                    row["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    if procs > 1:  # every rank's peak, in global rank order
                        peak = torch.tensor([row["max_mem_gb"]], device=accelerator.device)
                        row["max_mem_gb_ranks"] = [round(x, 2) for x in accelerator.gather(peak).tolist()]
                history.append(row)
                if accelerator.is_main_process:
                    with (out / LOG_FILE).open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
                    bar.write(  # a log line: stderr (tqdm.write defaults to stdout, which holds results)
                        f"step {step}/{total_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                        f"tok/s {row['tokens_per_s']:.0f}", file=sys.stderr
                    )
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                window, window_micro, window_tokens, window_start = {}, 0, 0, time.perf_counter()
            stopping = cfg.stop_after_steps > 0 and step >= cfg.stop_after_steps and step < total_steps
            stopping = stopping or (stop_requested(accelerator) and step < total_steps)  # SIGINT/SIGTERM
            if (cfg.save_every > 0 and step % cfg.save_every == 0) or stopping:
                next_epoch, next_position = ((epoch + 1, 0) if micro_batch.end_of_epoch
                                             else (epoch, micro_batch.consumed))
                state = {"step": step, "epoch": next_epoch, "position": next_position, "tokens": tokens_seen,
                         "total_steps": total_steps, "processes": procs,
                         "batches_per_step": procs * cfg.grad_accum}
                ckpts.save_checkpoint(out, step, plain, accelerator, optimizer, scheduler, state,
                                      keep=cfg.keep_checkpoints, wrapped=model)
            if stopping:
                interrupted = True
                break
            if step >= total_steps:
                break
        if interrupted:
            break
        epoch += 1
        position = 0
    bar.close()

    export_dir = None
    if not interrupted:
        accelerator.wait_for_everyone()
        with gather.full_parameters(accelerator, model):  # every rank: FSDP gathers the weights
            if accelerator.is_main_process:
                from .export import export_run

                if cfg.plot and (out / LOG_FILE).is_file():
                    plot_losses(out / LOG_FILE, out / CURVE_FILE)
                fsdp = gather.is_fsdp(accelerator)
                export_dir = export_run(
                    out, plain.backbone, head, tokenizer, cfg, items, sources, init_export, init_manifest,
                    steps=step, final_loss=history[-1]["loss"] if history else None,
                    adapter_state=gather.trainable_state(plain.backbone, None)[0] if fsdp else None,
                    calibrate_alignment=not fsdp,
                )
        accelerator.wait_for_everyone()
    return RunResult(out, step, interrupted, export_dir, history, plain.backbone, head)
