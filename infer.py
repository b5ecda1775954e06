"""Write the official Subtask 2, 3 and 4 submissions for an ArchEHR-QA XML file.

    python infer.py notes.xml --out DIR                       # retrieval baseline (CPU, offline)
    python infer.py notes.xml --out DIR --export RUN/export
    python infer.py notes.xml --out DIR --key key.json        # also print scores

Writes DIR/subtask{2,3,4}/submission.json, DIR/subtask{2,3,4}.zip, DIR/run.json and
DIR/report.html (every case to read in a browser), all or nothing (an earlier run in DIR is
refused unless --overwrite, which replaces the whole set).
The results (files written, scores) go to stdout; progress, warnings and notes to stderr.
Tune a retrieval ensemble with
``python -m baselines.fit`` and pass it with ``--ensemble``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plumbing.console import hide_progress_bars, quiet_library_noise
from plumbing.errors import CliParser, DeprecatedAlias, InputError, exit_on_input_error, exit_on_interrupt
from plumbing.ranges import (
    DEFAULT_NEW_TOKENS,
    GENERATION_BATCH,
    LINKS_PER_ANSWER,
    MAX_NEW_TOKENS,
    MEMORY_GB,
    PROBABILITY,
    PROMPT_TOKENS,
)
from model.locate import check_model_options


def _subtasks(value: str) -> tuple[int, ...]:
    try:
        items = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. '2,3,4', got {value!r}") from None
    if not items or any(v not in (2, 3, 4) for v in items):
        raise argparse.ArgumentTypeError(f"subtasks must be some of 2, 3 and 4, got {value!r}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="infer.py", description=__doc__.split("\n\n")[0])
    _add_input_output_options(p)
    _add_subtask_options(p)
    _add_model_options(p)
    _add_run_options(p)
    return p


def _add_input_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("xml", type=Path, help="official cases XML (with <answer_sentences> for Subtask 4, or give --key)")
    p.add_argument(
        "--out", required=True, help="output folder (refused if it holds an earlier run, unless --overwrite)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the whole output set of an earlier run in --out")
    p.add_argument("--export", type=Path, help="export folder (RUN/export, or the run folder); omit for the baseline")
    p.add_argument(
        "--checkpoint",
        type=Path,
        dest="export",
        action=DeprecatedAlias,
        help="deprecated alias of --export (removed in the next release)",
    )
    p.add_argument("--key", type=Path, help="key JSON: answer sentences for Subtask 4, and scores after writing")


def _add_subtask_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--subtasks",
        type=_subtasks,
        help="comma-separated, default 2,3,4 (2 skipped, with a warning, for an export without a "
        "calibrated relevance threshold)",
    )
    p.add_argument(
        "--relevance-threshold",
        type=PROBABILITY.argtype(),
        help=PROBABILITY.help("Subtask 2 threshold (default: the export's calibrated one; baseline 0.5)"),
    )
    p.add_argument(
        "--aligner",
        choices=("retrieval", "head"),
        help="Subtask 4 aligner (default: head with --export, retrieval without)",
    )
    p.add_argument("--ensemble", type=Path, help="retrieval ensemble JSON (default configs/retrieval.json)")
    p.add_argument(
        "--max-links-per-answer",
        type=LINKS_PER_ANSWER.argtype(),
        help=LINKS_PER_ANSWER.help("cap on evidence sentences per answer sentence (default: no cap)"),
    )
    p.add_argument(
        "--top1-fallback",
        action="store_true",
        help="link an answer sentence's best note sentence when nothing passes the threshold",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """The export's model: generation budgets, base model, memory and device."""
    p.add_argument(
        "--batch-size",
        type=GENERATION_BATCH.argtype(),
        default=None,
        help=GENERATION_BATCH.help(
            "at most this many prompts generated together (with --export only; default: as many as GPU memory allows)"
        ),
    )
    p.add_argument(
        "--max-new-tokens",
        type=MAX_NEW_TOKENS.argtype(),
        default=DEFAULT_NEW_TOKENS,
        help=MAX_NEW_TOKENS.help("generation budget (with --export only; default %(default)s)"),
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=PROMPT_TOKENS.argtype(),
        default=None,
        help=PROMPT_TOKENS.help(
            "tokens one case may take, prompt plus answer (with --export only; "
            "default: the model's context); a longer note is cut to the sentences "
            "that fit, said and recorded in run.json"
        ),
    )
    p.add_argument(
        "--base",
        help="base model: a local folder or a cached hub id, for the export (default: the "
        "manifest's); train.py and score.py cv spell it --base too",
    )
    p.add_argument("--base_path", "--base-path", dest="base", action=DeprecatedAlias, help=argparse.SUPPRESS)
    p.add_argument(
        "--max-memory-gb",
        type=MEMORY_GB.argtype(),
        default=None,
        help=MEMORY_GB.help(
            "use at most this much GPU memory (a shared or smaller card); batch sizes "
            "and whether the adapter is merged into dense weights follow from it (default: all the card's "
            "free memory)"
        ),
    )
    p.add_argument("--device", help="torch device for the export (default: cuda if available)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide every progress bar, model loading included")
    p.add_argument("--verbose", action="store_true", help="show library warnings that are hidden by default")
    p.add_argument(
        "--allow-train-cases",
        action="store_true",
        help="with --key: score an export on cases it trained on (refused otherwise); every score "
        'is then labelled "TRAINING CASES"',
    )


@exit_on_interrupt
@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.strip():
        raise InputError("--out must name a folder (got ''); the working directory is not used")
    check_model_options(args.device, args.base)  # one line in seconds, before any work
    quiet_library_noise(verbose=args.verbose)  # before bitsandbytes is imported (it logs at import)
    if args.no_progress:
        hide_progress_bars()
    from inference.pipeline import InferenceOptions, run_inference  # after --help stays fast

    run_inference(
        InferenceOptions(
            xml=args.xml,
            out=Path(args.out),
            export=args.export,
            key=args.key,
            subtasks=args.subtasks,
            aligner=args.aligner,
            ensemble=args.ensemble,
            max_links_per_answer=args.max_links_per_answer,
            top1_fallback=args.top1_fallback,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            base=args.base,
            device=args.device,
            progress=not args.no_progress,
            allow_train_cases=args.allow_train_cases,
            relevance_threshold=args.relevance_threshold,
            max_memory_gb=args.max_memory_gb,
            overwrite=args.overwrite,
            max_prompt_tokens=args.max_prompt_tokens,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
