"""Multi-process training (issue 7): two CPU processes over gloo via ``accelerate launch``.

One real 2-process run of ``train.py --stage domain`` (tiny preset) is compared with a
single process taking the same global batches (``grad_accum 2``): disjoint shards that
together cover every example of each epoch, identical weights on both ranks, the same
losses and final weights as one process, writes by the main process only, and resume
across process counts (positions are stored in global batches). FSDP cannot run on CPU
(accelerate refuses FSDP without an accelerator device), so its run is a ``gpu`` test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plumbing.errors import InputError
from hooks import train_hooks
from training.config import TrainConfig, build_config, load_run_config
from training.run import resume_layout, run_training

ROOT = Path(__file__).resolve().parents[1]
DDP_CONFIG = ROOT / "configs" / "accelerate" / "ddp.yaml"
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml"
EXAMPLES = ROOT / "examples"

# What the 2-GPU run of issue 13 hit: token-budget batches (12 emrQA examples of 183-197
# tokens, 1000-token budget -> 3 global batches of 5, 2 and 5 rows, order shuffled per
# epoch), so the two ranks' shards differ in batches and examples, an odd batch count so
# each epoch ends in a short global step (rank 1 has no batch of its own there), and
# several epochs in one run. One optimizer step takes 2 global batches (2 processes x
# grad_accum 1, or 1 process x grad_accum 2): 2 steps per epoch, 3 epochs.
# No dropout: both layouts must compute the same thing, so a mismatch means a real bug.
COMMON = dict(
    stage="domain",
    preset="tiny",
    data=str(EXAMPLES / "emrqa_sample.jsonl"),
    batch_size=2,
    batch_tokens=1000,
    grad_accum=1,
    epochs=3,
    max_steps=0,
    joint=True,
    n_examples=0,
    max_length=512,
    lr=1e-3,
    head_lr=3e-3,
    warmup_ratio=0.0,
    schedule="constant",
    lora_dropout=0.0,
    head_dropout=0.0,
    gradient_checkpointing=False,
    progress=False,
    plot=False,
    log_every=1,
    seed=3,
)
N_EXAMPLES, GLOBAL_BATCHES, STEPS_PER_EPOCH, EPOCHS = 12, 3, 2, 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS

# Runs train.py's main in each launched process, recording every path this process
# creates, opens for writing, renames or deletes (Python audit events), and dumps the
# final adapter + head weights of this rank to ARCHEHR_TEST_OUT (outside the run folder).
WRAPPER = r"""
import json, os, sys
OUT = os.environ["ARCHEHR_TEST_OUT"]
RANK = int(os.environ.get("RANK", "0"))
written = []

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            written.append(os.fsdecode(path))
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        written.append(os.fsdecode(args[0]))
    elif event == "os.rename":
        written.extend([os.fsdecode(args[0]), os.fsdecode(args[1])])

sys.addaudithook(audit)
import torch
torch.set_num_threads(1)
import training.run as run_module
import train
original = run_module.run_training

def run_and_dump(cfg, resume=False):
    result = original(cfg, resume)
    if os.environ.get("ARCHEHR_TEST_DUMP") == "0":  # FSDP: live weights are shards
        return result
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    tensors = {"adapter/" + k: v.detach().cpu().contiguous()
               for k, v in get_peft_model_state_dict(result.backbone).items()}
    if result.head is not None:
        tensors.update({"head/" + k: v.detach().cpu().contiguous() for k, v in result.head.state_dict().items()})
    save_file(tensors, os.path.join(OUT, f"final-rank{RANK}.safetensors"))
    return result

run_module.run_training = run_and_dump
rc = train.main(sys.argv[1:])
with open(os.path.join(OUT, f"writes-rank{RANK}.json"), "w") as fh:
    json.dump(written, fh)
sys.exit(rc)
"""


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def launch(work: Path, nproc: int, args: list[str], config: Path = DDP_CONFIG, timeout: int = 300, dump: bool = True):
    """``accelerate launch`` of train.py (through the auditing wrapper) on ``nproc`` processes."""
    work.mkdir(parents=True, exist_ok=True)
    wrapper = work / "launch_train.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        ARCHEHR_TEST_OUT=str(work),
        ARCHEHR_TEST_DUMP="1" if dump else "0",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        str(wrapper),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_log(run: Path) -> list[dict]:
    """The step rows of a run's log (not the set-up rows each process writes first)."""
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "setup_steps_s" not in r]


