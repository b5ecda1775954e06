"""Local scoring of Subtask 2, 3 and 4 submissions (the scoring itself lives in ``metrics/``).

    python score.py --subtask 2 --submission S --key K [--json OUT]
    python score.py --subtask 4 --submission S --key K [--json OUT] [--per-case]
    python score.py --subtask 3 --submission S --key K --xml X [--json OUT] [--per-case]
                    [--bertscore-model LOCAL_DISTILBERT]

The submission may be the ``submission.json`` or the ``.zip`` holding it. Subtask 4
checks ids against the key as the official scorer does (answer ids from the key's
``clinician_answer_sentences``, evidence ids from its ``answers``; the case sets must be
equal) and ``--json`` writes the official ``scores.json`` keys plus ``per_case``.
Subtask 3 truncates predictions to 75 words as the official scorer does, computes BLEU,
ROUGE and SARI as the organizers do, and reports the metrics it cannot compute as not
computed. When an infer.py ``run.json`` sits beside the submission and records the
export's training cases, scoring those cases is refused unless ``--allow-train-cases``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plumbing.atomic import check_file_target, write_json_atomic
from plumbing.errors import CliParser, exit_on_input_error, exit_on_interrupt
from plumbing.ranges import DEFAULT_NEW_TOKENS, FOLDS, MAX_NEW_TOKENS, RESAMPLES, SEED
from model.locate import check_model_options
from data.submission import MAX_WORDS, read_submission
from metrics.alignment import SCORE_KEYS
from metrics.case_sets import same_cases, unique_case_ids
from metrics.relevance import SCORE_KEYS as ST2_SCORE_KEYS
from metrics.subtask2 import score_subtask2
from metrics.subtask3 import score_subtask3
from metrics.subtask4 import score_subtask4, score_subtask4_per_case
from metrics.training_cases import (
    TRAINING_CASES_LABEL,
    check_training_cases,
    run_record_beside,
    run_record_training_case_ids,
)
from plumbing.console import hide_progress_bars, quiet_library_noise
from training.config import parse_overrides


def _note(message: str) -> None:
    """Notes and warnings go to stderr; stdout holds only the scores."""
    print(message, file=sys.stderr, flush=True)


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="score.py", description="Score ArchEHR-QA Subtask 2 / 3 / 4 submissions locally.")
    parser.add_argument(
        "--subtask", type=int, choices=(2, 3, 4), help="which subtask to score (required to score a submission)"
    )
    parser.add_argument("--submission", type=Path, help="submission.json or the .zip holding it")
    parser.add_argument("--key", type=Path, help="the key JSON (archehr-qa_key.json)")
    parser.add_argument("--xml", type=Path, help="the cases XML (Subtask 3: narratives are the SARI source)")
    parser.add_argument(
        "--json", type=Path, dest="json_out", help="also write the scores (with per-case values) to this JSON file"
    )
    parser.add_argument("--per-case", action="store_true", help="also print a table of per-case scores")
    parser.add_argument(
        "--bertscore-model",
        help="Subtask 3: local model folder for BERTScore (official only "
        "with distilbert-base-uncased; needs the bert-score package)",
    )
    parser.add_argument(
        "--allow-train-cases",
        action="store_true",
        help="score even when the run.json beside the submission says the export trained on "
        'these cases; every score is then labelled "TRAINING CASES"',
    )
    # Further commands (e.g. cross-validation) are added here as subparsers; without one,
    # the flags above score a submission.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_cv_parser(commands)
    return parser


def _add_cv_parser(commands) -> None:
    from evaluation.systems import ALL_SYSTEMS

    cv = commands.add_parser(
        "cv",
        help="case-grouped cross-validation of the baseline ladder and the joint head",
        description="Case-grouped k-fold cross-validation: every system trains and chooses its thresholds on the "
        "training folds only and is scored once on the pooled held-out predictions. Any training "
        "config key is accepted as --key value, as in train.py (python train.py --help lists them).",
        allow_abbrev=False,
    )
    cv.add_argument("--xml", type=Path, required=True, help="the cases XML")
    cv.add_argument("--key", type=Path, required=True, help="their key JSON")
    cv.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder (ladder, error report, plots, folds), written all or nothing; an earlier "
        "cross-validation there is refused unless --overwrite",
    )
    cv.add_argument(
        "--overwrite", action="store_true", help="replace the whole output set of an earlier cross-validation in --out"
    )
    cv.add_argument(
        "--folds",
        type=FOLDS.argtype(),
        default=5,
        help=FOLDS.help("number of folds (= number of cases: leave-one-case-out; default 5)"),
    )
    cv.add_argument("--preset", default="tiny", help="model preset of the task stage (default: %(default)s)")
    cv.add_argument("--init", help="domain-stage run or export folder to start each fold from (default: fresh)")
    cv.add_argument("--config", type=Path, help="task-stage TOML (default: configs/task.toml)")
    cv.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting, e.g. --set max_steps=2 (repeatable; same as --max_steps 2)",
    )
    cv.add_argument(
        "--systems",
        nargs="+",
        default=list(ALL_SYSTEMS),
        choices=list(ALL_SYSTEMS),
        metavar="SYSTEM",
        help=f"systems to evaluate (default: all of {', '.join(ALL_SYSTEMS)})",
    )
    cv.add_argument(
        "--seed",
        type=SEED.argtype(),
        default=0,
        help=SEED.help("fold assignment, training and bootstrap seed (default 0)"),
    )
    cv.add_argument(
        "--resamples", type=RESAMPLES.argtype(), default=1000, help=RESAMPLES.help("bootstrap resamples (default 1000)")
    )
    cv.add_argument(
        "--max-new-tokens",
        type=MAX_NEW_TOKENS.argtype(),
        default=DEFAULT_NEW_TOKENS,
        help=MAX_NEW_TOKENS.help("generation length of the model's answers (default %(default)s)"),
    )
    cv.add_argument("--no-generate", action="store_true", help="skip the model's Subtask 3 answers")
    cv.add_argument("--device", help="device for the trained model (default: cuda if available)")
    cv.add_argument(
        "--eval-on-train",
        action="store_true",
        help="train on all cases and score the same cases (refused without --allow-train-cases)",
    )
    cv.add_argument(
        "--allow-train-cases",
        action="store_true",
        help='allow scoring on training cases; every output is then labelled "TRAINING CASES"',
    )
    cv.add_argument("--no-progress", action="store_true", help="no progress bars (model loading's included)")
    cv.add_argument("--verbose", action="store_true", help="show library warnings that are hidden by default")


@exit_on_interrupt
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
    check_model_options(args.device, None)  # one line in seconds, before any work (or heavy import)
    from evaluation.cv import CVOptions, print_summary, run_cv

    quiet_library_noise(verbose=args.verbose)
    if args.no_progress:
        hide_progress_bars()  # model loading's bars too, not only ours
    opts = CVOptions(
        xml=args.xml,
        key=args.key,
        out=args.out,
        folds=args.folds,
        preset=args.preset,
        init=args.init,
        config=args.config,
        settings=args.settings,
        systems=args.systems,
        allow_train_cases=args.allow_train_cases,
        eval_on_train=args.eval_on_train,
        seed=args.seed,
        n_resamples=args.resamples,
        max_new_tokens=args.max_new_tokens,
        generate=not args.no_generate,
        device=args.device,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print_summary(run_cv(opts))  # progress on stderr, the summary on stdout
    return 0


def _score_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.subtask is None or args.submission is None or args.key is None:
        parser.error("--subtask, --submission and --key are required")
    if args.json_out is not None:  # before scoring: never the submission (or key) it scores
        check_file_target(args.json_out, [args.submission, args.key, args.xml], "--json")
    if args.subtask == 3 and args.xml is None:
        parser.error("--subtask 3 needs --xml (the patient narrative is the SARI source)")
    _check_case_sets(args)  # first: a test-set submission against the dev key is not about training cases
    training = _training_cases_scored(args)  # refused here, before any scoring or writing
    if args.subtask == 2:
        return _score_subtask2_command(args, training)
    if args.subtask == 4:
        return _score_subtask4_command(args, training)
    return _score_subtask3_command(args, training)


def _check_case_sets(args: argparse.Namespace) -> None:
    """The submission's case ids are the key's (one line with counts and first ids otherwise)."""
    from data.archehr import load_cases, load_key

    if args.subtask == 3:  # the cases scored are the key's, read with their XML (which must hold them)
        expected = [c.case_id for c in load_cases(args.xml, args.key) if c.has_key]
    else:
        expected = list(load_key(args.key))
    entries = read_submission(args.submission, args.subtask)
    same_cases(unique_case_ids(entries, args.submission), expected, args.submission, args.key)


def _training_cases_scored(args: argparse.Namespace) -> list[str]:
    """Scored cases the export trained on, per the infer.py run.json beside the submission."""
    run_json = run_record_beside(args.submission)
    trained = run_record_training_case_ids(run_json) if run_json is not None else None
    if not trained:
        return []
    from data.archehr import load_key

    return check_training_cases(load_key(args.key), trained, args.allow_train_cases, run_json)


def _label(training: list[str]) -> str:
    return f"  [{TRAINING_CASES_LABEL}]" if training else ""


def _with_training_label(payload: dict, training: list[str]) -> dict:
    if training:
        payload["evaluated_on"] = TRAINING_CASES_LABEL
        payload["training_cases_scored"] = training
    return payload


def _print_training_notice(training: list[str]) -> None:
    if training:
        _note(f"{TRAINING_CASES_LABEL}: {len(training)} scored case(s) are cases this export trained on")


def _print_per_case(per_case: dict[str, dict[str, float]], training: list[str]) -> None:
    columns = list(dict.fromkeys(k for values in per_case.values() for k in values))
    width = max(len("case_id"), *(len(c) for c in per_case))
    print()
    print(f"{'case_id':<{width}}  " + "  ".join(f"{c:>10}" for c in columns) + _label(training))
    for case_id, values in per_case.items():
        cells = [
            f"{values[c]:>10.4f}" if isinstance(values.get(c), float) else f"{values.get(c, ''):>10}" for c in columns
        ]
        print(f"{case_id:<{width}}  " + "  ".join(cells))


def _score_subtask2_command(args: argparse.Namespace, training: list[str]) -> int:
    scores = score_subtask2(args.submission, args.key)
    _print_training_notice(training)
    _print_table([(k, f"{scores[k]:.4f}{_label(training)}") for k in ST2_SCORE_KEYS])
    if args.json_out:
        payload = {k: scores[k] for k in ST2_SCORE_KEYS}
        write_json_atomic(args.json_out, _with_training_label(payload, training))
    return 0


def _score_subtask4_command(args: argparse.Namespace, training: list[str]) -> int:
    scores = score_subtask4(args.submission, args.key)
    per_case = score_subtask4_per_case(args.submission, args.key)
    _print_training_notice(training)
    _print_table([(k, f"{scores[k]:.4f}{_label(training)}") for k in SCORE_KEYS])
    if args.per_case:
        _print_per_case(per_case, training)
    if args.json_out:
        payload = {k: scores[k] for k in SCORE_KEYS}
        payload["per_case"] = per_case
        write_json_atomic(args.json_out, _with_training_label(payload, training))
    return 0


def _score_subtask3_command(args: argparse.Namespace, training: list[str]) -> int:
    result, truncated = score_subtask3(args.submission, args.key, args.xml, args.bertscore_model)
    _print_training_notice(training)
    rows = []
    for name, value in result.scores.items():
        shown = f"{value:.4f}{_label(training)}" if value is not None else result.reasons.get(name, "not computed")
        if name in result.notes:
            shown += f"  ({result.notes[name]})"
        rows.append((name, shown))
    overall_key = "overall_score" if result.is_official_overall else "mean_of_computed"
    rows.append((overall_key, f"{result.overall_mean:.4f}{_label(training)}"))
    _print_table(rows)
    print(f"{overall_key} = {result.overall_name}")
    if truncated:
        _note(f"note: {truncated} prediction(s) over {MAX_WORDS} words were truncated, as the official scorer does")
    if args.per_case:
        _print_per_case(result.per_case, training)
    if args.json_out:
        write_json_atomic(args.json_out, _with_training_label(result.to_json(), training))
    return 0


if __name__ == "__main__":
    sys.exit(main())
