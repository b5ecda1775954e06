"""Case-grouped cross-validation of every rung of the baseline ladder.

    python score.py cv --xml X --key K --folds 5 [--preset tiny] [--init DOMAIN] --out DIR

Per fold: the retrieval systems choose their settings on the training cases, the task
stage (with the joint head) trains on the training cases written to
``DIR/folds/k/train.xml`` + ``train_key.json``, and every system predicts the held-out
cases, which reach it blinded (no key). Held-out predictions of all folds are pooled
into one submission per system (``DIR/submissions/<system>/``) and scored once, as
the official scorer would; bootstrap intervals resample cases.

Outputs: ``ladder.md`` / ``ladder.json``, ``errors.md``, ``pr_curve.png``,
``f1_vs_threshold.png``, ``loss_curves.png``, ``report.html`` (all of it and every held-out case, to
read in a browser), ``folds/k/fold.json`` (what each fold
chose and on which case ids) and ``cv.json``. Every input is checked, and a request
to score on training cases refused, before anything is written.
"""

from __future__ import annotations

from plumbing.ranges import DEFAULT_NEW_TOKENS
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from baselines.ensemble import gold_matrix
from baselines.extractive import extractive_answer
from data.archehr import load_cases
from plumbing.atomic import OutputSet, check_output_set_target, write_json_atomic, write_text_atomic
from plumbing.errors import InputError
from data.records import Case
from data.submission import subtask2_entries, subtask3_entries, subtask4_entries, write_submission
from metrics.alignment import score_alignment
from metrics.generation import score_generation
from metrics.training_cases import TRAINING_CASES_LABEL
from reports.cases import CasePrediction
from reports.page import REPORT_NAME, write_report

from . import plots
from .bootstrap import (
    ALIGNMENT_KEYS,
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    bootstrap_alignment,
    bootstrap_difference,
    bootstrap_mean,
    micro_from_counts,
    pair_counts,
    resample_indices,
)
from .folds import (
    Fold,
    assert_chosen_on_training_cases,
    blind,
    check_folds,
    plan_folds,
)
from . import relevance as subtask2
from .head import HeadFold, fold_config, parse_settings, run_head_fold
from .ladder import ladder_markdown
from .report import cv_report_page, error_report_markdown
from .systems import (
    ALL_SYSTEMS,
    HEAD_LABEL,
    HEAD_SYSTEM,
    RETRIEVAL_SYSTEMS,
    Fitted,
    Prediction,
    compute_component_scores,
    fit_system,
    predict_system,
)

ROOT = Path(__file__).resolve().parents[1]
# What a cross-validation writes into --out: anything else there is the user's and is never replaced.
CV_OUTPUT_NAMES = re.compile(
    r"^(folds|submissions|cv\.json|ladder\.(md|json)|errors\.md|report\.html|[a-z0-9_]+\.png)$"
)
EXTRACTIVE_SYSTEM = "extractive"
MODEL_SYSTEM = "model"
REFERENCE_SYSTEM = "ensemble"  # the ladder's paired differences are against it
HELD_OUT_NOTICE = (
    "Scores are on HELD-OUT cases: every case was predicted by systems that neither trained nor "
    "chose any setting (threshold, weights) on it; held-out predictions of all folds are pooled "
    "and scored once."
)
TRAINING_NOTICE = (
    f"{TRAINING_CASES_LABEL}: these systems were trained and tuned on the very cases they are "
    "scored on (--allow-train-cases). These numbers overstate what to expect on new cases."
)
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    """Progress and notes; the summary (:func:`print_summary`) is what goes to stdout."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class CVOptions:
    xml: Path
    key: Path
    out: Path
    folds: int = 5
    preset: str = "tiny"
    init: str | None = None
    config: Path | None = None  # training TOML (default: configs/task.toml)
    settings: Sequence[str] = ()  # --set key=value training overrides
    systems: Sequence[str] = ALL_SYSTEMS
    allow_train_cases: bool = False
    eval_on_train: bool = False
    seed: int = 0
    n_resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    generate: bool = True  # the model's Subtask 3 answers (needs the head system's training)
    device: str | None = None
    progress: bool = True
    overwrite: bool = False  # replace an earlier cross-validation's whole output set in ``out``


@dataclass
class CVResult:
    out_dir: Path
    ladder: dict
    folds: list[dict]
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def data_provenance(xml: Path) -> str:
    """A line saying what the scored data are; the project's own fixtures are invented."""
    resolved = Path(xml).resolve()
    invented_roots = [ROOT / "examples", ROOT.parent / "shared" / "fixtures", ROOT / "tests" / "fixtures"]
    if any(resolved.is_relative_to(r.resolve()) for r in invented_roots if r.exists()) or "fixture" in str(resolved):
        return (
            f"Data: {Path(xml).name} is an INVENTED fixture set: these numbers test the pipeline and are not a "
            "claim about real clinical data."
        )
    return (
        f"Data: {Path(xml).name} as given by the user. With few cases the intervals are wide; the project's "
        "own fixtures are invented and say nothing about real clinical data."
    )


