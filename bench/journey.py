"""The whole user journey on one GPU under a memory cap, stage by stage.

    python -m bench.journey --out bench/results                    # Qwen3-4B shape, 16 GB cap
    python -m bench.journey --preset tiny --tiny --out /tmp/j       # CPU check of the script

Stages, each in its own process (as a user runs them) with the cap set as the process's
CUDA memory fraction: ``train.py`` domain stage on synthetic emrQA-length records
(16k-token batches), ``train.py`` task stage ``--joint`` on synthetic ArchEHR-QA cases
(export timed apart), ``infer.py --export`` on held-out synthetic cases with
``--max-memory-gb``. Reports wall time, tokens/s and peak memory of each stage as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from plumbing.ranges import DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS, integer, number

from plumbing.atomic import check_out_folder
from plumbing.errors import CliParser, exit_on_input_error

ROOT = Path(__file__).resolve().parents[1]


# --- one stage, in a child process ------------------------------------------------------------


def run_child(spec: dict) -> int:
    """Run one CLI (train.py or infer.py) in this process under the cap; write its stats."""
    import torch

    cuda = torch.cuda.is_available() and spec.get("device", "cuda") == "cuda"
    if cuda and spec.get("cap_gb"):
        from inference.memory import apply_memory_cap

        apply_memory_cap(spec["cap_gb"], "cuda")
    extra: dict = {}
    import training.export as export_module

    original_export = export_module.export_run

    def timed_export(*args, **kwargs):  # the export step of train.py, timed on its own and by step
        t = time.perf_counter()
        kwargs["timings"] = extra.setdefault("export_steps_s", {})
        try:
            return original_export(*args, **kwargs)
        finally:
            extra["export_s"] = round(time.perf_counter() - t, 2)

    export_module.export_run = timed_export
    t0 = time.perf_counter()
    if spec["cli"] == "train":
        import train

        rc = train.main(spec["argv"])
    else:
        import infer

        rc = infer.main(spec["argv"])
    wall = time.perf_counter() - t0
    stats = {"rc": rc or 0, "wall_s": round(wall, 2), **extra}
    if cuda:
        stats.update(
            peak_allocated_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
            peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 2),
            # the allocator freeing its cache and trying again under the cap: a suspect for a slow stage
            alloc_retries=int(torch.cuda.memory_stats().get("num_alloc_retries", 0)),
        )
    Path(spec["stats"]).write_text(json.dumps(stats), encoding="utf-8")
    return int(rc or 0)


def stage(name: str, cli: str, argv: list[str], work: Path, cap_gb: float | None, device: str) -> dict:
    stats_path = work / f"{name}.stats.json"
    spec = {"cli": cli, "argv": argv, "cap_gb": cap_gb, "stats": str(stats_path), "device": device}
    print(f"+ [{name}] {cli}.py {' '.join(argv)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.journey", "--child", json.dumps(spec)], cwd=ROOT)
    row = {"stage": name, "process_wall_s": round(time.perf_counter() - t0, 2)}
    if stats_path.is_file():
        row.update(json.loads(stats_path.read_text(encoding="utf-8")))
    if proc.returncode != 0:
        row["error"] = f"exit {proc.returncode}"
    return row


def tokens_per_s_after(rows: list[dict], skip: int) -> float | None:
    """All tokens of the logged windows after ``skip`` steps over all their seconds. A short stage
    logs few windows of unequal size (the task stage: 3), and their median swung 77-89% of the
    domain stage's rate between two runs of the same data; this weighs each window by its time."""
    tokens = seconds = 0.0
    before = 0
    for r in rows:
        window = r["tokens"] - before
        before = r["tokens"]
        if r.get("step", 0) > skip and r["tokens_per_s"] > 0:
            tokens += window
            seconds += window / r["tokens_per_s"]
    return round(tokens / seconds, 1) if seconds else None


def train_rates(run_dir: Path, skip: int) -> dict:
    """Steady tokens/s (median of logged windows after ``skip`` steps) and tokens seen."""
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return {}
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    setup = next((r["setup_steps_s"] for r in rows if "setup_steps_s" in r), None)
    compiled = next((r for r in rows if "compile_s" in r), {})
    rows = [r for r in rows if "tokens_per_s" in r]
    if not rows:
        return {}
    steady = [r["tokens_per_s"] for r in rows if r.get("step", 0) > skip] or [r["tokens_per_s"] for r in rows]
    return {
        "steps": rows[-1].get("step"),
        "tokens": rows[-1].get("tokens"),
        "tokens_per_s_steady": round(statistics.median(steady), 1),
        "tokens_per_s_after_warmup": tokens_per_s_after(rows, skip),
        "collate_s": round(sum(r.get("collate_s", 0.0) for r in rows), 2),  # host batch building, all windows
        "first_loss": rows[0].get("loss"),
        "last_loss": rows[-1].get("loss"),
        "setup_steps_s": setup,
        "compile_s": compiled.get("compile_s"),
        "compiled_graphs": compiled.get("compiled_graphs"),
        "recompiles_after_first_epoch": compiled.get("recompiles_after_first_epoch"),
    }


