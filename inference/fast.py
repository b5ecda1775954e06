"""The fast inference engine around a loaded export: one forward per case where it can.

:meth:`FastEngine.predict` takes everything a run needs for its cases at once (answers,
Subtask 4 pair probabilities, Subtask 2 relevance) and computes each case's head outputs in
the pass that already runs over its tokens:

* a case that is generated *and* scored: its prefill forward (:func:`model.decoding.greedy_decode`)
  runs question + note + answer sentences in one packed stream; the prompt's K/V fill the
  decode cache, its last position gives the first token, and the head reads the note and
  answer sentences' states from the same forward (``prefill_shared`` in :meth:`report`);
* every other scored case: packed forwards without padding (:mod:`model.packed`), several
  cases a forward under a token budget, stopping at the head's layer.

Decoding itself: static KV cache, greedy on the device, CUDA-graphed step, rows per batch
from the memory plan (:mod:`inference.memory`). The :class:`model.loaded_export.LoadedExport`
methods the bench and tests call (``generate_answers``, ``score_all``, ``score_pairs``)
are :meth:`predict` asked for one thing. What ran (plans, fallbacks, timings): :meth:`report`.
"""

from __future__ import annotations

from plumbing.ranges import DEFAULT_NEW_TOKENS
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from plumbing.errors import InputError
from data.prompts import EncodedExample, chat_prompt, encode_examples, example_from_case
from data.records import Case
from model.loaded_export import stop_ids  # the one definition of the stop set
from model.decoding import MATMUL, SDPA_CUDNN, DecodeStats, greedy_decode, supports_fast_decode
from model.fused_ops import TRITON
from model.head_scoring import PackedHeadPass, packed_head_pass
from model.packed import layer_ops, packed_attention, token_budget_packs

from .memory import BatchPlan, plan_batches
from .predictions import NO_RELEVANCE_OUTPUT, ModelOutputs


# A GPU takes ~9x longer over a case's tokens than the host takes to encode them (issue 22,
# one H200: 171k tokens, 2.2 s of forwards, 0.24 s of encoding), so the rest of the cases
# encode within the first eighth's forwards.
FIRST_WAVE_SHARE = 8


def _release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The head's logits as probabilities (fp32, on their device): the formula of both reading
    paths, a case at a time (:meth:`_HeadWork.take`) and a pack at a time (:class:`_PackOnItsWay`)."""
    return torch.sigmoid(logits.float())


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    return _device_probabilities(logits).cpu().numpy().astype(np.float64)


class _HeadWork:
    """The head outputs a predict call owes: which cases, their encodings, and the results.
    Cases are encoded when asked for (:meth:`encode`): the fast engine encodes a first part,
    queues its forwards, and encodes the rest while the GPU runs them (:meth:`waves`)."""

    def __init__(self, head, cases: list[Case], tokenizer, pairs: bool, relevance: bool):
        self.head, self.pairs, self.relevance, self.tokenizer = head, pairs, relevance, tokenizer
        self.out = ModelOutputs()
        owed = [
            i
            for i, case in enumerate(cases)
            # Subtask 4 skips a case without answer sentences
            if (pairs or relevance) and (relevance or bool(case.answer_sentences))
        ]
        wants = {i: pairs and bool(cases[i].answer_sentences) for i in owed}
        self.unencoded = {i: (example_from_case(cases[i], with_answer=wants[i]), wants[i]) for i in owed}
        self.todo: dict[int, EncodedExample] = {}  # encoded, not yet recorded
        self.ids = [c.case_id for c in cases]

    @property
    def owed(self) -> int:
        return len(self.todo) + len(self.unencoded)

    def encode(self, n: int | None = None) -> list[int]:
        """Encode the next ``n`` owed cases (None: all the rest) in one tokenizer call; their indices."""
        keys = list(self.unencoded)[:n]
        examples = [self.unencoded.pop(i) for i in keys]
        wants = [want for _, want in examples]
        self.todo.update(zip(keys, encode_examples(self.tokenizer, [ex for ex, _ in examples], with_answer=wants)))
        return keys

    def waves(self) -> Iterator[list[int]]:
        """The owed cases in two goes: those encoded already, then the rest, encoded only when
        the first go's forwards are queued, so that the host encodes while the GPU runs them."""
        if self.todo:
            yield list(self.todo)
        if self.unencoded:
            yield self.encode()

    def take(self, i: int, hidden: torch.Tensor) -> None:
        """Case ``i``'s head outputs from its hidden states [tokens, H] (the head's layer)."""
        enc = self.todo[i]
        out = self.head(hidden, enc.note_spans, enc.answer_spans)
        relevance = None if out.relevance_logits is None else _probabilities(out.relevance_logits)
        self.record(i, _probabilities(out.pair_logits), relevance)

    def record(self, i: int, pairs: np.ndarray, relevance: np.ndarray | None) -> None:
        """Case ``i``'s probabilities (float64 arrays); the case is no longer owed."""
        enc = self.todo.pop(i)
        if self.pairs and enc.answer_spans:
            self.out.pairs[self.ids[i]] = pairs
        if self.relevance:
            assert relevance is not None  # predict checked that the head has a relevance output
            self.out.relevance[self.ids[i]] = relevance