def _check_init_settings(init: str, settings: dict) -> None:
    """An explicit --lora_* / --head_* that differs from the --init export's is refused, as train.py does:
    every fold loads that adapter and head as trained."""
    import dataclasses

    from training.config import TrainConfig
    from training.init_settings import check_init_settings

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in settings.items() if k in known}
    check_init_settings(dataclasses.replace(TrainConfig(), **given), init, explicit=given)


def _check_options(opts: CVOptions) -> tuple[list[Case], dict, str | None]:
    unknown = [s for s in opts.systems if s not in ALL_SYSTEMS]
    if unknown or not opts.systems:
        raise InputError(f"--systems must name some of {', '.join(ALL_SYSTEMS)}; got {list(opts.systems)}")
    if opts.n_resamples < 100:
        raise InputError("--resamples must be >= 100")
    if opts.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be >= 1")
    check_output_set_target(Path(opts.out), opts.overwrite, CV_OUTPUT_NAMES)  # before any work
    settings = parse_settings(opts.settings)
    init = None
    if opts.init:
        from training.run import resolve_init

        init = str(resolve_init(opts.init))
        _check_init_settings(init, settings)
    if opts.config is not None and not Path(opts.config).is_file():
        raise InputError("config file not found", opts.config)
    # Every training setting checked now, as a fold will build it, before any folder is made.
    fold_config(
        Path(opts.out) / "folds" / "0",
        preset=opts.preset,
        init=init,
        seed=opts.seed,
        settings=settings,
        config_file=opts.config,
        progress=opts.progress,
    )
    cases = load_cases(opts.xml, opts.key)
    keyed = [c for c in cases if c.has_key and c.answer_sentences]
    if not keyed:
        raise InputError("no case has both a key entry and answer sentences", opts.key)
    if not any(c.has_citations() for c in keyed):
        raise InputError("the key cites no evidence: nothing to evaluate alignment against", opts.key)
    return keyed, settings, init


def _fold_record(fold: Fold, fitted: dict[str, Fitted], head: HeadFold | None) -> dict:
    thresholds = {
        name: {"threshold": f.threshold, "mode": f.mode, "params": f.params, "chosen_on": sorted(f.chosen_on)}
        for name, f in fitted.items()
    }
    record = {
        "index": fold.index,
        "train_ids": list(fold.train_ids),
        "test_ids": list(fold.test_ids),
        "evaluates_on_training_cases": fold.evaluates_on_training_cases,
        "thresholds": thresholds,
    }
    if head is not None:
        summary = head.summary()
        thresholds[HEAD_SYSTEM] = {
            "threshold": head.threshold,
            "mode": "absolute",
            "params": {"calibration": head.calibration},
            "chosen_on": sorted(head.chosen_on),
        }
        if head.relevance_threshold is not None:
            thresholds["head-relevance"] = {
                "threshold": head.relevance_threshold,
                "mode": "absolute",
                "params": {"for": "strict micro F1"},
                "chosen_on": sorted(head.relevance_chosen_on),
            }
        record["head"] = summary
    return record


def _round(d: dict) -> dict:
    return {k: (None if v is None else round(float(v), 4)) for k, v in d.items()}