# --- the journey ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results", help="folder for the JSON result")
    p.add_argument("--work", default="/tmp/journey", help="scratch folder for data and runs (emptied first)")
    p.add_argument("--preset", default="qwen3-4b-random")
    p.add_argument("--cap-gb", default=16.0, **number(0, 4096).option("memory cap per process (0 = none)"))
    p.add_argument("--domain-steps", default=200, **integer(1, 10**6).option())
    p.add_argument("--batch-tokens", default=16384, **integer(1, 2**24).option())
    p.add_argument("--records", default=5200, **integer(1, 10**7).option("synthetic emrQA records"))
    p.add_argument("--task-cases", default=120, **integer(1, 10**6).option())
    p.add_argument(
        "--task-epochs",
        default=None,
        **integer(1, 10_000).option(
            "default: configs/task.toml's, as train.py runs it (more than one epoch, so that a recompile "
            "after the first is seen; the seventh pass and before ran 1)"
        ),
    )
    p.add_argument("--infer-cases", default=147, **integer(1, 10**6).option())
    p.add_argument("--max-new-tokens", default=DEFAULT_NEW_TOKENS, **MAX_NEW_TOKENS.option())
    p.add_argument("--tiny", action="store_true", help="tiny sizes (with --preset tiny: a CPU check)")
    p.add_argument(
        "--stages",
        default="domain,task,infer",
        help="stages to run; without domain, --work must hold an earlier call's data and runs "
        "(the journey outlasts one 10-minute device command: split it over two on one machine)",
    )
    return p


def prepare_work(args: argparse.Namespace, stages: list[str], p: argparse.ArgumentParser) -> float:
    """Synthetic data (a fresh journey) and the random base on disk; returns the seconds it took."""
    import shutil

    from bench.scaling import synthetic_emrqa
    from bench.synthetic import keyed_cases, write_keyed_cases

    t0 = time.perf_counter()
    work = Path(args.work)
    if "domain" in stages:  # a fresh journey: new data
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        synthetic_emrqa(work / "emrqa.jsonl", args.records)
        write_keyed_cases(keyed_cases(args.task_cases, seed=11), work / "train.xml", work / "train_key.json")
        write_keyed_cases(
            keyed_cases(args.infer_cases, seed=12), work / "test.xml", work / "test_key.json", answers_in_xml=True
        )  # Subtask 4 needs answer sentences; no --key, so no scoring
    elif not (work / "test.xml").is_file():
        p.error(f"--stages {args.stages} continues an earlier journey, but {work} holds none")
    # The random base once, before the stages (a user has the released weights on disk).
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; from model.backbone import save_random_base as s, "
            "random_base_cache_dir as d\nwith torch.device('cuda' if torch.cuda.is_available() else 'cpu'):"
            f" s('{args.preset}', d('{args.preset}'))",
        ],
        cwd=ROOT,
        check=True,
    )
    return time.perf_counter() - t0


def run_stages(args: argparse.Namespace, stages: list[str], device: str, save) -> list[dict]:
    """Domain, task and infer in turn (those asked for), each after the one before succeeded."""
    work, cap = Path(args.work), args.cap_gb or None
    common = ["--preset", args.preset, "--progress", "false", "--plot", "false", "--save_every", "0"]
    rows: list[dict] = []
    domain, task = work / "domain", work / "task"
    row: dict = {}
    if "domain" in stages:
        row = _domain_stage(args, work, work / "emrqa.jsonl", domain, common, cap, device)
        rows.append(row)
        save(rows)
    if "task" in stages and "error" not in row:
        row = _task_stage(args, work, domain, task, common, cap, device)
        rows.append(row)
        save(rows)
    if "infer" in stages and "error" not in row:
        rows.append(_infer_stage(args, work, task, cap, device))
    return rows


