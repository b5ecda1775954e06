"""The run recipe shared by both stages: set up, train, export.

``run_training(cfg)`` loads data, backbone (+ the init export's adapter and head for
the task stage), builds AdamW over the LoRA and head parameters with a warmup +
cosine/linear schedule, and runs seeded, resumable optimisation under
``accelerate`` (single process by default; ``accelerate launch`` shards batches).
Each optimizer step is :func:`training.loop.train_step` over ``grad_accum`` micro-batches
(the optimisation loop, its state, logging and checkpoints: :mod:`training.loop`).
Every ``log_every`` steps: loss parts, lr and non-padding tokens/s to stderr and
``RUN/log.jsonl``; every ``save_every`` steps a checkpoint; at the end a loss-curve
PNG and ``RUN/export/``.

Several processes (``accelerate launch``, DDP; gloo on CPU, NCCL on GPUs): each
rank trains on every P-th global batch of the same deterministic epoch order, every
rank running the same number of micro-steps (:mod:`training.batching`, not
accelerate's batch-sampler sharding), gradients are averaged, logged losses are
averaged over ranks, and only the main process writes the log, checkpoints (apart
from its own ``rng-R`` files per rank) and the export. The data position in a
checkpoint counts *global* batches, and an optimizer step is ``P * grad_accum``
global batches: resuming with a different process count keeps that product (the
resumed run's ``grad_accum`` becomes ``batches_per_step / P``), so the schedule,
total steps and data position carry over unchanged.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plumbing.errors import InputError
from plumbing.timing import StepClock
from data.records import ESSENTIAL_LABELS, relevance_targets
from heads.alignment import NotePairHead, load_head
from heads.config import HeadConfig
from model.backbone import (
    LoraSettings,
    compile_decoder_layers,
    load_backbone,
    load_tokenizer,
    resolve_preset,
    start_compile_workers,
)
from model.export_folder import ExportManifest, find_export, read_manifest
from model.locate import check_base

from . import checkpoints as ckpts
from . import gather
from .batching import EpochBatches, TokenBudgetBatches, steps_in_epoch
from .config import TrainConfig
from .data import (
    TrainItem,
    domain_examples,
    encode_items,
    task_cases,
    task_examples,
    task_sources,
)
from .hooks import train_hooks
from .init_settings import adopt_init_settings
from .joint import JointModel, LossSettings
from .loop import LOG_FILE, LoopState, Trainer, record_setup, run_epochs, start_state
from .loss_plot import plot_losses
from .run_folder import RunLock, check_new_run_folder, check_not_locked
from .trackers import accelerator_kwargs, finish_trackers, start_trackers

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
        items, dropped = encode_items(
            tokenizer,
            examples,
            cfg.max_length,
            relevance,
            essential=[relevance_targets(c, ESSENTIAL_LABELS) for c in cases],
        )
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
    # Fused: one kernel for the whole update instead of a launch per tensor group, and it skips a
    # flagged step on the device (``found_inf``), so the loop checks for NaNs without waiting.
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)


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


# --- the run, step by step ---------------------------------------------------------------


@dataclass
class RunSetup:
    """What the set-up step resolved before any model exists."""

    cfg: TrainConfig  # with the init export's settings and a resumed run's layout adopted
    out: Path
    preset: object
    init_export: Path | None
    init_manifest: ExportManifest | None
    accelerator: object
    use_bf16: bool
    resume_from: Path | None  # the checkpoint to resume from
    lock: RunLock | None = None  # held by the main process while it writes the run folder


def check_run_inputs(cfg: TrainConfig, resume: bool):
    """Refuse a bad run before anything loads: output folder, preset, base model, init export."""
    if not cfg.out:
        raise InputError("--out is required")
    out = Path(cfg.out)
    check_not_locked(out)  # another training writing this folder: refused before anything else
    if not resume:
        check_new_run_folder(out)
    preset = resolve_preset(cfg.preset) if cfg.preset else None
    if preset is None:
        raise InputError("--preset is required")
    init_export = resolve_init(cfg.init) if cfg.stage == "task" and cfg.init else None
    init_manifest = read_manifest(init_export) if init_export is not None else None
    # A hub id neither cached nor reachable, or a folder that is not a model: one line in seconds.
    check_base(cfg.base or (init_manifest.base_model.path if init_manifest else None) or preset.source, "--base")
    if init_manifest is not None:  # the adapter and head load as trained: record their real settings
        cfg = adopt_init_settings(cfg, init_manifest)
    if init_manifest is not None and init_manifest.preset != preset.name:
        raise InputError(f"--init was trained with preset {init_manifest.preset!r}, not {preset.name!r}", init_export)
    return cfg, out, preset, init_export, init_manifest


def make_accelerator(cfg: TrainConfig):
    """The ``accelerate`` state (one process, or this rank of a launched job) and whether bf16 is on."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    use_bf16 = cfg.bf16 and torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision="bf16" if use_bf16 else "no",
        # Without CUDA, say so: accelerate then runs a launched multi-process job as
        # MULTI_CPU over gloo instead of silently starting P independent runs.
        cpu=not torch.cuda.is_available(),
        # The head's parts can sit out a batch (no citations, no relevance labels).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.joint)],
        **accelerator_kwargs(cfg.report_to, cfg.out),  # --report_to: accelerate's tracker
    )
    gather.check_fsdp_version(accelerator)
    return accelerator, use_bf16