@dataclass
class _Plan:
    """What a cross-validation run does, decided (and every input checked) before any work."""

    opts: CVOptions
    keyed: list[Case]
    settings: dict
    init: str | None
    folds: list[Fold]
    on_training: bool
    notice: list[str]
    systems: list[str]
    out: Path  # where the outputs are written: run_cv's staging folder
    final: Path  # where they will be once complete (--out): what records name

    @property
    def ids(self) -> list[str]:
        return [c.case_id for c in self.keyed]

    @property
    def by_id(self) -> dict[str, Case]:
        return {c.case_id: c for c in self.keyed}

    @property
    def retrieval(self) -> list[str]:
        return [s for s in self.systems if s in RETRIEVAL_SYSTEMS]

    @property
    def use_head(self) -> bool:
        return HEAD_SYSTEM in self.systems


@dataclass
class _Pooled:
    """Every fold's held-out predictions and choices, pooled over the folds."""

    predictions: dict[str, dict[str, Prediction]]
    labelled: bool  # Subtask 2 needs every case's relevance labels
    answers: dict[str, str] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)
    relevance: dict[str, np.ndarray] = field(default_factory=dict)
    relevance_threshold: dict[str, float] = field(default_factory=dict)
    baseline_relevance: dict[str, list[str]] = field(default_factory=dict)
    fold_of: dict[str, int] = field(default_factory=dict)
    chosen_thresholds: dict[str, list[float]] = field(default_factory=lambda: {HEAD_SYSTEM: [], "ensemble": []})
    logs: dict[str, Path] = field(default_factory=dict)
    fold_records: list[dict] = field(default_factory=list)


def _plan(opts: CVOptions, log: Log) -> _Plan:
    keyed, settings, init = _check_options(opts)
    ids = [c.case_id for c in keyed]
    folds = plan_folds(
        ids, opts.folds, opts.seed, eval_on_train=opts.eval_on_train, allow_train_cases=opts.allow_train_cases
    )
    check_folds(folds, ids, allow_train_cases=opts.allow_train_cases)
    on_training = any(f.evaluates_on_training_cases for f in folds)
    notice = [TRAINING_NOTICE if on_training else HELD_OUT_NOTICE, data_provenance(opts.xml)]
    systems = [s for s in ALL_SYSTEMS if s in opts.systems]
    if HEAD_SYSTEM in systems:
        notice.append(
            f"Task stage: preset {opts.preset}, "
            + (
                f"initialised from {init}."
                if init
                else "no --init: every fold's task stage starts from a FRESH adapter and head (no domain stage)."
            )
        )
    out = Path(opts.out)  # run_cv builds everything aside and swaps it in at the end
    for line in notice:
        log(line)
    log(f"{len(keyed)} keyed cases, {len(folds)} fold(s), systems: {', '.join(systems)}")
    return _Plan(opts, keyed, settings, init, folds, on_training, notice, systems, out, out)


def _run_fold(plan: _Plan, fold: Fold, component_scores, pooled: _Pooled, log: Log) -> None:
    """Fit every system on the fold's training cases and predict its held-out cases into ``pooled``."""
    opts, by_id = plan.opts, plan.by_id
    fold_dir = plan.out / "folds" / str(fold.index)
    fold_dir.mkdir(parents=True, exist_ok=True)
    train = [by_id[c] for c in fold.train_ids]
    held_out = [blind(by_id[c]) for c in fold.test_ids]
    fitted: dict[str, Fitted] = {}
    for system in plan.retrieval:
        f = fit_system(system, train, component_scores)
        assert_chosen_on_training_cases(f.chosen_on, fold, f"{system} threshold")
        fitted[system] = f
        for case in held_out:
            pooled.predictions[system][case.case_id] = predict_system(f, case, component_scores)
    if "ensemble" in fitted and fitted["ensemble"].mode == "absolute":
        pooled.chosen_thresholds["ensemble"].append(float(fitted["ensemble"].threshold))
    head = None
    if plan.use_head:
        log(f"fold {fold.index}: training the task stage on {len(train)} case(s) -> {fold_dir / 'run'}")
        head = run_head_fold(
            fold_dir,
            train,
            held_out,
            preset=opts.preset,
            init=plan.init,
            seed=opts.seed,
            settings=plan.settings,
            config_file=opts.config,
            max_new_tokens=opts.max_new_tokens,
            device=opts.device,
            progress=opts.progress,
            generate=opts.generate,
        )
        assert_chosen_on_training_cases(head.chosen_on, fold, "head threshold")
        assert_chosen_on_training_cases(head.relevance_chosen_on, fold, "head relevance threshold")
        pooled.predictions[HEAD_SYSTEM].update(head.predictions)
        pooled.answers.update(head.answers)
        pooled.fallback += head.extractive_fallback
        pooled.relevance.update(head.relevance)
        if head.relevance_threshold is not None:
            pooled.relevance_threshold.update({c: head.relevance_threshold for c in fold.test_ids})
        pooled.chosen_thresholds[HEAD_SYSTEM].append(head.threshold)
        pooled.logs[f"fold {fold.index}"] = head.run_dir / "log.jsonl"
    for cid in fold.test_ids:
        pooled.fold_of[cid] = fold.index
    record = _fold_record(fold, fitted, head)
    if pooled.labelled:
        fold_relevance, record["thresholds"][subtask2.BASELINE_SYSTEM] = subtask2.baseline_fold(train, held_out)
        pooled.baseline_relevance.update(fold_relevance)
    record = _relocated(record, plan.out, plan.final)  # the paths it will have once in place
    write_json_atomic(fold_dir / "fold.json", record)
    pooled.fold_records.append(record)