def read_batches(folder: Path) -> list[dict]:
    rows = []
    for f in sorted(folder.glob("batches-rank*.jsonl")):
        rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return rows


def export_weights(export_dir: Path) -> dict[str, torch.Tensor]:
    out = {f"adapter/{k}": v for k, v in load_file(str(export_dir / "adapter_model.safetensors")).items()}
    out.update({f"head/{k}": v for k, v in load_file(str(export_dir / "head.safetensors")).items()})
    return out


def assert_close_weights(got: dict, expected: dict, moved_from: dict | None = None) -> None:
    """Equal up to float summation order; and the comparison is not vacuous: the weights moved
    by far more than the tolerance during training."""
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in got)
    assert worst < 2e-5, worst
    if moved_from is not None:
        moved = max(float((expected[k] - moved_from[k]).abs().max()) for k in moved_from)
        assert moved > 1e-3, moved


def lora_b_zero(weights: dict) -> dict:
    """LoRA B starts at zero: the distance from zero is how far training moved it."""
    return {k: torch.zeros_like(v) for k, v in weights.items() if "lora_B" in k}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process run (checkpoint every step) and one 1-process run on the same global batches."""
    root = tmp_path_factory.mktemp("dist")
    two = root / "two"
    with train_hooks(record_batches=root / "batches2"):
        launch(root / "launch2", 2, cli_args(dict(COMMON, out=two, save_every=1, keep_checkpoints=0)))
    with train_hooks(record_batches=root / "batches1"):
        one = run_training(build_config(dict(COMMON, out=str(root / "one"), grad_accum=2)))
    assert one.steps == TOTAL_STEPS and not one.interrupted
    return root


def test_ranks_train_disjoint_shards_covering_each_epoch(runs):
    rows = read_batches(runs / "batches2")
    assert {r["rank"] for r in rows} == {0, 1}
    for epoch in range(EPOCHS):
        by_rank = {
            rank: [i for r in rows if r["epoch"] == epoch and r["rank"] == rank for i in r["index"]] for rank in (0, 1)
        }
        assert not set(by_rank[0]) & set(by_rank[1])
        assert sorted(by_rank[0] + by_rank[1]) == list(range(N_EXAMPLES))  # each example once
        # Global batches 0 and 2 on rank 0, batch 1 on rank 1 (plus a filler it does not record).
        batches = [(r["rank"], r["step"]) for r in rows if r["epoch"] == epoch]
        assert sorted(batches) == [(0, 2 * epoch + 1), (0, 2 * epoch + 2), (1, 2 * epoch + 1)]
    # Each optimizer step of the 2-process run took exactly the examples that the
    # single process (grad_accum 2) took for the same step: the same global batches.
    single = read_batches(runs / "batches1")
    assert [r["step"] for r in single] == [s for e in range(EPOCHS) for s in (2 * e + 1, 2 * e + 1, 2 * e + 2)]
    sizes = set()
    for step in range(1, TOTAL_STEPS + 1):
        two = sorted(i for r in rows if r["step"] == step for i in r["index"])
        one = sorted(i for r in single if r["step"] == step for i in r["index"])
        assert two == one and two, step
        sizes.add(len(two))
    assert len(sizes) > 1  # uneven steps: the short last step of each epoch is in there
    # And the epochs were not the same order (the seed + epoch shuffle still applies).
    assert [r["index"] for r in rows if r["epoch"] == 0] != [r["index"] for r in rows if r["epoch"] == 1]


def test_two_processes_match_one_process_on_the_same_global_batch(runs):
    rank0 = load_file(str(runs / "launch2" / "final-rank0.safetensors"))
    rank1 = load_file(str(runs / "launch2" / "final-rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and any("lora_B" in k for k in rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks ended with different weights"

    two, one = export_weights(runs / "two" / "export"), export_weights(runs / "one" / "export")
    assert all(torch.equal(two[k], rank0[k]) for k in two)  # the export is rank 0's live weights
    assert_close_weights(two, one, moved_from=lora_b_zero(one))

    log_two, log_one = read_log(runs / "two"), read_log(runs / "one")
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one] == list(range(1, TOTAL_STEPS + 1))
    assert [r["epoch"] for r in log_two] == [s // STEPS_PER_EPOCH for s in range(TOTAL_STEPS)]
    for a, b in zip(log_two, log_one):
        # Logged losses are averaged over the ranks, so they equal the single process's mean.
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["lm"] - b["lm"]) < 1e-4, (a, b)
        assert a["tokens"] == b["tokens"]  # tokens summed over ranks
    assert log_two[0]["loss"] > log_two[-1]["loss"]


def test_only_the_main_process_writes(runs):
    run = str(runs / "two")
    writes = {
        rank: [
            p
            for p in json.loads((runs / "launch2" / f"writes-rank{rank}.json").read_text())
            if os.path.abspath(p).startswith(run)
        ]
        for rank in (0, 1)
    }
    names0 = {Path(p).name for p in writes[0]}
    # (torch.save and safetensors write from C++/Rust, unseen by audit hooks; every
    # checkpoint and export still shows up through its folder, JSON files and rename.)
    assert {"log.jsonl", "config.json", "trainer_state.json", "rng-0.json", "manifest.json", "export"} <= names0
    # Rank 1 writes only its own RNG state into each checkpoint, nothing else.
    assert writes[1], "the audit hook saw nothing on rank 1"
    stray = [p for p in writes[1] if not re.fullmatch(r"rng-1\.(json|pt)", Path(p).name)]
    assert not stray, stray[:5]
    ckpt = runs / "two" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [f"step-{i}" for i in range(1, TOTAL_STEPS + 1)]
    assert not list(runs.glob("two/**/*.partial"))


def copy_run_at(src: Path, run: Path, step: int) -> Path:
    """A run folder holding ``src``'s config, log and its checkpoint ``step-N`` only."""
    run.mkdir()
    for name in ("config.json", "config.toml", "log.jsonl"):
        shutil.copy(src / name, run / name)
    shutil.copytree(src / "checkpoints" / f"step-{step}", run / "checkpoints" / f"step-{step}")
    return run


