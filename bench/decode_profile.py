"""Where one CUDA-graphed decode step of :mod:`model.decoding` spends its time.

    python -m bench.decode_profile --out bench/results      # one CUDA GPU, Qwen3-4B shape
    python -m bench.decode_profile --preset tiny --rows 4 --width 64 --out /tmp/p   # CPU check

Builds the preset's random model in dense bf16 on the GPU, prefills ``--rows`` prompts of
about ``--width`` tokens and then measures, for that batch:

* the decode step replayed as a CUDA graph and run eagerly (ms a step);
* the same with the attention :func:`model.decoding.choose_decode_attention` picks;
* a profiler table of the eager step: CUDA time per aten op (grouped by input shapes,
  so the attention matmuls over the cache stand apart from the projections) and per kernel;
* the attention over the static cache alone, in the step's formulation and in
  ``scaled_dot_product_attention`` variants, each replayed 36 times (one per layer)
  inside a CUDA graph;
* the memory floor of a step: dense weights + the K/V cache read once, at the card's
  bandwidth given by ``--bandwidth-tbs``.

Writes ``decode-profile-<stamp>.json`` under ``--out``. Random weights: timing only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from plumbing.ranges import integer, number

from plumbing.atomic import check_out_folder
from plumbing.errors import CliParser, exit_on_input_error

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from model.decoding import DecodeBatch


def _time_graph(fn, reps: int, device: torch.device) -> float:
    """Milliseconds per call of ``fn`` replayed as a CUDA graph (eager timing on CPU)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _time_eager(fn, reps: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / reps


def attention_variants(
    rows: int, n_heads: int, n_kv: int, head_dim: int, total: int, layers: int, device: torch.device, dtype: torch.dtype
) -> dict:
    """ms for ``layers`` attentions of one decode token over a ``total``-slot cache."""
    q = torch.randn(rows, n_heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.randn(rows, n_kv, total, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    keep = torch.ones(rows, total, dtype=torch.bool, device=device)
    keep[:, : total // 8] = False  # left padding
    keep[:, -total // 16 :] = False  # slots not yet written
    bool_mask = keep[:, None, None, :]
    float_mask = torch.zeros(rows, 1, 1, total, device=device, dtype=dtype).masked_fill(~bool_mask, float("-inf"))
    scale = head_dim**-0.5

    def ours():
        for _ in range(layers):
            qg = q.reshape(rows, n_kv, -1, head_dim)
            s = torch.matmul(qg, k.transpose(-1, -2)) * scale
            s = s.masked_fill(~bool_mask, float("-inf"))
            p = torch.softmax(s.float(), dim=-1).to(v.dtype)
            torch.matmul(p, v)

    def sdpa(mask, backend):
        from torch.nn.attention import sdpa_kernel

        def run():
            with sdpa_kernel(backend):
                for _ in range(layers):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

        return run

    def matmuls_only():
        for _ in range(layers):
            s = torch.matmul(q.reshape(rows, n_kv, -1, head_dim), k.transpose(-1, -2))
            torch.matmul(s, v)

    out: dict = {"bytes_read_mb": round(2 * k.numel() * k.element_size() * layers / 1e6, 1)}
    out["ours_matmul_softmax"] = round(_time_graph(ours, 20, device), 3)
    out["ours_matmuls_only"] = round(_time_graph(matmuls_only, 20, device), 3)
    from torch.nn.attention import SDPBackend

    for name, mask in (("bool", bool_mask), ("float", float_mask)):
        for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            key = f"sdpa_{name}_{backend.name.lower()}"
            try:
                out[key] = round(_time_graph(sdpa(mask, backend), 20, device), 3)
            except Exception as err:  # a backend that refuses these inputs: recorded
                out[key] = f"{type(err).__name__}: {str(err)[:160]}"
    return out


def profile_table(step, device: torch.device, reps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(reps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"

    def rows(events, n):
        events = sorted(events, key=lambda e: -getattr(e, attr, 0))[:n]
        return [
            {
                "name": e.key,
                "shapes": str(getattr(e, "input_shapes", ""))[:160],
                "count": e.count // reps,
                "ms_per_step": round(getattr(e, attr, 0) / 1e3 / reps, 3),
            }
            for e in events
        ]

    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    # GPU-side ranges of record_function annotations (inductor's "## Call CompiledFxGraph ##",
    # the optimizer's step) cover kernels already listed: counting them would count those twice.
    kernels = [
        e
        for e in prof.key_averages()
        if not e.key.startswith("aten::")
        and not getattr(e, "is_user_annotation", False)
        and getattr(e, "device_type", None) is not None
        and "cuda" in str(e.device_type).lower()
    ]
    total_kernel_ms = sum(getattr(e, attr, 0) for e in kernels) / 1e3 / reps
    kernel_launches = sum(e.count for e in kernels) // reps
    table = {
        "aten_ops": rows(ops, 30),
        "kernels": rows(kernels, 30),
        "kernel_ms_per_step": round(total_kernel_ms, 3),
        "kernels_per_step": kernel_launches,
    }
    if device.type == "cuda":
        table["gpu_idle"] = gpu_idle_report(prof.events(), reps)
    return table


@dataclass(frozen=True)
class Span:
    """One profiler event's time range (microseconds) and name."""

    start: float
    end: float
    name: str


def idle_gaps(busy: list[tuple[float, float]], min_us: float) -> list[tuple[float, float]]:
    """The gaps of at least ``min_us`` between the union of the ``busy`` intervals, in order."""
    gaps, reach = [], None
    for start, end in sorted(busy):
        if reach is not None and start - reach >= min_us:
            gaps.append((reach, start))
        reach = end if reach is None else max(reach, end)
    return gaps


def host_ops_at(points: list[float], spans: list[Span]) -> list[tuple[Span, Span] | None]:
    """For each of the sorted ``points``: the (innermost, outermost) host span running then, on
    any thread, or None. One sweep: spans by start, the running ones in a heap by end."""
    import heapq

    ordered = sorted(spans, key=lambda s: s.start)
    running: list[tuple[float, int, Span]] = []
    out: list[tuple[Span, Span] | None] = []
    i = 0
    for t in points:
        while i < len(ordered) and ordered[i].start <= t:
            heapq.heappush(running, (ordered[i].end, i, ordered[i]))
            i += 1
        while running and running[0][0] < t:
            heapq.heappop(running)
        if not running:
            out.append(None)
            continue
        by_length = sorted((s for _, _, s in running), key=lambda s: s.end - s.start)
        out.append((by_length[0], by_length[-1]))
    return out


def gpu_idle_report(events, reps: int, min_us: float = 20.0, top: int = 15) -> dict:
    """Where the GPU waits for the host: the union of kernel time against the profiled span, and
    each idle gap of at least ``min_us`` charged to the host op running at its middle (innermost
    and outermost, on any thread). A step whose idle time is large is bound by its host work."""
    busy, host = [], []
    for e in events:
        kind = str(getattr(e, "device_type", "")).lower()
        span = (e.time_range.start, e.time_range.end)
        if "cuda" in kind and not getattr(e, "is_user_annotation", False):
            busy.append(span)
        elif "cpu" in kind:
            host.append(Span(span[0], span[1], e.name))
    if not busy:
        return {}
    gaps = idle_gaps(busy, min_us)
    first, last = min(s for s, _ in busy), max(e for _, e in busy)
    charged: dict[str, dict[str, float]] = {"innermost": {}, "outermost": {}}
    for (start, end), found in zip(gaps, host_ops_at([(a + b) / 2 for a, b in gaps], host)):
        names = ("(no host op)", "(no host op)") if found is None else (found[0].name, found[1].name)
        for key, name in zip(("innermost", "outermost"), names):
            charged[key][name] = charged[key].get(name, 0.0) + (end - start)
    idle_us = sum(b - a for a, b in gaps)

    def ranked(table: dict[str, float]) -> list[dict]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"host_op": name[:120], "idle_ms_per_step": round(us / 1e3 / reps, 3)} for name, us in best]

    return {
        "span_ms_per_step": round((last - first) / 1e3 / reps, 3),
        "idle_ms_per_step": round(idle_us / 1e3 / reps, 3),
        "idle_gaps_per_step": round(len(gaps) / reps, 1),
        "min_gap_us": min_us,
        "idle_by_innermost_host_op": ranked(charged["innermost"]),
        "idle_by_outermost_host_op": ranked(charged["outermost"]),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-4b-random")
    p.add_argument("--rows", default=48, **integer(1, 4096).option())
    p.add_argument(
        "--width", default=1600, **integer(1, 131_072).option("prompt tokens (bucketed as the decoder does)")
    )
    p.add_argument("--new", default=100, **integer(1, 8192).option("max new tokens: sets the cache length"))
    p.add_argument(
        "--bandwidth-tbs",
        default=3.35,
        **number(0, 100, lo_open=True).option("memory bandwidth for the floor (H100 SXM)"),
    )
    p.add_argument("--out", default="bench/results")
    return p.parse_args(argv)


def build_model(preset: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, float]:
    """The preset's random model on ``device`` and the seconds it took to build."""
    from model.backbone import build_random_base

    t0 = time.perf_counter()
    with torch.device(device):
        model = build_random_base(preset, dtype=dtype).eval()
    return model, time.perf_counter() - t0


def random_prompts(rows: int, width: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask: lengths 75-100% of the width, left-padded (seeded)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab_size - 1000, (rows, width), generator=gen)
    mask = torch.ones_like(ids)
    for r in range(rows):
        pad = int(torch.randint(0, max(1, width // 4), (1,), generator=gen))
        mask[r, :pad] = 0
        ids[r, :pad] = 0
    return ids, mask


def prefill(
    batch: DecodeBatch,
    cfg: PretrainedConfig,
    ids: torch.Tensor,
    mask: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """Prefill the batch's cache with the unpadded prompts; seconds."""
    from model.backbone import head_dim_of
    from model.packed import choose_packed_attention

    t0 = time.perf_counter()
    seqs = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    attention = choose_packed_attention(
        device, dtype, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg)
    )[0]
    batch.prefill(seqs, [len(x) for x in seqs], 16384, attention)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_steps(
    batch: DecodeBatch, cfg: PretrainedConfig, rows: int, device: torch.device, dtype: torch.dtype
) -> dict:
    """Decode-step timings and profiles with the matmul attention, then with the chosen one."""
    from model.decoding import choose_decode_attention

    result: dict = {}

    def step():  # keep the step counter inside the cache: replays must not run off its end
        batch.step()
        batch.step_i.fill_(1)

    result["step_ms_graph"] = round(_time_graph(step, 50, device), 3)  # the matmul attention
    result["step_ms_eager"] = round(_time_eager(step, 10, device), 3)
    result["profile"] = profile_table(step, device)
    chosen, why_not = choose_decode_attention(device, dtype, cfg.num_attention_heads, batch.n_kv, batch.head_dim)
    result["chosen_attention"], result["attention_fallback"] = chosen, why_not
    batch.attention = chosen
    result["step_ms_graph_chosen"] = round(_time_graph(step, 50, device), 3)
    result["profile_chosen"] = profile_table(step, device)
    n_heads = cfg.num_attention_heads
    result["attention_36_layers_ms"] = attention_variants(
        rows, n_heads, batch.n_kv, batch.head_dim, batch.total, cfg.num_hidden_layers, device, dtype
    )
    return result


def memory_floor(preset: str, cfg: PretrainedConfig, rows: int, cache_slots: int, bandwidth_tbs: float) -> dict:
    """Dense weights + the K/V cache read once per step, at the card's bandwidth."""
    from inference.memory import dense_weight_bytes
    from model.backbone import resolve_preset
    from model.decoding import kv_bytes_per_token

    weights = dense_weight_bytes(resolve_preset(preset).arch)
    cache = kv_bytes_per_token(cfg) * rows * cache_slots
    return {
        "weights_gb": round(weights / 1e9, 2),
        "kv_cache_gb": round(cache / 1e9, 2),
        "ms_at_bandwidth": round(1e3 * (weights + cache) / (bandwidth_tbs * 1e12), 2),
    }


def write_and_print(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode-profile-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("profile")}, indent=1))
    for name in ("profile", "profile_chosen"):
        prof = result[name]
        print(f"{name}: kernels per step {prof['kernels_per_step']}, kernel ms {prof['kernel_ms_per_step']}")
        for row in prof["aten_ops"][:12]:
            print(f"{row['ms_per_step']:8.3f} ms x{row['count']:5d} {row['name']} {row['shapes'][:90]}")
    print(f"wrote {path}")


@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_out_folder(Path(args.out))  # before any work

    from model.backbone import decoder
    from model.decoding import MATMUL, DecodeBatch, bucket_width

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, build_s = build_model(args.preset, device, dtype)
    cfg = decoder(model).config
    width = bucket_width(args.width)
    ids, mask = random_prompts(args.rows, width, cfg.vocab_size)
    batch = DecodeBatch(model, args.rows, width, args.new, [cfg.vocab_size - 1], 0, device, dtype, MATMUL)
    result: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "rows": args.rows,
        "width": width,
        "cache_slots": batch.total,
        "build_s": round(build_s, 1),
    }
    with torch.no_grad():
        result["prefill_s"] = round(prefill(batch, cfg, ids, mask, device, dtype), 3)
        result.update(measure_steps(batch, cfg, args.rows, device, dtype))
    result["floor"] = memory_floor(args.preset, cfg, args.rows, batch.total, args.bandwidth_tbs)
    write_and_print(result, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