def _subtask4(plan: _Plan, pooled: _Pooled, indices: np.ndarray, labels: dict[str, str]) -> list[dict]:
    """Each system's pooled Subtask 4 submission and scores with intervals (and paired differences)."""
    ids, by_id, systems, opts = plan.ids, plan.by_id, plan.systems, plan.opts
    gold = {c.case_id: c.gold_pairs() for c in plan.keyed}
    st4_rows = []
    counts: dict[str, np.ndarray] = {}
    for system in systems:
        pred = {cid: pooled.predictions[system][cid].pairs for cid in ids}
        entries = subtask4_entries(
            {
                cid: {
                    aid: sorted((n for (a, n) in pred[cid] if a == aid), key=by_id[cid].note_ids.index)
                    for aid in by_id[cid].answer_ids
                }
                for cid in ids
            }
        )
        write_submission(entries, plan.out / "submissions" / system, 4, plan.keyed)
        scores = score_alignment(pred, gold)
        counts[system] = pair_counts(pred, gold, ids)
        ci = bootstrap_alignment(counts[system], indices, opts.level)
        st4_rows.append(
            {
                "system": system,
                "label": labels[system],
                "scores": _round({k: scores[k] for k in ALIGNMENT_KEYS}),
                "ci": {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in ci.items()},
            }
        )
    if REFERENCE_SYSTEM in counts:
        # Paired over the same resamples: is a system's micro F1 really above or below the ensemble's?
        for row in st4_rows:
            lo, hi = bootstrap_difference(
                counts[row["system"]], counts[REFERENCE_SYSTEM], indices, "micro_f1", opts.level
            )
            row["micro_f1_minus_ensemble"] = {
                "value": round(
                    row["scores"]["micro_f1"] - st4_rows[systems.index(REFERENCE_SYSTEM)]["scores"]["micro_f1"], 4
                ),
                "ci": [round(lo, 4), round(hi, 4)],
            }
    return st4_rows


def _ladder(plan: _Plan, st4_rows: list[dict], st3_rows, st2, fold_records: list[dict]) -> dict:
    opts = plan.opts
    return {
        "title": ("Baseline ladder — " + (TRAINING_CASES_LABEL if plan.on_training else "held-out cases")),
        "evaluated_on": TRAINING_CASES_LABEL if plan.on_training else "held-out cases",
        "notice": plan.notice,
        "xml": str(opts.xml),
        "key": str(opts.key),
        "n_cases": len(plan.keyed),
        "n_folds": len(plan.folds),
        "seed": opts.seed,
        "n_resamples": opts.n_resamples,
        "level": opts.level,
        "subtask4": st4_rows,
        "subtask3": st3_rows,
        "subtask2": st2,
        "folds": fold_records,
    }