def resume_point(cfg: TrainConfig, out: Path, resume: bool, accelerator) -> tuple[TrainConfig, Path | None]:
    """The checkpoint to resume from, and ``cfg`` with the grad_accum that keeps its global batches per step."""
    resume_from = ckpts.latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        raise InputError("no checkpoint to resume from (checkpoints/step-N)", out)
    if resume_from is None:
        return cfg, None
    resumed = resume_layout(ckpts.read_state(resume_from), cfg, accelerator.num_processes)
    if resumed.grad_accum != cfg.grad_accum and accelerator.is_main_process:
        print(
            f"note: resuming on {accelerator.num_processes} process(es) with grad_accum "
            f"{resumed.grad_accum} (was {cfg.grad_accum}): same global batches per step",
            file=sys.stderr,
        )
    return resumed, resume_from


def set_up_run(cfg: TrainConfig, resume: bool) -> RunSetup:
    from accelerate.utils import set_seed

    cfg, out, preset, init_export, init_manifest = check_run_inputs(cfg, resume)
    accelerator, use_bf16 = make_accelerator(cfg)
    lock = take_run_lock(out, accelerator)
    try:
        cfg, resume_from = resume_point(cfg, out, resume, accelerator)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    set_seed(cfg.seed)
    return RunSetup(cfg, out, preset, init_export, init_manifest, accelerator, use_bf16, resume_from, lock)


def take_run_lock(out: Path, accelerator) -> RunLock | None:
    """The main process locks the run folder; when it is refused, every process stops (exit 2)."""
    lock = problem = None
    if accelerator.is_main_process:
        try:
            lock = RunLock(out, note=lambda line: print(line, file=sys.stderr))
        except InputError as err:
            problem = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([problem is not None])[0]
        if refused and not accelerator.is_main_process:
            raise SystemExit(2)  # the main process says why
    if problem is not None:
        raise problem
    return lock


def save_run_config(setup: RunSetup, resume: bool) -> None:
    if setup.accelerator.is_main_process:
        setup.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            setup.cfg.save(setup.out)


def compiles_layers(cfg: TrainConfig) -> bool:
    """Whether this run compiles its decoder layers: ``compile`` is honoured on CUDA only."""
    return cfg.compile and torch.cuda.is_available()


def build_model(setup: RunSetup) -> tuple[JointModel, NotePairHead]:
    """Backbone (+ the init export's adapter) and head; the head joins the model only for ``joint``."""
    cfg, device = setup.cfg, setup.accelerator.device
    base_path = cfg.base or (setup.init_manifest.base_model.path if setup.init_manifest else None) or None
    backbone = load_backbone(
        setup.preset,
        load_in_4bit=cfg.quantise(),
        device=device,
        lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout),
        gradient_checkpointing=cfg.gradient_checkpointing,
        base_path=base_path,
        adapter_dir=setup.init_export,
        keep_bf16=setup.use_bf16,
        quant_storage=cfg.quant_storage,
    )
    if compiles_layers(cfg):
        compile_decoder_layers(backbone)
    hidden_size = backbone.get_base_model().config.hidden_size
    head = build_head(cfg, hidden_size, setup.init_export, device)
    losses = LossSettings(cfg.align_weight, cfg.pos_weight, cfg.relevance_weight)
    return JointModel(backbone, head if cfg.joint else None, losses), head


