"""Past one machine (issue 25): the tiny task stage as two "machines" on localhost, i.e. two
``torchrun --nnodes 2 --node_rank R`` groups of one process each, rendezvous and gloo on
127.0.0.1 only, stopped after a checkpoint and resumed on one process: the weights equal an
uninterrupted single-process run on the same global batches, and only the global main
process wrote (each node's local rank 0 is not a writer)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hooks import train_hooks
from test_distributed import WRAPPER, assert_close_weights, cli_args, export_weights, free_port, read_log
from training.config import build_config, load_run_config
from training.run import run_training

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# 3 annotated cases, one per global batch: 2 processes x grad_accum 1 = 2 global batches per
# optimizer step, so 2 steps an epoch (the second one short), 2 epochs. No dropout: the layouts
# must compute the same thing.
TASK = dict(
    stage="task",
    joint=True,
    preset="tiny",
    xml=str(EXAMPLES / "archehr-qa.xml"),
    key=str(EXAMPLES / "archehr-qa_key.json"),
    batch_size=1,
    batch_tokens=0,  # one case a batch (task.toml's token budget would put all three in two)
    grad_accum=1,
    epochs=2,
    max_length=2048,
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
    seed=5,
)
TOTAL_STEPS, STOP_AT = 4, 2

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def launch_two_nodes(work: Path, args: list[str], timeout: int = 600) -> None:
    """Two torchrun "machines" (one process each) started side by side on 127.0.0.1."""
    work.mkdir(parents=True, exist_ok=True)
    wrapper = work / "launch_train.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    port = free_port()
    procs = []
    for node in (0, 1):
        out = work / f"node{node}"
        out.mkdir()
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            ARCHEHR_TEST_OUT=str(out),
            GLOO_SOCKET_IFNAME="lo",  # gloo's traffic on the loopback interface only
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(wrapper),
            *args,
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, text in zip(procs, outputs):
        assert proc.returncode == 0, text[-5000:]


def test_two_localhost_machines_then_one_process_reach_the_uninterrupted_weights(tmp_path):
    run = tmp_path / "run"
    with train_hooks(stop_after_steps=STOP_AT):
        launch_two_nodes(tmp_path / "launch", cli_args(dict(TASK, out=run)))
    state = json.loads((run / "checkpoints" / f"step-{STOP_AT}" / "trainer_state.json").read_text())
    assert (state["step"], state["processes"], state["batches_per_step"]) == (STOP_AT, 2, 2)
    assert not (run / "export").exists()
    # Node 1's process (global rank 1, local rank 0 on its "machine") wrote its RNG state only.
    writes = [
        p
        for p in json.loads((tmp_path / "launch" / "node1" / "writes-rank1.json").read_text())
        if os.path.abspath(p).startswith(str(run))
    ]
    assert writes, "the audit hook saw nothing on rank 1"
    stray = [p for p in writes if not re.fullmatch(r"rng-1\.(json|pt)", Path(p).name)]
    assert not stray, stray[:5]

    cfg = build_config({"out": str(run)}, base=load_run_config(run))
    resumed = run_training(cfg, resume=True)  # one process: grad_accum becomes 2
    assert resumed.steps == TOTAL_STEPS and not resumed.interrupted

    reference = run_training(build_config(dict(TASK, out=str(tmp_path / "one"), grad_accum=2)))
    assert reference.steps == TOTAL_STEPS
    got, want = read_log(run), read_log(tmp_path / "one")
    assert [r["step"] for r in got] == list(range(1, TOTAL_STEPS + 1))
    for a, b in zip(got, want):  # the two machines' steps and the resumed ones: the same losses
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    start = {k: torch.zeros_like(v) for k, v in export_weights(tmp_path / "one" / "export").items() if "lora_B" in k}
    assert_close_weights(export_weights(run / "export"), export_weights(tmp_path / "one" / "export"), moved_from=start)