def test_resume_two_process_checkpoint_on_one_process(runs, tmp_path):
    """Stopped after step 3 of 6 on two processes (epoch 1, 2 of its 3 global batches done),
    finished on one: the short last step of epoch 1, then all of epoch 2."""
    src = runs / "two"
    state = json.loads((src / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["position"]) == (3, 1, 2)
    assert (state["processes"], state["batches_per_step"]) == (2, 2)

    run = copy_run_at(src, tmp_path / "resumed", 3)
    cfg = build_config({"out": str(run)}, base=load_run_config(run))
    assert cfg.grad_accum == 1
    with train_hooks(record_batches=tmp_path / "batches"):
        result = run_training(cfg, resume=True)
    assert result.steps == TOTAL_STEPS and not result.interrupted

    # Position mapping: the single process (grad_accum 2) trained on exactly what the two
    # ranks together took in steps 4-6.
    two_rows = read_batches(runs / "batches2")
    resumed_rows = read_batches(tmp_path / "batches")
    assert {r["rank"] for r in resumed_rows} == {0}
    assert [(r["epoch"], r["step"]) for r in resumed_rows] == [(1, 4), (2, 5), (2, 5), (2, 6)]
    for step in (4, 5, 6):
        expected = sorted(i for r in two_rows if r["step"] == step for i in r["index"])
        got = sorted(i for r in resumed_rows if r["step"] == step for i in r["index"])
        assert got == expected and got

    log = read_log(run)
    assert [r["step"] for r in log] == list(range(1, TOTAL_STEPS + 1))
    for a, b in zip(log[3:], read_log(src)[3:]):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    mid = load_file(str(src / "checkpoints" / "step-3" / "adapter" / "adapter_model.safetensors"))
    assert_close_weights(
        export_weights(run / "export"),
        export_weights(src / "export"),
        moved_from={f"adapter/{k}": v for k, v in mid.items()},
    )


@pytest.mark.slow
def test_resume_two_process_checkpoint_on_two_processes(runs, tmp_path):
    run = copy_run_at(runs / "two", tmp_path / "resumed", 3)
    with train_hooks(record_batches=tmp_path / "batches"):
        launch(tmp_path / "launch", 2, ["--resume", str(run)])
    assert [r["step"] for r in read_log(run)] == list(range(1, TOTAL_STEPS + 1))
    assert {r["step"] for r in read_batches(tmp_path / "batches")} == {4, 5, 6}
    assert_close_weights(export_weights(run / "export"), export_weights(runs / "two" / "export"))


@pytest.mark.slow
def test_resume_one_process_checkpoint_on_two_processes(runs, tmp_path):
    """The reverse: stop a grad_accum-2 single process after step 3, finish on two processes."""
    run = tmp_path / "part"
    with train_hooks(stop_after_steps=3):
        part = run_training(build_config(dict(COMMON, out=str(run), grad_accum=2)))
    assert part.interrupted and part.steps == 3
    launch(tmp_path / "launch", 2, ["--resume", str(run)])
    assert [r["step"] for r in read_log(run)] == list(range(1, TOTAL_STEPS + 1))
    assert_close_weights(export_weights(run / "export"), export_weights(runs / "one" / "export"))


@pytest.mark.parametrize("processes,grad_accum", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 2), (4, 1)])
@pytest.mark.parametrize("n_batches", [1, 2, 5, 7, 12])
@pytest.mark.parametrize("start_steps", [0, 1])
def test_rank_micro_batches_keep_ranks_in_step(processes, grad_accum, n_batches, start_steps):
    """Every rank runs the same micro-steps with the same step boundaries; together the real
    ones take each global batch exactly once, in the window of the step a single process
    with grad_accum P * G takes it in; fillers weigh 0."""
    from training.batching import rank_micro_batches, steps_in_epoch

    window = processes * grad_accum
    start = min(start_steps * window, n_batches)
    global_batches = [[10 * b, 10 * b + 1] for b in range(n_batches)]
    per_rank = [list(rank_micro_batches(global_batches, start, processes, r, grad_accum)) for r in range(processes)]
    assert len({len(p) for p in per_rank}) == 1
    layout = [[(m.last_of_step, m.consumed, m.end_of_epoch) for m in p] for p in per_rank]
    assert all(x == layout[0] for x in layout)
    assert sum(m.last_of_step for m in per_rank[0]) == steps_in_epoch(n_batches, start, processes, grad_accum)
    single = list(rank_micro_batches(global_batches, start, 1, 0, window))
    step_of = lambda micro: [sum(m.last_of_step for m in micro[:i]) for i in range(len(micro))]  # noqa: E731
    taken = sorted((s, tuple(m.indices)) for p in per_rank for m, s in zip(p, step_of(p)) if m.weight == 1.0)
    assert taken == sorted((s, tuple(m.indices)) for m, s in zip(single, step_of(single)))
    assert [b for _, b in sorted(taken, key=lambda t: t[1])] == [tuple(b) for b in global_batches[start:]]
    assert all(m.weight in (0.0, 1.0) and m.indices for p in per_rank for m in p)
    if per_rank[0]:
        assert per_rank[0][-1].last_of_step and per_rank[0][-1].end_of_epoch
        assert per_rank[0][-1].consumed == n_batches


