"""Multi-GPU acceptance run (issue 13): DDP scaling, resume across process counts, FSDP.

    python -m bench.multigpu --out $OUT

1. ``resume``: the tiny preset with token-budget batches over several epochs on 2
   processes (checkpoint every step) is the uninterrupted reference; its step-3
   checkpoint is finished on 1 process and on 2 processes; the max abs difference of
   every exported adapter/head weight against the reference is reported (and how far
   training moved the weights, so a small difference means something).
2. ``fsdp``: ``pytest -m gpu tests/test_distributed.py -k fsdp`` (QLoRA under FSDP on
   2 GPUs: train, checkpoint, gathered export, resume).
3. ``scaling``: ``bench.scaling`` on the Qwen3-4B shape, 1 GPU vs 2-GPU DDP, compile on;
   tokens/s is the median of the steps after ``--skip`` (compile time excluded).

Each part writes ``OUT/multigpu.json`` as it finishes (a time-out keeps what is done);
every launched rank's stderr lands in ``OUT/logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plumbing.atomic import check_out_folder  # noqa: E402
from plumbing.errors import CliParser, exit_on_input_error  # noqa: E402
from bench.scaling import NCCL_ENV, collect_rank_logs, launch_prefix, read_rows, run_with_timeout  # noqa: E402
from plumbing.ranges import integer, number  # noqa: E402

TINY = [
    "--stage",
    "domain",
    "--preset",
    "tiny",
    "--data",
    str(ROOT / "examples" / "emrqa_sample.jsonl"),
    "--batch_tokens",
    "1000",
    "--max_length",
    "512",
    "--epochs",
    "3",
    "--joint",
    "true",
    "--lr",
    "1e-3",
    "--head_lr",
    "3e-3",
    "--warmup_ratio",
    "0",
    "--schedule",
    "constant",
    "--lora_dropout",
    "0",
    "--head_dropout",
    "0",
    "--log_every",
    "1",
    "--progress",
    "false",
    "--plot",
    "false",
    "--seed",
    "3",
    "--compile",
    "false",
]


def run_train(n: int, args: list[str], logs: Path, tag: str, env: dict) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix=f"launch-{tag}-"))
    cmd = launch_prefix(n, "configs/accelerate/ddp.yaml", log_dir) + ["train.py", *args]
    print("+", " ".join(cmd), flush=True)
    with (logs / f"{tag}.out.log").open("w") as fh:
        rc = run_with_timeout(cmd, 180, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    collect_rank_logs(log_dir, logs, tag)
    return rc


def export_weights(export_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {f"adapter/{k}": v for k, v in load_file(str(export_dir / "adapter_model.safetensors")).items()}
    head = export_dir / "head.safetensors"
    if head.is_file():
        out.update({f"head/{k}": v for k, v in load_file(str(head)).items()})
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def resume_check(work: Path, logs: Path, env: dict) -> dict:
    ref = work / "resume-ref"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result: dict = {
        "reference_rc": run_train(
            2, [*TINY, "--out", str(ref), "--save_every", "1", "--keep_checkpoints", "0"], logs, "resume-ref", env
        )
    }
    if result["reference_rc"] != 0:
        return result
    reference = export_weights(ref / "export")
    from safetensors.torch import load_file

    mid = {
        f"adapter/{k}": v
        for k, v in load_file(str(ref / "checkpoints" / "step-3" / "adapter" / "adapter_model.safetensors")).items()
    }
    result["moved_since_checkpoint"] = max(
        float((reference[k].float() - v.float()).abs().max()) for k, v in mid.items()
    )
    for n in (1, 2):
        run = work / f"resume-2to{n}"
        run.mkdir()
        for name in ("config.json", "config.toml", "log.jsonl"):
            if (ref / name).is_file():
                shutil.copy(ref / name, run / name)
        shutil.copytree(ref / "checkpoints" / "step-3", run / "checkpoints" / "step-3")
        rc = run_train(n, ["--resume", str(run), "--save_every", "0"], logs, f"resume-2to{n}", env)
        entry = {"rc": rc}
        if rc == 0:
            entry["steps"] = [r["step"] for r in read_rows(run / "log.jsonl")]
            entry["max_abs_diff"] = max_abs_diff(export_weights(run / "export"), reference)
        result[f"2to{n}"] = entry
    return result


def fsdp_check(logs: Path, env: dict, timeout: float) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "-rA",
        "tests/test_distributed.py",
        "-k",
        "fsdp",
    ]
    print("+", " ".join(cmd), flush=True)
    log = logs / "fsdp-pytest.log"
    with log.open("w") as fh:
        rc = run_with_timeout(cmd, timeout, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    lines = log.read_text().strip().splitlines()
    return {"rc": rc, "summary": "timed out" if rc == 124 else (lines or [""])[-1]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--work", default="/tmp/multigpu")
    p.add_argument("--parts", nargs="+", default=["scaling", "resume", "fsdp"])
    p.add_argument(
        "--budget_s",
        default=510,
        **number(0, 86_400, lo_open=True).option("a part that cannot start in time is skipped"),
    )
    p.add_argument("--steps", default=20, **integer(1, 10**6).option("scaling: optimizer steps per run"))
    p.add_argument("--skip", default=8, **integer(0, 10**6).option("scaling: first steps dropped (compile, warm-up)"))
    p.add_argument("--records", default=1200, **integer(1, 10**7).option())
    return p.parse_args(argv)


def save_report(report: dict, out: Path) -> None:
    (out / "multigpu.json").write_text(json.dumps(report, indent=2) + "\n")


def environment() -> dict:
    """The GPUs and library versions, or why they are unavailable."""
    report: dict = {}
    try:
        import torch

        report["device"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["versions"] = {"torch": torch.__version__}
        for mod in ("accelerate", "transformers", "peft", "bitsandbytes"):
            try:
                report["versions"][mod] = __import__(mod).__version__
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                report["versions"][mod] = f"unavailable: {exc}"
    except Exception as exc:  # noqa: BLE001
        report["device"] = f"unavailable: {exc}"
    return report


def scaling_check(args: argparse.Namespace, out: Path, left: float) -> dict:
    """``bench.scaling`` 1 GPU vs 2; its JSON result."""
    from bench import scaling

    before = set(out.glob("scaling-*.json"))
    # Two runs; leave ~3 min of the budget to the other parts when they follow.
    others = 170 if len(args.parts) > 1 else 0
    scaling.main(
        [
            "--gpus",
            "1",
            "2",
            "--steps",
            str(args.steps),
            "--skip",
            str(args.skip),
            "--records",
            str(args.records),
            "--work",
            str(Path(args.work) / "scaling"),
            "--out",
            str(out),
            "--timeout_s",
            str(max(60.0, (left - others - 60) / 2)),
        ]
    )
    new = sorted(set(out.glob("scaling-*.json")) - before)
    return json.loads(new[-1].read_text()) if new else {"error": "no result"}


def run_part(part: str, args: argparse.Namespace, out: Path, env: dict, left: float) -> dict | None:
    """One part's result, given the seconds ``left`` of the budget (None for an unknown part)."""
    logs = out / "logs"
    if part == "resume":
        return resume_check(Path(args.work) / "resume", logs, env)
    if part == "fsdp":
        return fsdp_check(logs, env, timeout=left - 10)
    if part == "scaling":
        return scaling_check(args, out, left)
    return None


@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_out_folder(Path(args.out))  # before any work

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **NCCL_ENV, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    report = environment()
    save_report(report, out)
    began = time.perf_counter()
    for part in args.parts:
        start = time.perf_counter()
        left = args.budget_s - (start - began)
        if left < 60:
            report[part] = {"error": f"not run: {left:.0f} s of the {args.budget_s:.0f} s budget left"}
            save_report(report, out)
            continue
        result = run_part(part, args, out, env, left)
        if result is not None:
            report[part] = result
        report.setdefault("wall_s", {})[part] = round(time.perf_counter() - start, 1)
        save_report(report, out)
        print(json.dumps({part: report.get(part)}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
