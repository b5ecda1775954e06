"""The fast inference engine around a loaded checkpoint: memory-planned batches, greedy
decoding with a static cache and CUDA graphs (:mod:`model.decoding`), alignment forwards
grouped by length under a token budget, and the Subtask 2 relevance forwards the same way
(``score_relevance_all``).

:class:`FastCheckpoint` keeps the :class:`model.loaded_export.LoadedExport` interface
(``generate_answers``, ``score_all``, ``score_pairs``, ``threshold``, ``manifest``), so the
pipeline uses it unchanged; what it did (plan, fallbacks, timings) is in :meth:`report`.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from data.prompts import chat_prompt, encode_example, example_from_case
from data.records import Case
from model.loaded_export import stop_ids  # the one definition of the stop set
from model.decoding import MATMUL, SDPA_CUDNN, DecodeStats, greedy_decode, supports_fast_decode
from model.head_scoring import encode_for_scoring, group_head_outputs, group_relevance_probabilities

from .memory import BatchPlan, plan_batches, token_budget_groups


def _release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _note_prefix(enc) -> tuple:
    """What an example's note-sentence states depend on: its tokens up to the last note
    sentence's end, and the note spans."""
    end = max((stop for _, stop in enc.note_spans), default=0)
    return tuple(enc.input_ids[:end]), tuple(tuple(span) for span in enc.note_spans)


