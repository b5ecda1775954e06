"""Local scoring of Subtask 3 and Subtask 4 submissions.

    python score.py --subtask 4 --submission S --key K [--json OUT]
    python score.py --subtask 3 --submission S --key K --xml X [--json OUT]

The submission may be the ``submission.json`` or the ``.zip`` holding it. Subtask 4
checks ids against the key as the official scorer does (answer ids from the key's
``clinician_answer_sentences``, evidence ids from its ``answers``; the case sets must be
equal) and ``--json`` writes the official ``scores.json`` keys. Subtask 3 truncates
predictions to 75 words as the official scorer does and reports the metrics it cannot
compute as not computed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.archehr import load_cases, load_key
from data.atomic import write_json_atomic
from data.console import hide_progress_bars, quiet_library_noise
from data.errors import InputError, exit_on_input_error
from data.submission import MAX_WORDS, count_words, read_submission
from metrics.alignment import SCORE_KEYS, score_alignment
from metrics.generation import GenerationScores, score_generation
from training.config import parse_overrides


def _unique_case_ids(entries: list[dict], path: Path) -> list[str]:
    seen: list[str] = []
    for entry in entries:
        if entry["case_id"] in seen:
            raise InputError("case listed twice", path, entry["case_id"])
        seen.append(entry["case_id"])
    return seen


def _same_cases(submitted: list[str], expected: list[str], path: Path) -> None:
    extra = [c for c in submitted if c not in set(expected)]
    if extra:
        raise InputError("case is not in the key", path, extra[0])
    missing = [c for c in expected if c not in set(submitted)]
    if missing:
        raise InputError(f"case of the key missing from the submission ({len(missing)} missing)", path, missing[0])


def score_subtask4(submission: str | Path, key: str | Path) -> dict[str, float]:
    """The seven official Subtask 4 scores of a submission against a key."""
    sub_path = Path(submission)
    key_cases = load_key(key)
    entries = read_submission(sub_path, 4)
    _same_cases(_unique_case_ids(entries, sub_path), list(key_cases), sub_path)
    predicted: dict[str, set[tuple[str, str]]] = {}
    for entry in entries:
        kc = key_cases[entry["case_id"]]
        if not kc.answer_sentences:
            raise InputError("key case has no clinician_answer_sentences to align", key, kc.case_id)
        answer_ids = {a.sentence_id for a in kc.answer_sentences}
        pairs = predicted.setdefault(kc.case_id, set())
        for item in entry["prediction"]:
            aid = item["answer_id"]
            if aid not in answer_ids:
                raise InputError(f"unknown answer_id {aid!r}", sub_path, kc.case_id)
            for e in item["evidence_id"]:
                if e not in kc.relevance:
                    raise InputError(f"answer {aid}: unknown evidence id {e!r}", sub_path, kc.case_id)
                pairs.add((aid, e))
    gold = {cid: kc.gold_pairs() for cid, kc in key_cases.items()}
    return score_alignment(predicted, gold)


def score_subtask3(
    submission: str | Path, key: str | Path, xml: str | Path
) -> tuple[GenerationScores, int]:
    """Subtask 3 metrics and the number of predictions truncated to 75 words."""
    sub_path = Path(submission)
    cases = [c for c in load_cases(xml, key) if c.has_key]
    entries = read_submission(sub_path, 3)
    _same_cases(_unique_case_ids(entries, sub_path), [c.case_id for c in cases], sub_path)
    by_id = {c.case_id: c for c in cases}
    predictions, references, sources = {}, {}, {}
    truncated = 0
    for entry in entries:
        case = by_id[entry["case_id"]]
        text = entry["prediction"]
        if count_words(text) > MAX_WORDS:  # what the official scorer does with long answers
            text = " ".join(text.split()[:MAX_WORDS])
            truncated += 1
        reference = case.clinician_answer_without_citations or " ".join(a.text for a in case.answer_sentences)
        if not reference.strip():
            raise InputError("key case has no clinician answer to compare with", key, case.case_id)
        predictions[case.case_id] = text
        references[case.case_id] = reference
        sources[case.case_id] = case.patient_narrative
    return score_generation(predictions, references, sources), truncated


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="score.py", description="Score ArchEHR-QA Subtask 3 / Subtask 4 submissions locally."
    )
    parser.add_argument("--subtask", type=int, choices=(3, 4), help="which subtask to score")
    parser.add_argument("--submission", type=Path, help="submission.json or the .zip holding it")
    parser.add_argument("--key", type=Path, help="the key JSON (archehr-qa_key.json)")
    parser.add_argument("--xml", type=Path, help="the cases XML (Subtask 3: narratives are the SARI source)")
    parser.add_argument("--json", type=Path, dest="json_out", help="also write the scores to this JSON file")
    # Further commands (e.g. cross-validation) are added here as subparsers; without one,
    # the flags above score a submission.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_cv_parser(commands)
    return parser


def _add_cv_parser(commands) -> None:
    from evaluation.systems import ALL_SYSTEMS

    cv = commands.add_parser(
        "cv", help="case-grouped cross-validation of the baseline ladder and the joint head",
        description="Case-grouped k-fold cross-validation: every system trains and chooses its thresholds on the "
                    "training folds only and is scored once on the pooled held-out predictions. Any training "
                    "config key is accepted as --key value, as in train.py (python train.py --help lists them).",
        allow_abbrev=False,
    )
    cv.add_argument("--xml", type=Path, required=True, help="the cases XML")
    cv.add_argument("--key", type=Path, required=True, help="their key JSON")
    cv.add_argument("--out", type=Path, required=True, help="output folder (ladder, error report, plots, folds)")
    cv.add_argument("--folds", type=int, default=5, help="number of folds (= number of cases: leave-one-case-out)")
    cv.add_argument("--preset", default="tiny", help="model preset of the task stage (default: tiny)")
    cv.add_argument("--init", help="domain-stage run or export folder to start each fold from (default: fresh)")
    cv.add_argument("--config", type=Path, help="task-stage TOML (default: configs/task.toml)")
    cv.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training setting, e.g. --set max_steps=2 (repeatable; same as --max_steps 2)")
    cv.add_argument("--systems", nargs="+", default=list(ALL_SYSTEMS), choices=list(ALL_SYSTEMS),
                    metavar="SYSTEM", help=f"systems to evaluate (default: all of {', '.join(ALL_SYSTEMS)})")
    cv.add_argument("--seed", type=int, default=0, help="fold assignment, training and bootstrap seed")
    cv.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    cv.add_argument("--max-new-tokens", type=int, default=100, help="generation length of the model's answers")
    cv.add_argument("--no-generate", action="store_true", help="skip the model's Subtask 3 answers")
    cv.add_argument("--device", help="device for the trained model (default: cuda if available)")
    cv.add_argument("--eval-on-train", action="store_true",
                    help="train on all cases and score the same cases (refused without --allow-train-cases)")
    cv.add_argument("--allow-train-cases", action="store_true",
                    help='allow scoring on training cases; every output is then labelled "TRAINING CASES"')
    cv.add_argument("--no-progress", action="store_true", help="no progress bars (model loading's included)")
    cv.add_argument("--verbose", action="store_true", help="show library warnings that are hidden by default")


@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "cv":  # training keys as in train.py: --max_steps 2 --lr 1e-4 --joint false
        args.settings = list(args.settings) + [f"{k}={v}" for k, v in parse_overrides(extra).items()]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        return _score_command(parser, args)
    if args.command == "cv":
        return _cv_command(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


def _cv_command(args: argparse.Namespace) -> int:
    from evaluation.cv import CVOptions, print_summary, run_cv

    quiet_library_noise(verbose=args.verbose)
    if args.no_progress:
        hide_progress_bars()  # model loading's bars too, not only ours
    opts = CVOptions(
        xml=args.xml, key=args.key, out=args.out, folds=args.folds, preset=args.preset, init=args.init,
        config=args.config, settings=args.settings, systems=args.systems, allow_train_cases=args.allow_train_cases,
        eval_on_train=args.eval_on_train, seed=args.seed, n_resamples=args.resamples,
        max_new_tokens=args.max_new_tokens, generate=not args.no_generate, device=args.device,
        progress=not args.no_progress,
    )
    print_summary(run_cv(opts))
    return 0


def _score_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.subtask is None or args.submission is None or args.key is None:
        parser.error("--subtask, --submission and --key are required")
    if args.subtask == 4:
        scores = score_subtask4(args.submission, args.key)
        _print_table([(k, f"{scores[k]:.4f}") for k in SCORE_KEYS])
        if args.json_out:
            write_json_atomic(args.json_out, {k: scores[k] for k in SCORE_KEYS})
        return 0
    if args.xml is None:
        parser.error("--subtask 3 needs --xml (the patient narrative is the SARI source)")
    result, truncated = score_subtask3(args.submission, args.key, args.xml)
    rows = [
        (name, f"{value:.4f}" if value is not None else f"not computed ({result.reasons.get(name, '')})")
        for name, value in result.scores.items()
    ]
    rows.append(("mean_of_computed", f"{result.overall_mean:.4f}"))
    _print_table(rows)
    print(f"mean_of_computed = {result.overall_name}; not the official overall score")
    if truncated:
        print(f"note: {truncated} prediction(s) over {MAX_WORDS} words were truncated, as the official scorer does")
    if args.json_out:
        write_json_atomic(args.json_out, result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
