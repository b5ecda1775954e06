"""Data-parallel scaling of the domain stage on the Qwen3-4B shape (random weights).

    python -m bench.scaling --gpus 1 2 --out bench/results

Writes a synthetic emrQA-style SQuAD-v2 file (contexts of realistic length), then runs
``train.py --stage domain --preset qwen3-4b-random`` on 1 GPU (plain python) and on N
GPUs (``accelerate launch --config_file configs/accelerate/ddp.yaml``), each with
16k-token batches per process, and reads the steady-state tokens/s from each run's
``log.jsonl`` (tokens summed over processes, first windows dropped: they hold the
compile time) and every rank's peak GPU memory. Each rank's stdout/stderr is kept
(``accelerate launch --tee 3 --log_dir``) and copied next to the results as
``logs/Ngpu-rankR.stderr.log``, so a crashed rank shows its traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from plumbing.ranges import integer, number


from plumbing.atomic import check_out_folder
from plumbing.errors import CliParser, exit_on_input_error

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "patient admitted with chest pain troponin elevated heparin aspirin stent discharged home follow up "
    "cardiology blood pressure metoprolol lisinopril daily mg ct scan showed no acute findings labs anemia "
    "transfused units hemoglobin stable creatinine improved diuresis furosemide weight"
).split()


def synthetic_emrqa(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            sentences = [
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "."
                for _ in range(rng.randint(8, 45))
            ]
            context = " ".join(sentences)
            answer = rng.choice(sentences)[:-1]
            start = context.index(answer)
            fh.write(
                json.dumps(
                    {
                        "id": f"syn-{i}",
                        "title": "synthetic",
                        "context": context,
                        "question": "What happened to the patient?",
                        "answers": {"text": [answer], "answer_start": [start]},
                    }
                )
                + "\n"
            )


def read_rows(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def steady_tokens_per_s(log: Path, skip: int) -> float:
    rates = [r["tokens_per_s"] for r in read_rows(log) if r["step"] > skip]
    return statistics.median(rates) if rates else float("nan")


def collect_rank_logs(log_dir: Path, dest: Path, tag: str) -> list[str]:
    """torchrun's ``LOG_DIR/<run>/attempt_K/<local rank>/std{out,err}.log`` -> ``dest/TAG-rankR.std*.log``."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(log_dir.glob("**/std*.log")):
        target = dest / f"{tag}-rank{f.parent.name}.{f.stem}.log"
        shutil.copyfile(f, target)
        copied.append(str(target))
    return copied


def launch_prefix(n: int, config: str, log_dir: Path | None) -> list[str]:
    """Plain python for one process, else ``accelerate launch`` keeping every rank's output."""
    if n == 1:
        return [sys.executable]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(n)]
    if log_dir is not None:
        cmd += ["--tee", "3", "--log_dir", str(log_dir)]
    return cmd


def run_with_timeout(cmd: list[str], timeout: float | None, **kwargs) -> int:
    """Run ``cmd`` in its own process group; past ``timeout`` s kill the whole group (the
    launcher and every rank it started) and return 124."""
    import signal

    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124


# NVLink multicast off (device notes): NCCL NVLS and symmetric memory multicast.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
BATCH_TOKENS = 16384  # per process, every run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", nargs="+", default=[1, 2], **integer(1, 1024).option())
    p.add_argument("--steps", default=12, **integer(1, 10**6).option())
    p.add_argument("--skip", default=4, **integer(0, 10**6).option("optimizer steps dropped as warm-up"))
    p.add_argument("--records", default=1200, **integer(1, 10**7).option())
    p.add_argument("--work", default="/tmp/scaling")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--preset", default="qwen3-4b-random", help="tiny: a CPU check of the script (gloo)")
    p.add_argument("--extra", default="", help="extra train.py overrides, e.g. '--compile false'")
    p.add_argument(
        "--timeout_s",
        default=None,
        **number(0, 86_400, lo_open=True).option(
            "per run; a run past it is stopped and measured on the steps it logged"
        ),
    )
    return p.parse_args(argv)