class FastCheckpoint:
    """A loaded checkpoint whose generation and alignment run the fast paths."""

    def __init__(self, checkpoint, max_memory_gb: float | None = None, use_cuda_graph: bool | None = None,
                 log: Callable[[str], None] | None = None):
        self.inner = checkpoint
        self.max_memory_gb = max_memory_gb
        self.use_cuda_graph = use_cuda_graph
        self.log = log
        self.plans: list[dict] = []
        self.decode = DecodeStats()
        self.alignment: dict = {"forwards": 0, "tokens": 0, "padded_tokens": 0, "seconds": 0.0}
        self.relevance: dict = {"forwards": 0, "tokens": 0, "padded_tokens": 0, "seconds": 0.0,  # Subtask 2
                                "reused_from_alignment": 0}
        self.fallbacks: list[str] = []
        # case id -> (the tokens and spans the note states depend on, relevance probabilities)
        # from the alignment forwards, for Subtask 2 to reuse (see score_relevance_all)
        self._relevance_seen: dict[str, tuple[tuple, np.ndarray]] = {}

    # the LoadedCheckpoint attributes the pipeline reads
    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def plan(self, prompt_tokens: int, max_new_tokens: int, max_rows: int | None) -> BatchPlan:
        plan = plan_batches(self.inner.model, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens,
                            max_rows=max_rows, max_memory_gb=self.max_memory_gb)
        self.plans.append(plan.to_dict())
        return plan

    @torch.no_grad()
    def generate_answers(self, cases: list[Case], max_new_tokens: int = 100, batch_size: int | None = None) -> list[str]:
        """Greedy answers as :meth:`LoadedCheckpoint.generate_answers` gives them; ``batch_size``
        caps the rows decoded together (None: as many as memory allows)."""
        why_not = supports_fast_decode(self.inner.model)
        if why_not:
            self._fallback(f"generation: {why_not}; using model.generate")
            return self.inner.generate_answers(cases, max_new_tokens=max_new_tokens, batch_size=batch_size or 16)
        tok = self.inner.tokenizer
        prompts = [chat_prompt(tok, example_from_case(c, with_answer=False))[0] for c in cases]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        plan = self.plan(max(len(x) for x in ids), max_new_tokens, batch_size)
        rows, prefill = plan.gen_rows, plan.prefill_tokens
        while True:
            try:
                new = greedy_decode(self.inner.model, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids(tok),
                                    pad_id=tok.pad_token_id, batch_rows=rows, prefill_tokens=prefill,
                                    use_cuda_graph=self.use_cuda_graph, stats=self.decode, log=self.log)
                break
            except torch.OutOfMemoryError:
                if rows == 1 and prefill <= 1024:
                    raise
                # The plan was wrong for this card: said, recorded, and retried smaller.
                self._fallback(f"generation ran out of memory at {rows} rows / {prefill} prefill tokens; "
                               f"retried with {max(1, rows // 2)} / {max(1024, prefill // 2)}")
                rows, prefill = max(1, rows // 2), max(1024, prefill // 2)
                _release()
        if self.decode.graph_fallback and f"graph: {self.decode.graph_fallback}" not in self.fallbacks:
            self.fallbacks.append(f"graph: {self.decode.graph_fallback}")
        if self.decode.attention_fallback and f"attention: {self.decode.attention_fallback}" not in self.fallbacks:
            self.fallbacks.append(f"attention: {self.decode.attention_fallback}")
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    @torch.no_grad()
    def score_all(self, cases: list[Case], batch_size: int | None = None, max_tokens: int | None = None) -> list[np.ndarray]:
        """Link probabilities as :meth:`LoadedCheckpoint.score_all` computes them, cases grouped
        by length so that each forward holds at most ``max_tokens`` (padded) tokens; the
        budget comes from free memory. ``batch_size`` is accepted for the LoadedCheckpoint
        interface (the pipeline passes its old fixed size); the token budget decides."""
        out, encoded = encode_for_scoring(self.inner.tokenizer, cases)
        if encoded:
            case_of = {id(enc): cases[i].case_id for i, enc in encoded}

            def pairs_keeping_relevance(backbone, head, group, pad_id, device, width):
                outputs = group_head_outputs(backbone, head, group, pad_id, device, width)
                for enc, output in zip(group, outputs):
                    if output.relevance_logits is not None:
                        self._relevance_seen[case_of[id(enc)]] = (
                            _note_prefix(enc), torch.sigmoid(output.relevance_logits.float()).cpu().numpy())
                return [torch.sigmoid(output.pair_logits.float()).cpu().numpy() for output in outputs]

            self._score_in_groups("alignment", pairs_keeping_relevance, encoded, max_tokens, out)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def score_relevance_all(self, cases: list[Case], max_tokens: int | None = None) -> list[np.ndarray] | None:
        """[n_note] relevance probabilities per case as :func:`model.head_scoring.relevance_probabilities`
        computes them one case at a time (question + note, no answer): read off an earlier
        :meth:`score_all` forward of the same case where its note tokens match, the other cases
        grouped by length under the same token budget. None if the head has no relevance output."""
        if getattr(self.inner.head, "relevance_mlp", None) is None:
            return None
        tok = self.inner.tokenizer
        out: list[np.ndarray | None] = [None] * len(cases)
        todo = []
        for i, case in enumerate(cases):
            enc = encode_example(tok, example_from_case(case, with_answer=False))
            seen = self._relevance_seen.get(case.case_id)
            # The relevance logits read only the note sentences' states, and attention is
            # causal: an alignment forward whose tokens up to the last note sentence are these
            # tokens (the answer sentences come after) already computed them.
            if seen is not None and seen[0] == _note_prefix(enc):
                out[i] = seen[1]
                self.relevance["reused_from_alignment"] += 1
            else:
                todo.append((i, enc))
        if todo:
            self._score_in_groups("relevance", group_relevance_probabilities, todo, max_tokens, out)
        return out  # type: ignore[return-value]

    def _score_in_groups(self, what: str, score_group: Callable, encoded: list, max_tokens: int | None,
                         out: list) -> None:
        """``out[i] = score_group(...)`` for every encoded (i, example), longest first in
        token-budget groups; an out-of-memory halves the budget (said, recorded) and retries.
        Forwards, tokens and seconds go to ``self.<what>`` (``alignment`` or ``relevance``)."""
        stats = getattr(self, what)
        lengths = [len(enc) for _, enc in encoded]
        if max_tokens is None:
            max_tokens = self.plan(max(lengths), 0, None).align_tokens
        t0 = time.perf_counter()
        while True:
            try:
                self._score_groups(score_group, encoded, lengths, max_tokens, out, stats)
                break
            except torch.OutOfMemoryError:
                if max_tokens <= max(lengths):
                    raise
                self._fallback(f"{what} ran out of memory at {max_tokens} tokens a forward; "
                               f"retried with {max_tokens // 2}")
                max_tokens //= 2
                _release()
        stats["seconds"] += time.perf_counter() - t0
        stats["max_tokens"] = max_tokens

    def _score_groups(self, score_group: Callable, encoded: list, lengths: list[int], max_tokens: int, out: list,
                      stats: dict) -> None:
        inner = self.inner
        pad = inner.tokenizer.pad_token_id
        device = inner.device
        for group in token_budget_groups(lengths, max_tokens):
            width = lengths[group[0]]  # the longest: groups come longest first
            probs = score_group(inner.model, inner.head, [encoded[g][1] for g in group], pad, device, width)
            for g, p in zip(group, probs):
                out[encoded[g][0]] = p
            stats["forwards"] += 1
            stats["tokens"] += sum(lengths[g] for g in group)
            stats["padded_tokens"] += len(group) * width

    def score_pairs(self, case: Case) -> np.ndarray:
        return self.score_all([case])[0]

    def _fallback(self, message: str) -> None:
        if message not in self.fallbacks:
            self.fallbacks.append(message)
            if self.log:
                self.log(f"warning: {message}")

    def engine_used(self) -> str:
        """The decoding that actually ran, in words (a CPU run has no CUDA graph to claim)."""
        device = str(self.inner.device)
        generate = next((f for f in self.fallbacks if f.startswith("generation: ")), None)
        if generate is not None:
            return f"model.generate on {device} ({generate.removeprefix('generation: ')})"
        if not self.decode.batches:
            return f"fast engine on {device}; no answers decoded (alignment and relevance forwards only)"
        step = "CUDA-graphed decode step" if self.decode.cuda_graph else "eager decode step (no CUDA graph)"
        attention = {SDPA_CUDNN: "cuDNN fused attention", MATMUL: "matmul attention"}.get(
            self.decode.attention, f"{self.decode.attention} attention")
        return f"fast engine on {device}: static KV cache, greedy on device, {step}, {attention} over the cache"

    def report(self) -> dict:
        """What ran, for run.json: plans, decoding (CUDA graph or why not), alignment and
        relevance batches."""
        align = dict(self.alignment, seconds=round(self.alignment["seconds"], 3))
        relevance = dict(self.relevance, seconds=round(self.relevance["seconds"], 3))
        return {"engine": self.engine_used(),
                "max_memory_gb": self.max_memory_gb, "plans": self.plans, "decode": self.decode.to_dict(),
                "alignment": align, "relevance": relevance, "fallbacks": self.fallbacks}


def load_checkpoint(export_dir, *, base: str | None = None, device: str | None = None,
                    load_in_4bit: bool | None = None, max_memory_gb: float | None = None, fast: bool = True,
                    log: Callable[[str], None] | None = None):
    """``load_export`` under the memory budget: cap the process at ``max_memory_gb``, merge
    the adapter into dense weights only where they fit, wrap in :class:`FastCheckpoint`.
    Returns (checkpoint, memory record for run.json)."""
    from plumbing.errors import InputError
    from model import loaded_export as ckpt_module
    from model.locate import resolve_device
    from model.export_folder import find_export, read_manifest

    from .memory import GB, apply_memory_cap, available_bytes, should_merge

    device = resolve_device(device)
    record: dict = {"max_memory_gb": apply_memory_cap(max_memory_gb, device), "merge": None}
    if max_memory_gb is not None and record["max_memory_gb"] is None:
        record["note"] = f"--max-memory-gb ignored: device {device} is not CUDA"
        if log:
            log(f"note: {record['note']}")
    merge = None
    budget = available_bytes(device, max_memory_gb)
    if budget is not None:
        arch = {}
        try:
            arch = ckpt_module.preset_from_manifest(read_manifest(find_export(export_dir))).arch
        except (InputError, OSError):
            pass  # load_export reports a bad folder with its own one-line error
        if arch:
            merge, reason = should_merge(arch, budget)
            record.update(merge=merge, merge_reason=reason, budget_before_load_gb=round(budget / GB, 2))
            if not merge and log:
                log(f"memory: {reason}")
    kwargs = {"merge": merge} if merge is not None else {}
    loaded = ckpt_module.load_export(export_dir, base=base, device=device, load_in_4bit=load_in_4bit, **kwargs)
    if fast and isinstance(loaded, ckpt_module.LoadedExport):
        loaded = FastCheckpoint(loaded, max_memory_gb=max_memory_gb, log=log)
    return loaded, record