def test_accelerate_batch_sharding_breaks_token_budget_batches():
    """Why training.batching.rank_micro_batches exists (issue 13): accelerate's BatchSamplerShard, handed our
    token-budget sampler, yields one oversized batch per rank per epoch, or an empty one."""
    from accelerate.data_loader import BatchSamplerShard

    from training.batching import TokenBudgetBatches

    lengths = [150 + (i * 37) % 1850 for i in range(280)]
    sampler = TokenBudgetBatches(lengths, 16384, seed=0)
    assert sampler.num_batches() > 10

    class AsBatchSampler:  # the sampler as a torch batch sampler (what accelerate would be handed)
        batch_size = sampler.batch_size

        def __iter__(self):
            return iter(sampler.batches(0))

        def __len__(self) -> int:
            return sampler.num_batches()

    shards = [list(BatchSamplerShard(AsBatchSampler(), 2, r, split_batches=False, even_batches=True)) for r in (0, 1)]
    assert max(len(s) for s in shards) <= 1 or any(len(b) == 0 for s in shards for b in s)


def test_resume_layout_keeps_global_batches_per_step():
    cfg = TrainConfig(grad_accum=1)
    assert resume_layout({"batches_per_step": 4}, cfg, 2).grad_accum == 2
    assert resume_layout({"batches_per_step": 4}, cfg, 4).grad_accum == 1
    assert resume_layout({}, cfg, 3) is cfg  # a checkpoint from before this field: unchanged
    with pytest.raises(InputError, match="cannot split evenly"):
        resume_layout({"batches_per_step": 3}, cfg, 2)