class _PackOnItsWay:
    """A pack's probabilities on their way to the host: computed on the device and copied into
    pinned memory without waiting; :meth:`record` waits for them. The engine records a pack
    only after queuing the next, so the GPU does not wait for the host between packs."""

    def __init__(self, cases: list[int], run: PackedHeadPass):
        self.cases, self.run = cases, run
        out = run.output
        self.pairs = self._start_copy(out.pair_logits)
        self.relevance = None if out.relevance_logits is None else self._start_copy(out.relevance_logits)
        self.copied: torch.cuda.Event | None = None
        if out.pair_logits.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    @staticmethod
    def _start_copy(logits: torch.Tensor) -> torch.Tensor:
        probs = _device_probabilities(logits)
        if not probs.is_cuda:
            return probs
        host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
        return host.copy_(probs, non_blocking=True)

    def record(self, work: _HeadWork) -> None:
        if self.copied is not None:
            self.copied.synchronize()
        pairs = self.pairs.numpy().astype(np.float64)
        relevance = None if self.relevance is None else self.relevance.numpy().astype(np.float64)
        for i, (p, r) in zip(self.cases, self.run.split(pairs, relevance)):
            work.record(i, p, r)


class FastEngine:
    """A loaded export whose generation and head forwards run the fast paths."""

    def __init__(
        self,
        loaded,
        max_memory_gb: float | None = None,
        use_cuda_graph: bool | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.inner = loaded
        self.max_memory_gb = max_memory_gb
        self.use_cuda_graph = use_cuda_graph
        self.log = log
        self.plans: list[dict] = []
        self.decode = DecodeStats()
        # the head's own packed forwards (cases not generated, or whose tokens differ from the prompt's)
        self.alignment: dict = {"forwards": 0, "tokens": 0, "padded_tokens": 0, "seconds": 0.0}
        self.head_cases = {"prefill_shared": 0, "own_forwards": 0}
        self.fallbacks: list[str] = []
        # The packed forwards' cases are encoded in two goes on a GPU (the first share, then the
        # rest while the GPU runs the first's forwards); one go where nothing runs ahead of the host.
        self.first_wave_share = FIRST_WAVE_SHARE if torch.device(str(loaded.device)).type == "cuda" else None

    # the LoadedExport attributes the pipeline reads (manifest, threshold, tokenizer, model, head)
    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def plan(self, prompt_tokens: int, max_new_tokens: int, max_rows: int | None) -> BatchPlan:
        plan = plan_batches(
            self.inner.model,
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
            max_rows=max_rows,
            max_memory_gb=self.max_memory_gb,
        )
        self.plans.append(plan.to_dict())
        return plan

    @torch.no_grad()
    def predict(
        self,
        cases: list[Case],
        *,
        answers: bool = False,
        pairs: bool = False,
        relevance: bool = False,
        max_new_tokens: int = DEFAULT_NEW_TOKENS,
        batch_size: int | None = None,
        max_tokens: int | None = None,
    ) -> ModelOutputs:
        """Answers (raw text, as ``LoadedExport.generate_answers``), pair probabilities
        (cases with answer sentences) and relevance probabilities, each where asked. A case
        that is generated gets its head outputs from its prefill forward; the others from
        packed forwards of at most ``max_tokens`` tokens (None: from free memory)."""
        if relevance and getattr(self.inner.head, "relevance_mlp", None) is None:
            raise InputError(NO_RELEVANCE_OUTPUT)
        work = _HeadWork(self.inner.head, cases, self.inner.tokenizer, pairs, relevance)
        texts = self._generate(cases, work, max_new_tokens, batch_size) if answers else None
        if work.owed:
            self._score_packed(work, max_tokens)
        order = [c.case_id for c in cases]  # in the order of ``cases``, whatever order the passes ran in
        out = ModelOutputs(
            pairs={k: work.out.pairs[k] for k in order if k in work.out.pairs},
            relevance={k: work.out.relevance[k] for k in order if k in work.out.relevance},
        )
        if texts is not None:
            out.answers = dict(zip([c.case_id for c in cases], texts))
        return out

    def generate_answers(
        self, cases: list[Case], max_new_tokens: int = DEFAULT_NEW_TOKENS, batch_size: int | None = None
    ) -> list[str]:
        """Greedy answers as :meth:`LoadedExport.generate_answers` gives them; ``batch_size``
        caps the rows decoded together (None: as many as memory allows)."""
        got = self.predict(cases, answers=True, max_new_tokens=max_new_tokens, batch_size=batch_size).answers
        return [got[c.case_id] for c in cases]

    def score_all(
        self, cases: list[Case], batch_size: int | None = None, max_tokens: int | None = None
    ) -> list[np.ndarray]:
        """Link probabilities as :meth:`LoadedExport.score_all` computes them, in packed
        forwards (``batch_size``, the plain path's rows a forward, is accepted and unused)."""
        got = self.predict(cases, pairs=True, max_tokens=max_tokens).pairs
        return [
            got[c.case_id] if c.answer_sentences else np.zeros((0, len(c.note_sentences)), dtype=np.float32)
            for c in cases
        ]

    def score_pairs(self, case: Case) -> np.ndarray:
        return self.score_all([case])[0]

    def _generate(self, cases: list[Case], work: _HeadWork, max_new_tokens: int, batch_size: int | None) -> list[str]:
        """Generated text per case; the head outputs of every case whose encoding starts with
        its generation prompt come from the prefill forward (``work.take``)."""
        why_not = supports_fast_decode(self.inner.model)
        if why_not:
            self._fallback(f"generation: {why_not}; using model.generate")
            return self.inner.generate_answers(cases, max_new_tokens=max_new_tokens, batch_size=batch_size or 16)
        tok = self.inner.tokenizer
        prompts = [chat_prompt(tok, example_from_case(c, with_answer=False))[0] for c in cases]
        ids = tok(prompts, add_special_tokens=False)["input_ids"]  # one call: a batch encodes on several threads
        extras: list[list[int]] = [[] for _ in cases]
        shared = set()
        work.encode()  # all of them: which prompts serve the head is known only from the tokens
        for i, enc in work.todo.items():
            if enc.input_ids[: len(ids[i])] == ids[i]:  # same tokens: the prompt's forward serves the head
                extras[i] = enc.input_ids[len(ids[i]) :]
                shared.add(i)

        def on_hidden(i: int, hidden: torch.Tensor) -> None:
            if i in shared and i in work.todo:
                work.take(i, hidden)

        new = self._decode(ids, extras, on_hidden, max_new_tokens, batch_size)
        self.head_cases["prefill_shared"] += len(shared)
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    def _decode(self, ids, extras, on_hidden, max_new_tokens: int, batch_size: int | None) -> list[list[int]]:
        """greedy_decode under the memory plan; an out-of-memory halves rows and prefill (said, recorded)."""
        tok = self.inner.tokenizer
        plan = self.plan(max(len(x) for x in ids), max_new_tokens, batch_size)
        prefill, budget = plan.prefill_tokens, plan.decode_budget_bytes
        # gen_rows is the plan at the longest prompt; with a memory budget the shorter batches
        # after it take more rows (only the user's --batch-size caps them).
        rows = plan.gen_rows if batch_size is not None or budget is None else len(ids)
        while True:
            try:
                new = greedy_decode(
                    self.inner.model,
                    ids,
                    max_new_tokens=max_new_tokens,
                    stop_ids=stop_ids(tok),
                    pad_id=tok.pad_token_id,
                    batch_rows=rows,
                    prefill_tokens=prefill,
                    use_cuda_graph=self.use_cuda_graph,
                    stats=self.decode,
                    log=self.log,
                    extras=extras,
                    tap=self.inner.head.config.layer,
                    on_hidden=on_hidden,
                    decode_budget_bytes=budget,
                    row_overhead_bytes=plan.row_overhead_bytes,
                )
                break
            except torch.OutOfMemoryError:
                widest = min(rows, plan.gen_rows)  # rows of the first (longest) batch
                if widest == 1 and prefill <= 1024:
                    raise
                # The plan was wrong for this card: said, recorded, and retried smaller.
                self._fallback(
                    f"generation ran out of memory at {widest} rows / {prefill} prefill tokens; "
                    f"retried with {max(1, widest // 2)} / {max(1024, prefill // 2)}"
                )
                rows, prefill = max(1, widest // 2), max(1024, prefill // 2)
                budget = None if budget is None else budget // 2
                _release()
        for kind in ("graph", "attention"):  # greedy_decode said these as they happened
            why = getattr(self.decode, f"{kind}_fallback")
            if why and f"{kind}: {why}" not in self.fallbacks:
                self.fallbacks.append(f"{kind}: {why}")
        if self.decode.prefill_attention_fallback:
            self._fallback(f"prefill attention: {self.decode.prefill_attention_fallback}; one SDPA per prompt")
        if self.decode.elementwise_fallback:
            self._fallback(f"element-wise ops: {self.decode.elementwise_fallback}; eager torch ops")
        return new

    def _score_packed(self, work: _HeadWork, max_tokens: int | None) -> None:
        """The head outputs still owed, in packed forwards longest first; an out-of-memory halves
        the token budget (said, recorded) and retries the cases not yet done."""
        t0 = time.perf_counter()
        self.head_cases["own_forwards"] += work.owed
        if not work.todo:
            work.encode(max(1, work.owed // self.first_wave_share) if self.first_wave_share else None)
        if max_tokens is None:
            max_tokens = self.plan(max(len(enc) for enc in work.todo.values()), 0, None).align_tokens
        while work.owed:
            try:
                self._packed_forwards(work, max_tokens)
            except torch.OutOfMemoryError:
                if max_tokens <= max((len(enc) for enc in work.todo.values()), default=0):
                    raise
                self._fallback(
                    f"alignment ran out of memory at {max_tokens} tokens a forward; retried with {max_tokens // 2}"
                )
                max_tokens //= 2
                _release()
        self.alignment["seconds"] += time.perf_counter() - t0
        self.alignment["max_tokens"] = max_tokens

    def _packed_forwards(self, work: _HeadWork, max_tokens: int) -> None:
        model, head = self.inner.model, self.inner.head
        attention, why_not = packed_attention(model)
        if why_not:
            self._fallback(f"alignment attention: {why_not}; one SDPA per case")
        self.alignment["attention"] = attention
        ops, why_not = layer_ops(model)
        if why_not:
            self._fallback(f"element-wise ops: {why_not}; eager torch ops")
        self.alignment["elementwise"] = ops.name
        on_its_way: _PackOnItsWay | None = None
        for wave in work.waves():
            for group in token_budget_packs([len(work.todo[i]) for i in wave], max_tokens):
                cases = [wave[g] for g in group]
                tokens = sum(len(work.todo[i]) for i in cases)
                run = packed_head_pass(model, head, [work.todo[i] for i in cases], attention)
                if on_its_way is not None:  # the pack before, recorded while this one runs
                    on_its_way.record(work)
                on_its_way = _PackOnItsWay(cases, run)
                self.alignment["forwards"] += 1
                self.alignment["tokens"] += tokens
                self.alignment["padded_tokens"] += tokens  # packed: no padding
        if on_its_way is not None:
            on_its_way.record(work)

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
            self.decode.attention, f"{self.decode.attention} attention"
        )
        engine = f"fast engine on {device}: static KV cache, greedy on device, {step}, {attention} over the cache"
        return engine + (", Triton element-wise kernels" if self.decode.elementwise == TRITON else "")

    def report(self) -> dict:
        """What ran, for run.json: plans, decoding (CUDA graph or why not), the head's forwards."""
        align = dict(self.alignment, seconds=round(self.alignment["seconds"], 3))
        return {
            "engine": self.engine_used(),
            "max_memory_gb": self.max_memory_gb,
            "plans": self.plans,
            "decode": self.decode.to_dict(),
            "alignment": align,
            "head_cases": dict(self.head_cases),
            "fallbacks": self.fallbacks,
        }


def load_for_inference(
    export_dir,
    *,
    base: str | None = None,
    device: str | None = None,
    load_in_4bit: bool | None = None,
    max_memory_gb: float | None = None,
    fast: bool = True,
    log: Callable[[str], None] | None = None,
    merge: bool | None = None,
):
    """``load_export`` under the memory budget: cap the process at ``max_memory_gb``, merge
    the adapter into dense weights only where they fit, wrap in :class:`FastEngine`.
    ``merge`` forces the choice either way. Returns (the loaded export, memory record for
    run.json, with the load's steps in seconds and which loader ran)."""
    started = time.perf_counter()
    from model import loaded_export as export_module
    from model.locate import resolve_device
    from model.export_folder import find_export, read_manifest

    from .memory import GB, apply_memory_cap, available_bytes, should_merge

    device = resolve_device(device)
    record: dict = {"max_memory_gb": apply_memory_cap(max_memory_gb, device), "merge": None}
    if max_memory_gb is not None and record["max_memory_gb"] is None:
        record["note"] = f"--max-memory-gb ignored: device {device} is not CUDA"
        if log:
            log(f"note: {record['note']}")
    budget = available_bytes(device, max_memory_gb)
    if merge is not None:
        record.update(merge=merge, merge_reason="asked for")
    elif budget is not None:
        arch = {}
        try:
            arch = export_module.preset_from_manifest(read_manifest(find_export(export_dir))).arch
        except (InputError, OSError):
            pass  # load_export reports a bad folder with its own one-line error
        if arch:
            merge, reason = should_merge(arch, budget)
            record.update(merge=merge, merge_reason=reason, budget_before_load_gb=round(budget / GB, 2))
            if not merge and log:
                log(f"memory: {reason}")
    # the first CUDA call of the process (context, allocator) and the imports before it
    steps = {"start_s": round(time.perf_counter() - started, 3)}
    kwargs = {"merge": merge} if merge is not None else {}
    loaded = export_module.load_export(
        export_dir, base=base, device=device, load_in_4bit=load_in_4bit, timings=steps, engine_only=fast, **kwargs
    )
    record["load_steps_s"] = steps
    record["loader"] = getattr(loaded, "loader", "transformers")
    if record["loader"].startswith("transformers: ") and log:  # the standalone load applied, and did not run
        log(
            f"note: model loaded through transformers ({record['loader'].removeprefix('transformers: ')}), not standalone"
        )
    if fast and isinstance(loaded, export_module.LoadedExport):
        loaded = FastEngine(loaded, max_memory_gb=max_memory_gb, log=log)
    return loaded, record
