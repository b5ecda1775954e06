"""The optimisation loop of one run: its state, the training step, logging, checkpoints.

:func:`training.run.run_training` sets up a :class:`Trainer` (the prepared model,
optimizer, schedule and batches) and hands it to :func:`run_epochs`, which walks the
epochs from :func:`start_state` (a fresh run or a checkpoint) until the last step, an
interrupt, or the ``ARCHEHR_TEST_STOP_AFTER_STEPS`` hook (:mod:`training.hooks`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from model.backbone import training_attention

from . import checkpoints as ckpts
from . import gather
from .batching import EpochBatches, MicroBatch, collate, rank_micro_batches
from .config import TrainConfig
from .data import TrainItem
from .hooks import TrainHooks
from .interrupt import TrainingDiverged, check_finite, non_finite, stop_requested
from .joint import JointModel
from .trackers import log_row

LOG_FILE = "log.jsonl"


@dataclass
class Trainer:
    """What the loop works with (built by training.run's set-up steps)."""

    cfg: TrainConfig
    out: Path
    accelerator: object
    model: object  # what accelerate.prepare returned (DDP / FSDP wrapper or the JointModel itself)
    plain: JointModel  # the unwrapped model
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: EpochBatches
    items: list[TrainItem]
    pad_id: int
    total_steps: int
    hooks: TrainHooks

    @property
    def procs(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process so far (``torch._dynamo`` counters)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0
    return int(counters["stats"].get("unique_graphs", 0))


@dataclass
class CompileWatch:
    """Which optimizer steps compiled graphs, and how long they took: the fixed warm-up cost,
    reported apart from the steady tokens/s (log line, ``log.jsonl`` and :class:`RunResult`)."""

    seconds: float = 0.0  # wall time of the steps that compiled (their own compute included)
    steps: list[int] = field(default_factory=list)
    graphs: int = 0
    after_first_epoch: int = 0  # graphs compiled after epoch 0: a new shape the first epoch did not have

    def after_step(self, state: "LoopState", graphs_before: int, started: float) -> float:
        """Note the step just taken if it compiled; returns its wall seconds (0 if it did not compile)."""
        new = compiled_graphs() - graphs_before
        if new <= 0:
            return 0.0
        took = time.perf_counter() - started
        self.seconds += took
        self.steps.append(state.step)
        self.graphs += new
        if state.epoch > 0:
            self.after_first_epoch += new
        return took

    def summary(self) -> dict:
        return {
            "compile_s": round(self.seconds, 1),
            "compile_steps": self.steps,
            "compiled_graphs": self.graphs,
            "recompiles_after_first_epoch": self.after_first_epoch,
        }


@dataclass
class PendingStep:
    """An optimizer step whose numbers are still on the device: its loss parts, gradient norm and
    non-finite flag. They are read back in one transfer while the next step's kernels run
    (:func:`settle`), so the host never waits for the GPU between steps."""

    step: int
    epoch: int
    losses: list[tuple[dict, bool]]  # each micro-batch's loss parts, and whether it is real (not a filler)
    grad_norm: torch.Tensor | None  # global norm before clipping (only computed when clipping)
    anywhere: torch.Tensor | None  # 1.0 where any process saw a non-finite number (device flag), else 0.0


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # global batches of ``epoch`` already trained on
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)
    # The logging window: summed loss parts, real micro-batches and tokens since the last log line.
    window: dict[str, float] = field(default_factory=dict)
    window_micro: int = 0
    window_tokens: int = 0
    window_start: float = 0.0
    window_collate_s: float = 0.0  # host seconds building and sending batches (a step's first waits for them)
    interrupted: bool = False
    grad_norm: float | None = None  # global norm before clipping, of the latest step read back
    pending: "PendingStep | None" = None  # the latest optimizer step, its numbers not read back yet
    compile_watch: CompileWatch = field(default_factory=CompileWatch)

    def reset_window(self) -> None:
        self.window, self.window_micro, self.window_tokens, self.window_start = {}, 0, 0, time.perf_counter()
        self.window_collate_s = 0.0


def forward_backward(model, batch: dict, accelerator, grad_accum: int = 1, weight: float = 1.0) -> dict:
    """Forward + backward of one micro-batch; returns the (unscaled) loss parts as detached tensors
    (read back once per optimizer step, so the host never waits on the GPU between micro-batches).
    ``weight`` 0 is a filler micro-step (training.batching): it only keeps ranks in step."""
    with training_attention():  # forward and backward: a checkpointed layer recomputes in the backward
        losses = model(batch)
        accelerator.backward(losses["loss"] / grad_accum if weight == 1.0 else losses["loss"] * (weight / grad_accum))
    return {k: v.detach() for k, v in losses.items() if k != "answer_tokens"}


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


def _truncate_log(log_path: Path, last_step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not log_path.is_file():
        return
    rows = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _append_log(t: Trainer, row: dict, track: bool = True) -> None:
    with (t.out / LOG_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    if track:
        log_row(t.accelerator, row)  # --report_to: the same row to the tracker (training.trackers)


def record_setup(t: Trainer, state: LoopState, seconds: dict[str, float]) -> None:
    """The set-up's seconds by step (tokenizer, data, model, prepare) as a log.jsonl row: the
    fixed cost of a run beside its compile warm-up and its steps."""
    if t.accelerator.is_main_process:  # log.jsonl only: a tracker's series are the step rows
        _append_log(t, {"step": state.step, "setup_steps_s": seconds}, track=False)


def start_state(t: Trainer, resume_from: Path | None) -> LoopState:
    """A fresh state, or the checkpoint's (weights, optimizer and schedule restored into ``t``)."""
    state = LoopState()
    if resume_from is None:
        return state
    saved = ckpts.load_checkpoint(resume_from, t.plain, t.optimizer, t.scheduler, t.accelerator, t.model)
    state.step, state.epoch, state.position, state.tokens_seen = (
        saved["step"],
        saved["epoch"],
        saved["position"],
        saved["tokens"],
    )
    if t.accelerator.is_main_process:
        _truncate_log(t.out / LOG_FILE, state.step)
        if ckpts.skipped_newer(t.out, resume_from):  # never silent: the fallback goes in the run's log
            _append_log(
                t,
                {
                    "step": state.step,
                    "resumed_from": resume_from.name,
                    "skipped_torn": ckpts.skipped_newer(t.out, resume_from),
                },
            )
    return state


def micro_step(t: Trainer, state: LoopState, micro_batch: MicroBatch) -> dict:
    """Forward + backward of one micro-batch; returns its loss parts (device tensors) and counts its tokens."""
    from accelerate.utils import send_to_device

    real = micro_batch.weight > 0
    if real:
        t.hooks.record(t.rank, state.step + 1, state.epoch, micro_batch.indices)
    started = time.perf_counter()
    batch = send_to_device(collate([t.items[i] for i in micro_batch.indices], t.pad_id), t.accelerator.device)
    state.window_collate_s += time.perf_counter() - started
    sync = contextlib.nullcontext() if micro_batch.last_of_step else t.accelerator.no_sync(t.model)
    with sync:
        losses = forward_backward(t.model, batch, t.accelerator, t.cfg.grad_accum, micro_batch.weight)
    if real:
        state.window_micro += 1
        state.window_tokens += sum(t.sampler.lengths[i] for i in micro_batch.indices)
    return losses


def skips_on_device(optimizer) -> bool:
    """Whether the optimizer skips a step on the device when told to (``found_inf``): torch's
    fused AdamW does, and then the non-finite check can wait until the step's numbers are read.
    Each group's own flag (accelerate's wrapper shows the same groups): a checkpoint's param groups
    replace the new optimizer's on resume."""
    return all(group.get("fused") for group in optimizer.param_groups)


def train_step(t: Trainer, state: LoopState, micro_batches: Sequence[MicroBatch], params: list) -> float:
    """One optimizer step: forward + backward of each of this rank's micro-batches, then clip and
    step. Returns the lr the step used. ``train.py``'s loop and ``bench/run.py`` both time this.

    The previous step's numbers are read once this step's forward and backward are queued: the
    GPU has finished that step long before, so the host does not wait, and the GPU does not idle
    while the host builds the next batch and queues the optimizer."""
    step_losses = [(micro_step(t, state, mb), mb.weight > 0) for mb in micro_batches]
    settle(t, state)
    return optimizer_step(t, state, params, step_losses)


def optimizer_steps(micro_batches: Iterable[MicroBatch]) -> Iterator[list[MicroBatch]]:
    """Micro-batches grouped into optimizer steps (a group ends with ``last_of_step``)."""
    group: list[MicroBatch] = []
    for micro_batch in micro_batches:
        group.append(micro_batch)
        if micro_batch.last_of_step:
            yield group
            group = []


def non_finite_flag(t: Trainer, step_losses: list[tuple[dict, bool]], norm: torch.Tensor | None) -> torch.Tensor:
    """1.0 on the device where any loss part (fillers too) or the gradient norm is not finite on
    any process, else 0.0; summed over the processes without the host waiting for it."""
    parts = [v.float().reshape(()) for losses, _ in step_losses for v in losses.values()]
    if norm is not None:
        parts.append(norm.float().reshape(()).to(t.accelerator.device))
    if not parts:
        return torch.zeros((), device=t.accelerator.device)
    flag = (~torch.isfinite(torch.stack(parts))).any().float()
    if t.procs > 1:
        flag = t.accelerator.reduce(flag, "sum").clamp(max=1.0)
    return flag


def optimizer_step(t: Trainer, state: LoopState, params: list, step_losses: list[tuple[dict, bool]]) -> float:
    """Clip, step optimizer and schedule; returns the lr the step used. A non-finite step never
    reaches the weights: a fused optimizer skips it on the device (``found_inf``) and the loop
    stops when the step is read back (:func:`settle`); any other optimizer is checked first."""
    norm = None
    if t.cfg.max_grad_norm > 0:
        # FSDP: the root's own clip (global norm over all shards) is used only when handed
        # all of the model's parameters; a subset would clip each rank's shard by its own norm.
        norm = t.accelerator.clip_grad_norm_(
            t.model.parameters() if gather.is_fsdp(t.accelerator) else params, t.cfg.max_grad_norm
        )
    on_device = skips_on_device(t.optimizer)
    flag = non_finite_flag(t, step_losses, norm) if on_device or t.procs > 1 else None
    state.pending = PendingStep(state.step + 1, state.epoch, step_losses, norm, flag)
    inner = getattr(t.optimizer, "optimizer", t.optimizer)
    if on_device:
        inner.found_inf = flag  # read by the fused kernel: a flagged step changes no weight or moment
    else:
        settle(t, state)  # before optimizer.step: a NaN never reaches the weights or a checkpoint
    t.optimizer.step()
    step_lr = t.scheduler.get_last_lr()[0]  # the rate this step used (step() moves on to the next)
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return step_lr


def settle(t: Trainer, state: LoopState) -> None:
    """Read back the pending step's numbers in one transfer: real micro-batches' loss parts into the
    logging window, the gradient norm; stop the run (every rank) if any was not finite."""
    pending, state.pending = state.pending, None
    if pending is None:
        return
    keys = [(i, k) for i, (losses, _) in enumerate(pending.losses) for k in losses]
    extra = [x for x in (pending.grad_norm, pending.anywhere) if x is not None]
    tensors = [pending.losses[i][0][k] for i, k in keys] + extra
    values = torch.stack([x.float().reshape(()).to(t.accelerator.device) for x in tensors]).tolist() if tensors else []
    bad: list[str] = []
    for (i, k), v in zip(keys, values):
        bad += non_finite({k: v})
        if pending.losses[i][1]:
            state.window[k] = state.window.get(k, 0.0) + v
    rest = values[len(keys) :]
    grad_norm = rest.pop(0) if pending.grad_norm is not None else None
    anywhere = bool(rest.pop(0) > 0) if pending.anywhere is not None else None
    if grad_norm is not None:
        state.grad_norm = grad_norm
    try:
        check_finite(
            pending.step, bad, grad_norm, t.accelerator, lambda: ckpts.latest_checkpoint(t.out), t.out, anywhere
        )
    except TrainingDiverged as err:
        if t.accelerator.is_main_process:
            _append_log(t, {"step": pending.step, "epoch": pending.epoch, "diverged": err.problem})
        raise


def log_window(t: Trainer, state: LoopState, step_lr: float, bar) -> None:
    """One log row (global means over the window and the ranks) to the history, log.jsonl and stderr."""
    settle(t, state)  # the window's last step, read back
    accelerator = t.accelerator
    tokens = int(accelerator.reduce(torch.tensor(state.window_tokens, device=accelerator.device), "sum"))
    window, window_micro = merged_window(accelerator, state.window, state.window_micro)
    state.tokens_seen += tokens
    elapsed = max(time.perf_counter() - state.window_start, 1e-9)
    row = {"step": state.step, "epoch": state.epoch}
    row.update({k: round(v / window_micro, 5) for k, v in window.items() if k != "answer_tokens"})
    row.update(lr=step_lr, tokens=state.tokens_seen, tokens_per_s=round(tokens / elapsed, 1))
    row["collate_s"] = round(state.window_collate_s, 3)  # of the window's seconds: this rank's batch building
    if state.grad_norm is not None:  # only computed when clipping is on (max_grad_norm > 0)
        row["grad_norm"] = round(state.grad_norm, 5)
    if torch.cuda.is_available():
        row["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if t.procs > 1:  # every rank's peak, in global rank order
            peak = torch.tensor([row["max_mem_gb"]], device=accelerator.device)
            row["max_mem_gb_ranks"] = [round(x, 2) for x in accelerator.gather(peak).tolist()]
    state.history.append(row)
    if accelerator.is_main_process:
        _append_log(t, row)
        bar.write(  # a log line: stderr (tqdm.write defaults to stdout, which holds results)
            f"step {state.step}/{t.total_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
            f"tok/s {row['tokens_per_s']:.0f}",
            file=sys.stderr,
        )
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    state.reset_window()


def save_state(t: Trainer, state: LoopState, micro_batch: MicroBatch) -> None:
    """A checkpoint after this optimizer step, with the data position the next step starts at."""
    settle(t, state)  # a step is checked before any checkpoint holds it
    next_epoch, next_position = (
        (state.epoch + 1, 0) if micro_batch.end_of_epoch else (state.epoch, micro_batch.consumed)
    )
    # Tokens of the window not logged yet count too: a resumed run starts a fresh window, and
    # its first log line must carry on from the tokens trained on, not from the last log line.
    pending = int(t.accelerator.reduce(torch.tensor(state.window_tokens, device=t.accelerator.device), "sum"))
    saved = {
        "step": state.step,
        "epoch": next_epoch,
        "position": next_position,
        "tokens": state.tokens_seen + pending,
        "total_steps": t.total_steps,
        "processes": t.procs,
        "batches_per_step": t.procs * t.cfg.grad_accum,
    }
    ckpts.save_checkpoint(
        t.out,
        state.step,
        t.plain,
        t.accelerator,
        t.optimizer,
        t.scheduler,
        saved,
        keep=t.cfg.keep_checkpoints,
        wrapped=t.model,
    )


def run_epochs(t: Trainer, state: LoopState, resume_from: Path | None) -> None:
    """Optimizer steps from ``state`` on until ``t.total_steps`` or a stop (``state.interrupted``)."""
    from tqdm.auto import tqdm

    cfg = t.cfg
    bar = tqdm(
        total=t.total_steps,
        initial=state.step,
        desc=f"{cfg.stage}",
        unit="step",
        disable=not (cfg.progress and t.accelerator.is_main_process),
        dynamic_ncols=True,
    )
    state.reset_window()
    params = [p for group in t.optimizer.param_groups for p in group["params"]]
    t.model.train()
    while state.step < t.total_steps:
        micro_batches = rank_micro_batches(
            t.sampler.batches(state.epoch), state.position, t.procs, t.rank, cfg.grad_accum
        )
        if resume_from is not None:
            # After the iterator exists: the RNG stream continues exactly where it was saved.
            ckpts.load_rng(resume_from, t.rank)
            resume_from = None
        for step_batches in optimizer_steps(micro_batches):
            graphs = compiled_graphs()
            started = time.perf_counter()
            step_lr = train_step(t, state, step_batches, params)
            took = state.compile_watch.after_step(state, graphs, started)
            if took and t.accelerator.is_main_process:
                bar.write(
                    f"compiling: {took:.0f} s at step {state.step} "
                    f"(once per shape bucket; {state.compile_watch.graphs} graph(s) so far)",
                    file=sys.stderr,
                )
            micro_batch = step_batches[-1]
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == t.total_steps:
                log_window(t, state, step_lr, bar)
            stopping = t.hooks.stops_at(state.step) and state.step < t.total_steps
            stopping = stopping or (stop_requested(t.accelerator) and state.step < t.total_steps)  # SIGINT/SIGTERM
            if (cfg.save_every > 0 and state.step % cfg.save_every == 0) or stopping:
                save_state(t, state, micro_batch)
            if stopping:
                state.interrupted = True
                break
            if state.step >= t.total_steps:
                break
        if state.interrupted:
            break
        state.epoch += 1
        state.position = 0
    settle(t, state)  # the last step is checked before anything is exported
    bar.close()
    if state.compile_watch.graphs and t.accelerator.is_main_process:
        _append_log(t, {"step": state.step, **state.compile_watch.summary()})