def write_random_base(preset: str) -> None:
    """Write the random base once, before several processes would race to build it."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from model.backbone import save_random_base, random_base_cache_dir as d;"
            f"save_random_base('{preset}', d('{preset}'))",
        ],
        cwd=ROOT,
        check=True,
    )


def train_arguments(args: argparse.Namespace, data: Path) -> list[str]:
    """The ``train.py`` arguments every run shares (its ``--out`` comes per run)."""
    return [
        "train.py",
        "--stage",
        "domain",
        "--preset",
        args.preset,
        "--data",
        str(data),
        "--max_steps",
        str(args.steps),
        "--log_every",
        "1",
        "--save_every",
        "0",
        "--progress",
        "false",
        "--max_length",
        "2048",
        "--batch_tokens",
        str(BATCH_TOKENS),
        "--plot",
        "false",
        *args.extra.split(),
    ]


def measure_run(n: int, args: argparse.Namespace, work: Path, common: list[str], env: dict) -> dict:
    """Train on ``n`` processes; its row: wall time, steps, per-step tokens/s, peak memory, steady tokens/s."""
    out = work / f"run-{n}gpu"
    shutil.rmtree(out, ignore_errors=True)
    log_dir = work / f"launch-logs-{n}gpu"
    shutil.rmtree(log_dir, ignore_errors=True)
    cmd = launch_prefix(n, "configs/accelerate/ddp.yaml", log_dir) + common + ["--out", str(out)]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = run_with_timeout(cmd, args.timeout_s, cwd=ROOT, env=env)
    logs = collect_rank_logs(log_dir, Path(args.out) / "logs", f"{n}gpu") if n > 1 else []
    log_rows = read_rows(out / "log.jsonl")
    row = {
        "gpus": n,
        "wall_s": round(time.perf_counter() - start, 1),
        "steps_logged": len(log_rows),
        "epochs_seen": sorted({r["epoch"] for r in log_rows}),
        "rank_logs": logs,
        "tokens_per_s_by_step": [r.get("tokens_per_s") for r in log_rows],
    }
    if log_rows:
        last = log_rows[-1]
        row["max_mem_gb_ranks"] = last.get("max_mem_gb_ranks", [last.get("max_mem_gb")])
        row["tokens_per_step"] = round(last["tokens"] / last["step"])
    if rc != 0:
        row["error"] = "timed out" if rc == 124 else f"exit {rc}"
    if rc in (0, 124) and any(r["step"] > args.skip for r in log_rows):
        row["tokens_per_s"] = round(steady_tokens_per_s(out / "log.jsonl", args.skip), 1)
        row["steps_measured"] = sum(1 for r in log_rows if r["step"] > args.skip)
    return row


def add_speedups(rows: list[dict]) -> None:
    """Speed-up and efficiency of every measured row against the measured 1-GPU row."""
    base = next((r["tokens_per_s"] for r in rows if r.get("gpus") == 1 and "tokens_per_s" in r), None)
    for r in rows:
        if base and "tokens_per_s" in r:
            r["speedup"] = round(r["tokens_per_s"] / base, 2)
            r["efficiency"] = round(r["speedup"] / r["gpus"], 2)


def write_result(args: argparse.Namespace, rows: list[dict]) -> None:
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        "settings": {
            "steps": args.steps,
            "skip": args.skip,
            "batch_tokens_per_process": BATCH_TOKENS,
            "extra": args.extra,
        },
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    (Path(args.out) / f"scaling-{stamp}.json").write_text(json.dumps(result, indent=2))


def print_table(rows: list[dict]) -> None:
    print("\n| GPUs | tokens/s | speed-up | efficiency | peak GB per rank |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['gpus']} | {r.get('tokens_per_s', r.get('error'))} | {r.get('speedup', '')} | "
            f"{r.get('efficiency', '')} | {r.get('max_mem_gb_ranks', '')} |"
        )


@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_out_folder(Path(args.out))  # before any work

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "emrqa_synthetic.jsonl"
    synthetic_emrqa(data, args.records)
    write_random_base(args.preset)
    env = dict(os.environ, **NCCL_ENV)
    common = train_arguments(args, data)
    rows = []
    for n in args.gpus:
        row = measure_run(n, args, work, common, env)
        rows.append(row)
        print(json.dumps(row), flush=True)
    add_speedups(rows)
    write_result(args, rows)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
