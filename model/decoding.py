"""Greedy decoding with a static KV cache and a CUDA-graphed decode step.

``model.generate`` spends most of a decode step in Python and kernel launches (about
100-190 ms a step at batch 48 on an H100, against a memory floor of about 5-7 ms). This
module runs the same Qwen3 arithmetic, with the model's own modules (dense, merged or
NF4 + LoRA), in a loop built for speed:

* one pre-allocated KV cache per batch (``[B, kv_heads, prompt + new, head_dim]`` per
  layer), prompt rows left-padded as ``generate`` pads them, same positions;
* prefill in row chunks under a token budget, logits of the last position only;
* greedy argmax on the device; the step writes its own next input, output column,
  finished flags and step counter, so nothing returns to the host but a check of
  "all finished?" every ``check_every`` steps;
* on CUDA the decode step is captured once per (batch, prompt width) bucket as a CUDA
  graph and replayed; on CPU (or when capture fails, which is said and recorded) the
  same step runs eagerly;
* the decode attention over the cache runs in cuDNN's fused attention where it works
  (``SDPA_CUDNN``): cuBLAS/MAGMA batched matmuls with 4 query rows per KV head took 19 of
  the 29 ms of an H100 step at 48 rows (``bench/decode_profile.py``); elsewhere (CPU, or
  cuDNN refusing the inputs, said and recorded) the explicit matmul + softmax (``MATMUL``).

Tokens after a stop token are ``pad_id``, as ``generate`` writes them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

from .backbone import decoder, head_dim_of, lm_head, unwrapped
from .kernel_probe import kernel_mismatch
from .fused_ops import LayerOps
from .packed import attention_shape, choose_packed_attention, layer_ops, pack, packed_forward, to_device

ROWS_MULTIPLE = 8  # decode rows beyond 4 are rounded up to this: whole GEMM tiles, few idle rows
WIDTH_BUCKET = 64  # prompt widths are rounded up to a multiple of this


SDPA_CUDNN, MATMUL = "sdpa-cudnn", "matmul"


def decode_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, keep: torch.Tensor, scale: float, impl: str
) -> torch.Tensor:
    """One query token per row over a static cache: q [b, heads, 1, d], cache [b, kv, T, d],
    ``keep`` [b, 1, 1, T] (True where a slot holds a real token). Returns [b, heads, 1, d]."""
    b, heads, _, d = q.shape
    n_kv = cache_k.shape[1]
    if impl == SDPA_CUDNN:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=keep, scale=scale, enable_gqa=True)
    # Grouped-query attention without repeating the cache: [b, kv, group, d].
    qg = q.reshape(b, n_kv, -1, d)
    scores = torch.matmul(qg, cache_k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(cache_v.dtype)
    return torch.matmul(probs, cache_v).reshape(b, heads, 1, d)


_CUDNN_PROBES: dict[tuple[str, torch.dtype, int, int, int], str | None] = {}


def choose_decode_attention(
    device: torch.device, dtype: torch.dtype, heads: int, n_kv: int, head_dim: int
) -> tuple[str, str | None]:
    """(implementation, why not cuDNN): cuDNN's fused attention when it runs here and agrees
    with the matmul formulation on a small probe (cached per shape); else the matmul one."""
    if device.type != "cuda":
        return MATMUL, None
    if dtype not in (torch.bfloat16, torch.float16):
        return MATMUL, f"cuDNN attention takes bf16 or fp16, the model runs in {dtype}"
    key = (str(device), dtype, heads, n_kv, head_dim)
    if key not in _CUDNN_PROBES:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(2, heads, 1, head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(2, n_kv, 40, head_dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(2, n_kv, 40, head_dim, device=device, dtype=dtype, generator=gen)
        keep = torch.ones(2, 1, 1, 40, dtype=torch.bool, device=device)
        keep[0, ..., :7] = False
        keep[:, ..., 33:] = False
        _CUDNN_PROBES[key] = kernel_mismatch(
            "cuDNN attention",
            lambda: decode_attention(q, k, v, keep, head_dim**-0.5, SDPA_CUDNN),
            "matmul",
            lambda: decode_attention(q, k, v, keep, head_dim**-0.5, MATMUL),
        )
    why_not = _CUDNN_PROBES[key]
    return (MATMUL, why_not) if why_not else (SDPA_CUDNN, None)


def bucket_batch(n: int) -> int:
    """Cache rows for ``n`` prompts: 1, 2 or 4, else the next multiple of ``ROWS_MULTIPLE``.
    Each batch captures its own graph, so a coarser bucket would only decode idle copies."""
    if n <= 4:
        return 1 << max(0, n - 1).bit_length()
    return int(math.ceil(n / ROWS_MULTIPLE) * ROWS_MULTIPLE)


def bucket_width(n: int) -> int:
    return int(math.ceil(n / WIDTH_BUCKET) * WIDTH_BUCKET)


def kv_bytes_per_token(config: PreTrainedConfig, dtype_bytes: int = 2) -> int:
    """Bytes of K and V cache one token takes over all layers."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * dtype_bytes