def _write_reports(plan: _Plan, pooled: _Pooled, ladder: dict, labels: dict[str, str]) -> dict[str, Path]:
    """ladder.json/.md, errors.md and the plots (cv.json comes last, from run_cv)."""
    out, systems = plan.out, plan.systems
    files = {
        "ladder_md": out / "ladder.md",
        "ladder_json": out / "ladder.json",
        "errors": out / "errors.md",
        "pr_curve": out / "pr_curve.png",
        "f1_vs_threshold": out / "f1_vs_threshold.png",
        "loss_curves": out / "loss_curves.png",
        "report": out / REPORT_NAME,
        "cv": out / "cv.json",
    }
    write_json_atomic(files["ladder_json"], ladder)
    ladder_md = ladder_markdown(ladder)
    write_text_atomic(files["ladder_md"], ladder_md)

    report_systems = [s for s in (HEAD_SYSTEM, "ensemble") if s in systems] or systems[-1:]
    write_text_atomic(
        files["errors"],
        error_report_markdown(
            plan.keyed, {s: pooled.predictions[s] for s in report_systems}, pooled.fold_of, labels, plan.notice
        ),
    )
    _plots(
        plan.keyed,
        pooled.predictions,
        pooled.chosen_thresholds,
        pooled.logs,
        files,
        plan.on_training,
        plan.notice[1],
        f"data: {Path(plan.opts.xml).name}",
    )
    predictions, shown = _case_predictions(plan, pooled, report_systems[0], labels)
    images = [
        ("Precision-recall over held-out (answer, note) pairs", files["pr_curve"]),
        ("Held-out pair F1 against the threshold", files["f1_vs_threshold"]),
        ("Task-stage training loss per fold", files["loss_curves"]),
    ]
    write_report(files["report"], cv_report_page(plan.keyed, predictions, shown, ladder_md, images))
    return files


def _case_predictions(
    plan: _Plan, pooled: _Pooled, system: str, labels: dict[str, str]
) -> tuple[dict[str, CasePrediction], str]:
    """What report.html shows of each held-out case: ``system``'s links, the head's relevance (else the
    question baseline's) and the model's answers; and a line saying so."""
    ids = plan.ids
    head_relevance = all(c in pooled.relevance and c in pooled.relevance_threshold for c in ids)
    relevant = (
        subtask2.head_predictions(plan.keyed, pooled.relevance, pooled.relevance_threshold)
        if head_relevance
        else pooled.baseline_relevance
    )
    out = {}
    for case in plan.keyed:
        pairs = pooled.predictions[system][case.case_id].pairs
        out[case.case_id] = CasePrediction(
            answer=pooled.answers.get(case.case_id),
            relevant_ids=relevant.get(case.case_id),
            relevance_scores=pooled.relevance[case.case_id] if head_relevance else None,
            links={a: [n for n in case.note_ids if (a, n) in pairs] for a in case.answer_ids},
        )
    relevance_by = HEAD_SYSTEM if head_relevance else subtask2.BASELINE_SYSTEM if pooled.baseline_relevance else None
    answers = "the model's generated answers" if pooled.answers else "not generated"
    if pooled.fallback:
        answers += f" ({len(pooled.fallback)} of {len(ids)} empty, shown with the extractive answer given instead)"
    shown = (
        f"Each case as predicted in the fold that held it out. Subtask 4: {system} ({labels[system]}); "
        f"Subtask 2: {relevance_by or 'not available (no relevance labels)'}; Subtask 3: {answers}."
    )
    return out, shown


def run_cv(opts: CVOptions, log: Log = _stderr) -> CVResult:
    """Cross-validate the requested systems and write every output into ``opts.out``, all or nothing:
    built in a hidden sibling folder and renamed into place only when complete (a failed or interrupted
    run leaves nothing that blocks the retry)."""
    started = time.perf_counter()
    plan = _plan(opts, log)
    final = Path(opts.out)
    with OutputSet(final, opts.overwrite, CV_OUTPUT_NAMES) as stage:
        plan.out = stage
        ladder, pooled, files = _cross_validate(plan, opts, log)
        seconds = time.perf_counter() - started
        shown = {k: final / v.relative_to(stage) for k, v in files.items()}  # where they are once in place
        write_json_atomic(
            files["cv"],
            {
                "command": "score.py cv",
                "evaluated_on": ladder["evaluated_on"],
                "notice": plan.notice,
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
                "systems": plan.systems,
                "folds": [
                    {"index": f.index, "train_ids": list(f.train_ids), "test_ids": list(f.test_ids)} for f in plan.folds
                ],
                "seconds": round(seconds, 1),
                "files": {k: str(v) for k, v in shown.items()},
            },
        )
    plan.out = final
    return CVResult(final, ladder, pooled.fold_records, seconds, shown)