def make_sampler(items: list[TrainItem], cfg: TrainConfig) -> EpochBatches:
    lengths = [len(it) for it in items]
    if cfg.batch_tokens:
        return TokenBudgetBatches(lengths, cfg.batch_tokens, cfg.seed, True)
    return EpochBatches(lengths, cfg.batch_size, cfg.seed, True, cfg.group_by_length)


def prepare_trainer(setup: RunSetup, model: JointModel, items: list[TrainItem], pad_id: int) -> Trainer:
    """Optimizer, batches and schedule, then ``accelerate.prepare`` (DDP / FSDP wrapping)."""
    from accelerate.utils import DistributedType

    cfg, accelerator = setup.cfg, setup.accelerator
    optimizer = make_optimizer(model, cfg)
    sampler = make_sampler(items, cfg)
    steps_per_epoch = steps_in_epoch(sampler.num_batches(), 0, accelerator.num_processes, cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    if accelerator.distributed_type == DistributedType.FSDP:
        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_wrap_policy(model)
    # No data loader through accelerate: training.batching splits the batches itself.
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    return Trainer(
        cfg,
        setup.out,
        accelerator,
        wrapped,
        accelerator.unwrap_model(wrapped),
        optimizer,
        scheduler,
        sampler,
        items,
        pad_id,
        total_steps,
        train_hooks(),
    )


def finish_run(
    setup: RunSetup, t: Trainer, state: LoopState, head: NotePairHead, tokenizer, sources: list[str]
) -> Path | None:
    """Loss curve and ``RUN/export`` (main process; every rank joins FSDP's weight gather)."""
    accelerator, export_dir = t.accelerator, None
    accelerator.wait_for_everyone()
    with gather.full_parameters(accelerator, t.model):  # every rank: FSDP gathers the weights
        if accelerator.is_main_process:
            from .export import export_run

            if t.cfg.plot and (t.out / LOG_FILE).is_file():
                plot_losses(
                    t.out / LOG_FILE,
                    t.out / CURVE_FILE,
                    f"Training losses: {t.cfg.stage} stage, preset {t.cfg.preset} ({t.out.name})",
                )
            fsdp = gather.is_fsdp(accelerator)
            export_dir = export_run(
                t.out,
                t.plain.backbone,
                head,
                tokenizer,
                t.cfg,
                t.items,
                sources,
                setup.init_export,
                setup.init_manifest,
                steps=state.step,
                final_loss=state.history[-1]["loss"] if state.history else None,
                adapter_state=gather.trainable_state(t.plain.backbone, None)[0] if fsdp else None,
                calibrate_alignment=not fsdp,
            )
    accelerator.wait_for_everyone()
    return export_dir


def run_training(cfg: TrainConfig, resume: bool = False) -> RunResult:
    setup = set_up_run(cfg, resume)
    try:
        return train_and_export(setup, resume)
    finally:
        if setup.lock is not None:
            setup.lock.release()


def train_and_export(setup: RunSetup, resume: bool) -> RunResult:
    setup_s: dict[str, float] = {}
    clock = StepClock(setup_s)
    if compiles_layers(setup.cfg):
        start_compile_workers()  # up before the first step reaches inductor (issue 21)
        clock("compile_workers_s")
    tokenizer = load_tokenizer(setup.cfg.base or setup.preset)
    clock("tokenizer_s")
    items, sources = stage_data(setup.cfg, tokenizer)
    save_run_config(setup, resume)
    clock("data_s")
    model, head = build_model(setup)
    clock("model_s")
    trainer = prepare_trainer(setup, model, items, tokenizer.pad_token_id)
    state = start_state(trainer, setup.resume_from)
    clock("prepare_s")
    record_setup(trainer, state, setup_s)
    start_trackers(setup.accelerator, setup.cfg.report_to, setup.cfg.to_dict(), state.step)
    run_epochs(trainer, state, setup.resume_from)
    export_dir = None if state.interrupted else finish_run(setup, trainer, state, head, tokenizer, sources)
    finish_trackers(setup.accelerator)
    return RunResult(setup.out, state.step, state.interrupted, export_dir, state.history, trainer.plain.backbone, head)