# --- FSDP configuration -----------------------------------------------------------------


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(DDP_CONFIG))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_processes == 2
    fsdp = load_config_from_file(str(FSDP_CONFIG))
    assert fsdp.distributed_type == DistributedType.FSDP
    c = fsdp.fsdp_config
    assert c["fsdp_use_orig_params"] is True
    assert c["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # accelerate wraps modules by class name: the name must be the backbone's decoder layer.
    from model.backbone import build_random_base

    layer_names = {type(m).__name__ for m in build_random_base("tiny").model.layers}
    assert layer_names == {c["fsdp_transformer_layer_cls_to_wrap"]}
    # The keys are ones accelerate's FSDP plugin knows (fsdp_x -> plugin field x).
    from dataclasses import fields

    from accelerate.utils import FullyShardedDataParallelPlugin

    known = {f.name for f in fields(FullyShardedDataParallelPlugin)} | {
        "transformer_layer_cls_to_wrap",
        "offload_params",
    }
    unknown = [k for k in c if k not in known and k.removeprefix("fsdp_") not in known]
    assert not unknown, unknown


def test_nf4_quant_storage_option():
    from model.backbone import nf4_config

    assert nf4_config().bnb_4bit_quant_storage == torch.uint8  # default unchanged
    bf16 = nf4_config("bfloat16")
    assert bf16.bnb_4bit_quant_storage == torch.bfloat16
    assert bf16.bnb_4bit_compute_dtype == torch.bfloat16 and bf16.bnb_4bit_quant_type == "nf4"
    assert bf16.bnb_4bit_use_double_quant and bf16.load_in_4bit
    with pytest.raises(ValueError):
        nf4_config("int4")
    with pytest.raises(InputError, match="quant_storage"):
        TrainConfig(quant_storage="int4").validate()


def test_bf16_stored_nf4_computes_what_uint8_stored_does():
    """The packed 4-bit bytes are only reinterpreted: same loss, and the weights are now bf16
    tensors (what FSDP needs to flatten them with the layer's other weights)."""
    import bitsandbytes as bnb

    from model.backbone import load_backbone

    x = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    losses = {}
    for storage in ("uint8", "bfloat16"):
        model = load_backbone(
            "tiny", load_in_4bit=True, device="cpu", quant_storage=storage, gradient_checkpointing=False
        )
        dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert dtypes == {getattr(torch, storage)}
        with torch.no_grad():
            losses[storage] = float(model(input_ids=x, labels=x).loss)
    assert losses["uint8"] == losses["bfloat16"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA devices")
def test_fsdp_qlora_two_gpus(tmp_path):
    """QLoRA (NF4 stored as bf16) under FSDP on 2 GPUs: trains, checkpoints and exports with every
    rank gathering (full tensors, not rank 0's slice), plain PEFT loads the export, and the
    step-2 checkpoint resumed on 2 processes ends with the uninterrupted run's weights."""
    from peft import PeftModel, get_peft_model_state_dict

    from model.backbone import build_random_base

    from model.backbone import random_base_cache_dir, save_random_base

    save_random_base("tiny", random_base_cache_dir("tiny"))  # once, before two ranks would both build it
    run = tmp_path / "fsdp"
    args = cli_args(
        dict(
            COMMON,
            out=run,
            load_in_4bit="true",
            quant_storage="bfloat16",
            max_steps=4,
            save_every=2,
            keep_checkpoints=0,
        )
    )
    launch(tmp_path / "launch", 2, args, config=FSDP_CONFIG, timeout=600, dump=False)
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and 0 < r["loss"] < 100 for r in log), log  # finite, not 0 (#3983)
    exported = export_weights(run / "export")
    assert any(float(v.abs().max()) > 0 for k, v in exported.items() if "lora_B" in k)

    # Plain PEFT on an unsharded base: every tensor has its full shape and the file's values.
    plain = PeftModel.from_pretrained(build_random_base("tiny"), str(run / "export"))
    loaded = get_peft_model_state_dict(plain)
    adapter = {k.removeprefix("adapter/"): v for k, v in exported.items() if k.startswith("adapter/")}
    assert loaded.keys() == adapter.keys()
    assert all(torch.equal(loaded[k].float(), adapter[k].float()) for k in adapter)
    assert (run / "checkpoints" / "step-2" / "optimizer-rank-1.pt").is_file()

    resumed = copy_run_at(run, tmp_path / "resumed", 2)
    launch(tmp_path / "launch-resume", 2, ["--resume", str(resumed)], config=FSDP_CONFIG, timeout=600, dump=False)
    assert [r["step"] for r in read_log(resumed)] == [1, 2, 3, 4]
    # Same GPUs, same sharding, same reduction order: equal up to bf16-autocast noise.
    again = export_weights(resumed / "export")
    worst = max(float((again[k].float() - exported[k].float()).abs().max()) for k in exported)
    assert again.keys() == exported.keys() and worst < 1e-4, worst


FSDP_GATHER = r"""
import json, sys
import torch, torch.distributed as dist
from types import SimpleNamespace
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
OUT, DATA = sys.argv[1], sys.argv[2]
from accelerate.utils import DistributedType
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from heads.alignment import NotePairHead, save_head
from heads.config import HeadConfig
from model.backbone import LoraSettings, build_random_base, load_backbone, load_tokenizer
from training import gather
from training.config import build_config
from training.batching import collate
from training.joint import JointModel, LossSettings
from training.run import fsdp_wrap_policy, make_optimizer, stage_data

cfg = build_config(dict(stage="domain", preset="tiny", data=DATA, joint=True, max_length=512, n_examples=0,
                        lora_dropout=0.0, head_dropout=0.0, lr=1e-2, head_lr=1e-2))
tok = load_tokenizer("tiny")
items, _ = stage_data(cfg, tok)
batch = collate(items[:4], tok.pad_token_id)

def build():
    torch.manual_seed(0)
    bb = load_backbone("tiny", load_in_4bit=False, device="cpu", gradient_checkpointing=False,
                       lora=LoraSettings(r=8, alpha=16, dropout=0.0))
    head = NotePairHead(HeadConfig(hidden_size=bb.get_base_model().config.hidden_size))
    return JointModel(bb, head, LossSettings())

def train_step(model, forward):
    opt = make_optimizer(model, cfg)
    forward(batch)["loss"].backward()
    opt.step()

# The reference: one process, no sharding, the same batch and step.
ref = build()
train_step(ref, ref)
expected_lora, expected_head = gather.trainable_state(ref.backbone, ref.head)

# Two ranks, both on the same batch (so the averaged gradient equals the reference's).
model = build()
wrapped = FSDP(model, auto_wrap_policy=fsdp_wrap_policy(model), use_orig_params=True, device_id=torch.device("cpu"))
train_step(model, wrapped)
acc = SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=rank == 0, process_index=rank,
                      num_processes=2, is_fsdp2=False)
local = {gather.clean_name(n): tuple(p.shape) for n, p in model.backbone.named_parameters() if "lora_" in n}

def diff(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:3]
    return max(float((a[k] - b[k]).abs().max()) for k in a)

result = {}
with gather.full_parameters(acc, wrapped):
    if rank == 0:
        lora, head_state = gather.trainable_state(model.backbone, model.head)
        result["gathered_lora"] = diff(lora, expected_lora)
        result["gathered_head"] = diff(head_state, expected_head)
        gather.save_adapter(model.backbone, OUT + "/adapter", lora)
        save_head(gather.head_from_state(model.head, head_state), OUT + "/head")
dist.barrier()
# Back in: wipe every LoRA and head weight, then restore from the files on every rank.
with gather.full_parameters(acc, wrapped, writeback=True):
    with torch.no_grad():
        for n, p in [*model.backbone.named_parameters(), *model.head.named_parameters()]:
            if "lora_" in n or p.requires_grad:
                p.zero_()
    gather.load_trainable_state(model.backbone, model.head, load_file(OUT + "/adapter/adapter_model.safetensors"),
                                load_file(OUT + "/head/head.safetensors"))
with gather.full_parameters(acc, wrapped):
    if rank == 0:
        lora, head_state = gather.trainable_state(model.backbone, model.head)
        result["reloaded_lora"] = diff(lora, expected_lora)
        result["reloaded_head"] = diff(head_state, expected_head)
if rank == 0:
    # Plain PEFT reads the export: the same weights as the unsharded reference.
    plain = PeftModel.from_pretrained(build_random_base("tiny"), OUT + "/adapter")
    result["plain_peft"] = diff(get_peft_model_state_dict(plain), get_peft_model_state_dict(ref.backbone))
    result["moved"] = max(float(v.abs().max()) for k, v in expected_lora.items() if "lora_B" in k)
    result["sharded"] = all(local[k] != tuple(v.shape) for k, v in expected_lora.items())
    json.dump(result, open(OUT + "/result.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp_gather_checkpoint_and_export_on_cpu(tmp_path):
    """FSDP1 over gloo (torch directly: accelerate refuses FSDP without an accelerator): after
    a sharded training step, every rank gathers, the main process saves a full adapter and head
    equal to an unsharded process's (not rank 0's slice), plain PEFT loads it, and writing it
    back into the shards (resume) restores the same weights."""
    script = tmp_path / "fsdp_gather.py"
    script.write_text(FSDP_GATHER, encoding="utf-8")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
        str(tmp_path),
        str(EXAMPLES / "emrqa_sample.jsonl"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["sharded"], "the LoRA parameters were not sharded: the test would prove nothing"
    assert result["moved"] > 1e-3
    for key in ("gathered_lora", "gathered_head", "reloaded_lora", "reloaded_head", "plain_peft"):
        assert result[key] < 1e-5, (key, result)


def test_fsdp_wrap_policy_gives_each_dtype_its_own_unit():
    """What train.py hands FSDP: decoder layers, every trainable (LoRA) leaf and the head are
    units; the frozen base projections, embeddings and norms stay inside their parents."""
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.backbone import decoder, load_backbone
    from training.joint import JointModel, LossSettings
    from training.run import fsdp_wrap_policy

    backbone = load_backbone("tiny", load_in_4bit=False, device="cpu", gradient_checkpointing=False)
    head = NotePairHead(HeadConfig(hidden_size=backbone.get_base_model().config.hidden_size))
    model = JointModel(backbone, head, LossSettings())
    policy = fsdp_wrap_policy(model)
    wrapped = {name for name, m in model.named_modules() if policy(m, recurse=False, nonwrapped_numel=0)}
    assert all(policy(m, recurse=True, nonwrapped_numel=0) for m in model.modules())
    n_layers = len(decoder(backbone).layers)
    assert "head" in wrapped
    assert sum(1 for n in wrapped if re.search(r"layers\.\d+$", n)) == n_layers
    lora = {n for n in wrapped if "lora_" in n}
    assert len(lora) == 2 * 7 * n_layers  # A and B of q,k,v,o,gate,up,down in every layer
    trainable = {n.rsplit(".", 1)[0] for n, p in backbone.named_parameters() if p.requires_grad}
    assert {n.removeprefix("backbone.") for n in lora} == trainable
    assert wrapped == lora | {"head"} | {n for n in wrapped if re.search(r"layers\.\d+$", n)}
    # Every unit's own parameters (those not inside a nested unit) share one dtype.
    for name in wrapped:
        module = model.get_submodule(name)
        nested = [m for n, m in module.named_modules() if n and f"{name}.{n}" in wrapped]
        inner = {id(p) for m in nested for p in m.parameters()}
        dtypes = {p.dtype for p in module.parameters() if id(p) not in inner}
        assert len(dtypes) <= 1, (name, dtypes)