def _relocated(value, stage: Path, final: Path):
    """``value`` (a record) with paths under the staging folder named where they will be once in place."""
    if isinstance(value, dict):
        return {k: _relocated(v, stage, final) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocated(v, stage, final) for v in value]
    if isinstance(value, (str, Path)) and str(value).startswith(str(stage)):
        moved = str(final) + str(value)[len(str(stage)) :]
        return Path(moved) if isinstance(value, Path) else moved
    return value


def _cross_validate(plan: _Plan, opts: CVOptions, log: Log) -> tuple[dict, _Pooled, dict[str, Path]]:
    """Every fold, then the pooled scores, submissions, reports and plots under ``plan.out`` (the staging
    folder; the records name ``plan.final``)."""
    from tqdm.auto import tqdm

    # Unsupervised per-case scores, computed once on blinded cases (nothing crosses cases).
    component_scores = compute_component_scores([blind(c) for c in plan.keyed], plan.retrieval)
    pooled = _Pooled({s: {} for s in plan.systems}, labelled=all(c.relevance for c in plan.keyed))
    for fold in tqdm(plan.folds, desc="folds", unit="fold", disable=not opts.progress):
        _run_fold(plan, fold, component_scores, pooled, log)

    # --- pool and score once -------------------------------------------------------
    indices = resample_indices(len(plan.keyed), opts.n_resamples, opts.seed)
    labels = {**RETRIEVAL_SYSTEMS, HEAD_SYSTEM: HEAD_LABEL}
    st4_rows = _subtask4(plan, pooled, indices, labels)
    model_answers = pooled.answers if (plan.use_head and opts.generate) else None
    st3_rows = _subtask3(plan.keyed, model_answers, pooled.fallback, indices, opts, plan.out)
    st2 = _subtask2(
        plan.keyed, pooled.relevance, pooled.relevance_threshold, pooled.baseline_relevance, indices, opts, plan.out
    )
    ladder = _ladder(plan, st4_rows, st3_rows, st2, pooled.fold_records)
    return ladder, pooled, _write_reports(plan, pooled, ladder, labels)


def _subtask3(
    keyed: list[Case],
    model_answers: dict[str, str] | None,
    fallback: list[str],
    indices: np.ndarray,
    opts: CVOptions,
    out: Path,
) -> list[dict]:
    ids = [c.case_id for c in keyed]
    references = {
        c.case_id: c.clinician_answer_without_citations or " ".join(a.text for a in c.answer_sentences) for c in keyed
    }
    if not all(r.strip() for r in references.values()):
        return []
    sources = {c.case_id: c.patient_narrative for c in keyed}
    runs = {
        EXTRACTIVE_SYSTEM: (
            {c.case_id: extractive_answer(blind(c)) for c in keyed},
            "extractive: note sentences closest to the question (nothing tuned)",
            [],
        )
    }
    if model_answers is not None:
        label = "the task-stage model's generated answers (trained on training folds)"
        if fallback:
            label += f"; {len(fallback)}/{len(keyed)} empty, given the extractive answer"
        runs[MODEL_SYSTEM] = (model_answers, label, sorted(fallback))
    rows = []
    for system, (answers, label, fell_back) in runs.items():
        write_submission(subtask3_entries({cid: answers[cid] for cid in ids}), out / "submissions" / system, 3, keyed)
        result = score_generation({cid: answers[cid] for cid in ids}, references, sources)
        ci = {}
        for name in result.computed:
            lo, hi = bootstrap_mean([result.per_case[cid][name] for cid in ids], indices, opts.level)
            ci[name] = [round(lo, 4), round(hi, 4)]
        rows.append(
            {
                "system": system,
                "label": label,
                "scores": _round(result.scores),
                "ci": ci,
                "not_computed": {k: result.reasons.get(k, "") for k in result.not_computed},
                "extractive_fallback_cases": fell_back,
            }
        )
    return rows