@dataclass
class DecodeStats:
    """What a :func:`greedy_decode` call did (for run.json and the benchmark)."""

    batches: list[dict[str, int]] = field(default_factory=list)
    cuda_graph: bool = False
    graph_fallback: str | None = None  # why capture was not used, when it was asked for
    attention: str | None = None  # decode attention over the cache: SDPA_CUDNN or MATMUL
    attention_fallback: str | None = None  # why not cuDNN, on CUDA
    prefill_attention: str | None = None  # packed prefill: VARLEN_FLASH or PER_SEQUENCE (model.packed)
    prefill_attention_fallback: str | None = None  # why not the varlen kernel, on CUDA
    elementwise: str | None = None  # norms, rotary, SwiGLU: fused Triton kernels or eager (model.fused_ops)
    elementwise_fallback: str | None = None  # why not the fused kernels, on CUDA
    prefill_s: float = 0.0
    capture_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    new_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def supports_fast_decode(model: nn.Module) -> str | None:
    """None when the model's architecture is one this module reproduces; else why not."""
    config = unwrapped(model).config
    if getattr(config, "model_type", None) not in ("qwen3",):
        return f"model type {getattr(config, 'model_type', None)!r} is not qwen3"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    return None


class DecodeBatch:
    """Static buffers and (on CUDA) the captured decode step for one (rows, width) bucket."""

    def __init__(
        self,
        model: nn.Module,
        rows: int,
        width: int,
        max_new_tokens: int,
        stop_ids: list[int],
        pad_id: int,
        device: torch.device,
        dtype: torch.dtype,
        attention: str = MATMUL,
        ops: LayerOps | None = None,
    ) -> None:
        self.attention = attention
        self.ops = ops if ops is not None else layer_ops(model)[0]
        self.model = model
        self.dec = decoder(model)
        self.head = lm_head(model)
        cfg = self.dec.config
        self.n_layers = cfg.num_hidden_layers
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.rows, self.width, self.max_new = rows, width, max_new_tokens
        total = width + max(max_new_tokens - 1, 0)
        self.total = total
        shape = (rows, self.n_kv, max(total, 1), self.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.n_layers)]
        positions = torch.arange(total + 1, device=device)[None]
        probe = torch.zeros(1, device=device, dtype=dtype)
        cos, sin = self.dec.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [positions, head_dim], the model's dtype
        self.valid = torch.zeros(rows, max(total, 1), dtype=torch.bool, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)
        self.out = torch.full((rows, max(max_new_tokens, 1)), pad_id, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.step_i = torch.zeros(1, dtype=torch.long, device=device)
        self.stop = torch.tensor(stop_ids or [-1], dtype=torch.long, device=device)
        self.pad = torch.tensor(pad_id, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _is_stop(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens[:, None] == self.stop[None]).any(-1)

    # --- prefill: packed forwards (no padding), the first token from each prompt's last position
    def prefill(
        self,
        seqs: list[list[int]],
        prompt_lens: list[int],
        prefill_tokens: int,
        attention: str,
        tap: int = -1,
        on_hidden: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        """``seqs[r]``: row r's prompt (its first ``prompt_lens[r]`` tokens) and any tokens run
        after it in the same pass for the head (never cached); rows past ``len(seqs)`` (bucket
        padding) repeat the last row. The cache holds each prompt right-aligned at ``width``, as
        ``generate`` left-pads. ``on_hidden(r, hidden)`` gets row r's hidden state ``tap``."""
        self.valid.zero_()
        self.out.fill_(int(self.pad))
        self.done.zero_()
        self.step_i.zero_()
        for chunk in _chunks([len(s) for s in seqs], prefill_tokens):
            self._prefill_pack(chunk, seqs, prompt_lens, attention, tap, on_hidden)
        real = len(seqs)
        for r in range(real):
            self.valid[r, self.width - prompt_lens[r] : self.width] = True
        self.lengths[:real] = torch.tensor(prompt_lens, dtype=torch.long)
        if real < self.rows:  # bucket rows: copies of the last real row, dropped at the end
            for cache in (*self.k, *self.v, self.valid, self.lengths, self.tok):
                cache[real:] = cache[real - 1]
        self.out[:, 0] = self.tok
        self.done |= self._is_stop(self.tok)

    def _prefill_pack(
        self,
        chunk: list[int],
        seqs: list[list[int]],
        prompt_lens: list[int],
        attention: str,
        tap: int,
        on_hidden: Callable[[int, torch.Tensor], None] | None,
    ) -> None:
        device = self.tok.device
        packed = pack([seqs[r] for r in chunk], device)
        rows: list[int] = []
        slots: list[int] = []
        src: list[int] = []
        for j, r in enumerate(chunk):
            n = prompt_lens[r]
            rows += [r] * n
            slots += range(self.width - n, self.width)
            src += range(packed.starts[j], packed.starts[j] + n)
        rows_t, slots_t, src_t = (to_device(torch.tensor(x, dtype=torch.long), device) for x in (rows, slots, src))

        def write(layer_i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.k[layer_i][rows_t, :, slots_t] = k[src_t]
            self.v[layer_i][rows_t, :, slots_t] = v[src_t]

        last = to_device(torch.tensor([packed.starts[j] + prompt_lens[r] - 1 for j, r in enumerate(chunk)]), device)
        hidden, first = packed_forward(
            self.model, packed, tap=tap, attention=attention, write_kv=write, logits_at=last, ops=self.ops
        )
        assert first is not None  # logits_at was given
        self.tok[to_device(torch.tensor(chunk), device)] = first
        if on_hidden is not None:
            for j, r in enumerate(chunk):
                on_hidden(r, hidden[packed.starts[j] : packed.starts[j] + packed.lengths[j]])

    # --- decode: one token for every row, all state on the device ----------------------------
    def step(self) -> None:
        b, d, ops = self.rows, self.head_dim, self.ops
        slot = self.width + self.step_i  # [1]
        self.valid.index_fill_(1, slot, True)
        pos = self.lengths + self.step_i  # [rows]
        cos, sin = self.cos[pos], self.sin[pos]  # [rows, d]
        h = self.dec.embed_tokens(self.tok)
        keep = self.valid[:, None, None, :]
        layers = self.dec.layers
        x = ops.norm(layers[0].input_layernorm, h)  # each residual add is fused with the norm after it
        for layer_i, layer in enumerate(layers):
            attn = layer.self_attn
            q = ops.norm(attn.q_norm, attn.q_proj(x).view(b, -1, d))
            k = ops.norm(attn.k_norm, attn.k_proj(x).view(b, -1, d))
            v = attn.v_proj(x).view(b, -1, d)
            q, k = ops.rope(q, k, cos, sin)
            cache_k, cache_v = self.k[layer_i], self.v[layer_i]
            cache_k.index_copy_(2, slot, k[:, :, None])
            cache_v.index_copy_(2, slot, v[:, :, None])
            o = decode_attention(q[:, :, None], cache_k, cache_v, keep, attn.scaling, self.attention).reshape(b, -1)
            x, h = ops.add_norm(h, attn.o_proj(o), layer.post_attention_layernorm)
            after = layers[layer_i + 1].input_layernorm if layer_i + 1 < len(layers) else self.dec.norm
            x, h = ops.add_norm(h, ops.mlp(layer.mlp, x), after)
        logits = self.head(x)
        nxt = torch.where(self.done, self.pad, logits.argmax(-1))
        self.out.index_copy_(1, self.step_i + 1, nxt[:, None])
        self.done |= self._is_stop(nxt)
        self.tok.copy_(nxt)
        self.step_i += 1

    def capture(self) -> None:
        """Warm the step up on a side stream (one real step), then capture it."""
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch leaves Stream.__new__ unannotated
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()  # recorded, not run
        self.graph = graph

    def run_steps(self, n: int, check_every: int, first_done: bool) -> int:
        """Up to ``n`` decode steps (one may already have run in :meth:`capture`); returns steps run."""
        ran = 1 if first_done else 0
        while ran < n:
            burst = min(check_every, n - ran)
            for _ in range(burst):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self.step()
            ran += burst
            if ran < n and bool(self.done.all()):  # the only host sync: every check_every steps
                break
        return ran


@dataclass
class _DecodeJob:
    """One :func:`greedy_decode` call's settings, shared by its batches."""

    model: nn.Module
    prompts: list[list[int]]
    extras: list[list[int]]
    max_new: int
    stop_ids: list[int]
    pad_id: int
    device: torch.device
    dtype: torch.dtype
    graphs: bool
    attention: str
    packed_attention: str
    ops: LayerOps
    prefill_tokens: int
    check_every: int
    tap: int
    on_hidden: Callable[[int, torch.Tensor], None] | None
    stats: DecodeStats
    log: Callable[[str], None] | None


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    batch_rows: int,
    prefill_tokens: int = 16384,
    use_cuda_graph: bool | None = None,
    check_every: int = 16,
    attention: str | None = None,
    stats: DecodeStats | None = None,
    log: Callable[[str], None] | None = None,
    extras: list[list[int]] | None = None,
    tap: int = -1,
    on_hidden: Callable[[int, torch.Tensor], None] | None = None,
    decode_budget_bytes: int | None = None,
    row_overhead_bytes: int = 0,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), ``max_new_tokens`` each, cut after a
    stop token; returned in the order of ``prompts``. At most ``batch_rows`` rows are decoded
    together, longest prompts first, and their KV cache at the batch's own width plus
    ``row_overhead_bytes`` a row (logits, activations) stays within ``decode_budget_bytes``
    (the caller's memory plan; None: rows alone decide): a batch of shorter prompts holds
    more rows. ``prefill_tokens`` bounds one packed prefill forward. ``use_cuda_graph``
    defaults to on for CUDA; ``attention`` (SDPA_CUDNN or MATMUL) defaults to
    :func:`choose_decode_attention`'s choice.

    ``extras[i]`` (optional) are tokens run after prompt i in its prefill pass (never cached,
    never generated from); ``on_hidden(i, hidden)`` then receives hidden state ``tap`` (the
    head's numbering) over prompt i + extras[i]: one forward serves the decode cache and the head."""
    job = _decode_job(
        model,
        prompts,
        max_new_tokens,
        stop_ids,
        pad_id,
        prefill_tokens,
        use_cuda_graph,
        check_every,
        attention,
        stats,
        log,
        extras,
        tap,
        on_hidden,
    )
    results: list[list[int]] = [[] for _ in prompts]
    cfg = decoder(model).config
    row_bytes = (kv_bytes_per_token(cfg), max_new_tokens, row_overhead_bytes)
    for idx, rows, width in _decode_batches(prompts, max(1, batch_rows), job.graphs, decode_budget_bytes, row_bytes):
        for i, toks in zip(idx, _decode_batch(job, idx, rows, width)):
            results[i] = toks
    return results


def _decode_job(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    prefill_tokens: int,
    use_cuda_graph: bool | None,
    check_every: int,
    attention: str | None,
    stats: DecodeStats | None,
    log: Callable[[str], None] | None,
    extras: list[list[int]] | None,
    tap: int,
    on_hidden: Callable[[int, torch.Tensor], None] | None,
) -> _DecodeJob:
    """Check the request and settle the kernels: decode attention, packed prefill attention, graphs."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    why_not = supports_fast_decode(model)
    if why_not:
        raise ValueError(f"fast greedy decoding does not support this model: {why_not}")
    if extras is not None and len(extras) != len(prompts):
        raise ValueError("extras must hold one token list per prompt")
    stats = stats if stats is not None else DecodeStats()
    shape = attention_shape(model)
    device, dtype = shape[0], shape[1]
    graphs = (device.type == "cuda") if use_cuda_graph is None else (use_cuda_graph and device.type == "cuda")
    if attention is None:
        attention, why_not = choose_decode_attention(*shape)
        if why_not and stats.attention_fallback != why_not:
            stats.attention_fallback = why_not
            if log:
                log(f"note: {why_not}; the decode step uses matmul attention")
    if attention not in (SDPA_CUDNN, MATMUL):
        raise ValueError(f"attention must be {SDPA_CUDNN!r} or {MATMUL!r}, got {attention!r}")
    stats.attention = attention
    packed_attention, why_not = choose_packed_attention(*shape)
    stats.prefill_attention, stats.prefill_attention_fallback = packed_attention, why_not
    ops, why_not = layer_ops(model)
    stats.elementwise, stats.elementwise_fallback = ops.name, why_not
    return _DecodeJob(
        model,
        prompts,
        extras or [[] for _ in prompts],
        max_new_tokens,
        stop_ids,
        pad_id,
        device,
        dtype,
        graphs,
        attention,
        packed_attention,
        ops,
        prefill_tokens,
        check_every,
        tap,
        on_hidden,
        stats,
        log,
    )


def _decode_batches(
    prompts: list[list[int]], batch_rows: int, graphs: bool, budget: int | None, row_bytes: tuple[int, int, int]
) -> Iterator[tuple[list[int], int, int]]:
    """(prompt indices, cache rows, prompt width) per batch, longest prompts first: as many rows
    as ``batch_rows`` and the budget allow at the batch's own width (later batches, with shorter
    prompts, fit more rows); ``row_bytes`` = (KV bytes a token, new tokens, other bytes a row).
    With graphs, rows and width rounded up to their buckets."""
    kv_per_token, max_new, overhead = row_bytes
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    start = 0
    while start < len(order):
        longest = len(prompts[order[start]])
        width = bucket_width(longest) if graphs else longest
        fit = batch_rows
        if budget is not None:
            fit = max(1, min(fit, budget // (kv_per_token * (width + max_new) + overhead)))
        idx = order[start : start + fit]
        rows = min(bucket_batch(len(idx)), fit) if graphs else len(idx)
        yield idx, max(rows, len(idx)), width
        start += len(idx)


def _decode_batch(job: _DecodeJob, idx: list[int], rows: int, width: int) -> list[list[int]]:
    """Prefill, capture (or not), decode one batch; its rows' tokens, cut after a stop token."""
    stats = job.stats
    seqs = [job.prompts[i] + job.extras[i] for i in idx]
    lens = [len(job.prompts[i]) for i in idx]
    callback = job.on_hidden
    on_hidden = None if callback is None else (lambda r, hidden: callback(idx[r], hidden))

    def fresh_batch() -> DecodeBatch:
        batch = DecodeBatch(
            job.model, rows, width, job.max_new, job.stop_ids, job.pad_id, job.device, job.dtype, job.attention, job.ops
        )
        batch.prefill(seqs, lens, job.prefill_tokens, job.packed_attention, job.tap, on_hidden)
        return batch

    t0 = time.perf_counter()
    batch = fresh_batch()
    _sync(job.device)
    stats.prefill_s += time.perf_counter() - t0
    first_done = False
    if job.max_new > 1 and job.graphs and not stats.graph_fallback:
        t0 = time.perf_counter()
        try:
            batch.capture()
            first_done = stats.cuda_graph = True
        except Exception as err:  # e.g. a kernel that cannot be captured: said and recorded
            stats.graph_fallback = f"{type(err).__name__}: {err}"[:300]
            if job.log:
                job.log(f"warning: CUDA-graph capture failed ({stats.graph_fallback}); decoding eagerly")
            torch.cuda.synchronize()
            del batch  # free the first cache before allocating the second
            torch.cuda.empty_cache()
            if job.attention != MATMUL:  # the conservative step from here on, said in run.json
                stats.attention_fallback = f"after the failed capture ({stats.graph_fallback[:80]})"
                job.attention = stats.attention = MATMUL
            batch = fresh_batch()
        _sync(job.device)
        stats.capture_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = batch.run_steps(job.max_new - 1, job.check_every, first_done) if job.max_new > 1 else 0
    out = batch.out.cpu()
    stats.decode_s += time.perf_counter() - t0
    stats.decode_steps += steps
    results = []
    for r in range(len(idx)):
        toks = out[r].tolist()
        cut = next((j + 1 for j, t in enumerate(toks) if t in job.stop_ids), len(toks))
        results.append(toks[:cut])
        stats.new_tokens += cut
    stats.batches.append({"rows": len(idx), "bucket_rows": rows, "width": width, "steps": steps + 1})
    return results


def _chunks(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive indices whose lengths sum to at most ``max_tokens`` (a longer one alone)."""
    chunks: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if chunks and used + n <= max_tokens:
            chunks[-1].append(i)
            used += n
        else:
            chunks.append([i])
            used = n
    return chunks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