def print_summary(rows: list[dict], path: Path) -> None:
    print(
        "\n| stage | wall (s) | tokens/s (median window) | tokens/s (after warm-up) | peak alloc GB | "
        "peak reserved GB | notes |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        rate = r.get("tokens_per_s_steady") or r.get("decode_tokens_per_s")
        note = r.get("error") or (f"export {r['export_s']} s" if "export_s" in r else "")
        print(
            f"| {r['stage']} | {r.get('wall_s')} | {rate} | {r.get('tokens_per_s_after_warmup')} | "
            f"{r.get('peak_allocated_gb')} | "
            f"{r.get('peak_reserved_gb')} | {note} |"
        )
    print(f"wrote {path}")


@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_out_folder(Path(args.out))  # before any work
    stages = [s for s in args.stages.split(",") if s]
    if not stages or any(s not in ("domain", "task", "infer") for s in stages):
        p.error(f"--stages takes some of domain,task,infer, got {args.stages!r}")
    if args.child:
        return run_child(json.loads(args.child))
    import torch

    if args.tiny:
        args.domain_steps, args.batch_tokens, args.records = 3, 2048, 24
        args.task_cases, args.infer_cases, args.max_new_tokens = 4, 3, 8
    if args.task_epochs is None:
        from training.config import build_config

        args.task_epochs = 1 if args.tiny else build_config({"stage": "task", "joint": True}).epochs
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setup_s = prepare_work(args, stages, p)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = out / f"journey-{stamp}.json"
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "cap_gb": args.cap_gb or None,
        "setup_s": round(setup_s, 1),
        "stages": [],
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "passed": False,
    }

    def save(rows: list[dict]) -> None:  # after every stage: a run cut short still leaves its numbers
        result["stages"] = rows
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")

    save([])
    rows = run_stages(args, stages, device, save)
    result["passed"] = all("error" not in r for r in rows) and len(rows) == len(stages)
    save(rows)
    print_summary(rows, path)
    return 0 if result["passed"] else 1


def _domain_stage(args, work: Path, emrqa: Path, domain: Path, common: list[str], cap, device) -> dict:
    row = stage(
        "domain",
        "train",
        [
            "--stage",
            "domain",
            "--data",
            str(emrqa),
            "--out",
            str(domain),
            "--max_steps",
            str(args.domain_steps),
            "--batch_tokens",
            str(args.batch_tokens),
            "--max_length",
            "2048",
            "--log_every",
            "10" if not args.tiny else "1",
            *common,
        ],
        work,
        cap,
        device,
    )
    row.update(train_rates(domain, skip=20 if not args.tiny else 0))
    return row


def _task_stage(args, work: Path, domain: Path, task: Path, common: list[str], cap, device) -> dict:
    row = stage(
        "task",
        "train",
        [
            "--stage",
            "task",
            "--joint",
            "--init",
            str(domain),
            "--xml",
            str(work / "train.xml"),
            "--key",
            str(work / "train_key.json"),
            "--out",
            str(task),
            "--epochs",
            str(args.task_epochs),
            "--log_every",
            "5" if not args.tiny else "1",
            *common,
        ],
        work,
        cap,
        device,
    )
    row.update(train_rates(task, skip=5 if not args.tiny else 0))
    return row


def _infer_stage(args, work: Path, task: Path, cap, device) -> dict:
    sub = work / "submission"
    infer_argv = [
        str(work / "test.xml"),
        "--export",
        str(task / "export"),
        "--out",
        str(sub),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--no-progress",
        "--overwrite",
    ]
    if cap:
        infer_argv += ["--max-memory-gb", f"{cap:g}"]
    row = stage("infer", "infer", infer_argv, work, cap, device)
    run_json = sub / "run.json"
    if run_json.is_file():
        run = json.loads(run_json.read_text(encoding="utf-8"))
        timings = run.get("timings_s", {})
        fast = run.get("fast_inference") or {}
        new_tokens = (fast.get("decode") or {}).get("new_tokens")
        row.update(
            timings_s=timings,
            memory=run.get("memory"),
            new_tokens=new_tokens,
            decode_tokens_per_s=round(new_tokens / timings.get("model", timings.get("subtask3")), 1)
            if new_tokens and timings.get("model", timings.get("subtask3"))
            else None,
            cuda_graph=(fast.get("decode") or {}).get("cuda_graph"),
            gen_batches=(fast.get("decode") or {}).get("batches"),
            alignment=fast.get("alignment"),
            relevance=fast.get("relevance"),
            written=sorted(p.name for p in sub.iterdir()),
        )
    return row


if __name__ == "__main__":
    raise SystemExit(main())