def _subtask2(
    keyed: list[Case],
    relevance: dict,
    thresholds: dict,
    baseline: dict[str, list[str]],
    indices: np.ndarray,
    opts: CVOptions,
    out: Path,
) -> dict:
    """Official Subtask 2 scores with bootstrap intervals: the question baseline and, if run, the head."""
    if len(baseline) != len(keyed):
        return {"available": False, "reason": "the key has no relevance labels for every case"}
    runs = {subtask2.BASELINE_SYSTEM: (baseline, subtask2.BASELINE_LABEL)}
    if len(relevance) == len(keyed) and len(thresholds) == len(keyed):
        runs[HEAD_SYSTEM] = (subtask2.head_predictions(keyed, relevance, thresholds), subtask2.HEAD_LABEL)
    rows = []
    for system, (predicted, label) in runs.items():
        write_submission(
            subtask2_entries({c.case_id: predicted[c.case_id] for c in keyed}), out / "submissions" / system, 2, keyed
        )
        rows.append(subtask2.relevance_row(system, label, predicted, keyed, indices, opts.level))
    note = None if HEAD_SYSTEM in runs else ("head not run, or it has no relevance output (head_relevance = false)")
    return {"available": True, "rows": rows, "head_missing": note}


def _plots(
    keyed: list[Case],
    predictions: dict[str, dict[str, Prediction]],
    chosen: dict[str, list[float]],
    logs: dict[str, Path],
    files: dict[str, Path],
    on_training: bool,
    provenance: str,
    provenance_name: str,
) -> None:
    where = "TRAINING cases (optimistic)" if on_training else "held-out cases"
    golds = {c.case_id: gold_matrix(c) for c in keyed}
    curves, points = {}, {}
    for system in (HEAD_SYSTEM, "ensemble"):
        if system not in predictions:
            continue
        curves[system] = plots.pooled_pairs({c: p.scores for c, p in predictions[system].items()}, golds)
        pred = {c: predictions[system][c].pairs for c in golds}
        total = micro_from_counts(pair_counts(pred, {c.case_id: c.gold_pairs() for c in keyed}, list(golds)))
        points[system] = (total["recall"] / 100, total["precision"] / 100)
    data = "invented fixture data, not real clinical data" if "INVENTED" in provenance else provenance_name
    title = f"Pooled (answer, note) pairs of {len(keyed)} {where}\n({data})"
    plots.plot_pr(curves, points, files["pr_curve"], title)
    plots.plot_f1_vs_threshold(curves, chosen, files["f1_vs_threshold"], title)
    plots.plot_losses(logs, files["loss_curves"], "Task-stage training loss per fold\n(each fold's training cases)")


def print_summary(result: CVResult, stream=None) -> None:
    """The console summary: notice, the Subtask 4 ladder (ids and numbers only), where the files are.
    ``stream`` defaults to the current ``sys.stdout`` (looked up at the call, not at import)."""
    stream = sys.stdout if stream is None else stream
    ladder = result.ladder
    print("", file=stream)
    for line in ladder["notice"]:
        print(line, file=stream)
    print(
        f"{ladder['title']}: {ladder['n_cases']} cases, {ladder['n_folds']} fold(s), "
        f"{int(100 * ladder['level'])}% bootstrap CI over cases",
        file=stream,
    )
    width = max(len(r["system"]) for r in ladder["subtask4"])
    print(f"{'system':<{width}}  {'micro F1 [CI]':<22}  {'macro F1 [CI]':<22}", file=stream)
    for r in ladder["subtask4"]:
        cells = [
            f"{r['scores'][k]:5.1f} [{r['ci'][k][0]:5.1f}, {r['ci'][k][1]:5.1f}]" for k in ("micro_f1", "macro_f1")
        ]
        print(f"{r['system']:<{width}}  {cells[0]:<22}  {cells[1]:<22}", file=stream)
    st2 = ladder.get("subtask2") or {}
    if st2.get("available"):
        print("Subtask 2 (evidence identification):", file=stream)
        for r in st2["rows"]:
            cells = [
                f"{k} {r['scores'][k]:5.1f} [{r['ci'][k][0]:5.1f}, {r['ci'][k][1]:5.1f}]"
                for k in ("strict_micro_f1", "lenient_micro_f1")
            ]
            print(f"  {r['system']}: " + "  ".join(cells), file=stream)
    for name, path in result.files.items():
        print(f"{name}: {path}", file=stream)
    print(f"took {result.seconds:.0f} s", file=stream)
