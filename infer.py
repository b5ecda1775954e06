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
import math
import sys
from pathlib import Path

from plumbing.console import hide_progress_bars, quiet_library_noise
from plumbing.errors import CliParser, InputError, exit_on_input_error, exit_on_interrupt


def _subtasks(value: str) -> tuple[int, ...]:
    try:
        items = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. '2,3,4', got {value!r}") from None
    if not items or any(v not in (2, 3, 4) for v in items):
        raise argparse.ArgumentTypeError(f"subtasks must be some of 2, 3 and 4, got {value!r}")
    return items


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def _finite_number(low: float, high: float = math.inf, *, above_low: bool = False):
    """An argparse type: a finite float in [low, high] (in (low, high] with ``above_low``)."""
    bounds = f"{'(' if above_low else '['}{low:g}, {high:g}]"

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {bounds}, got {value!r}") from None
        if not (math.isfinite(x) and (x > low if above_low else x >= low) and x <= high):
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {value!r}")
        return x

    return parse


_probability = _finite_number(0.0, 1.0)
_positive_float = _finite_number(0.0, above_low=True)


class _DeprecatedAlias(argparse.Action):
    """An old option name that still works for one release and says so once on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use --export (the old name goes in the next release)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="infer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("xml", type=Path, help="official cases XML (with <answer_sentences> for Subtask 4, or give --key)")
    p.add_argument("--out", required=True, help="output folder (refused if it holds an earlier run, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the whole output set of an earlier run in --out")
    p.add_argument("--export", type=Path, help="export folder (RUN/export, or the run folder); omit for the baseline")
    p.add_argument("--checkpoint", type=Path, dest="export", action=_DeprecatedAlias,
                   help="deprecated alias of --export (removed in the next release)")
    p.add_argument("--key", type=Path, help="key JSON: answer sentences for Subtask 4, and scores after writing")
    p.add_argument("--subtasks", type=_subtasks,
                   help="comma-separated, default 2,3,4 (2 skipped, with a warning, for an export without a "
                        "calibrated relevance threshold)")
    p.add_argument("--relevance-threshold", type=_probability,
                   help="Subtask 2 threshold (default: the export's calibrated one; baseline 0.5)")
    p.add_argument("--aligner", choices=("retrieval", "head"),
                   help="Subtask 4 aligner (default: head with --export, retrieval without)")
    p.add_argument("--ensemble", type=Path, help="retrieval ensemble JSON (default configs/retrieval.json)")
    p.add_argument("--max-links-per-answer", type=_positive, help="cap on evidence sentences per answer sentence")
    p.add_argument("--top1-fallback", action="store_true",
                   help="link an answer sentence's best note sentence when nothing passes the threshold")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="at most this many prompts generated together (with --export only; default: as many as "
                        "GPU memory allows)")
    p.add_argument("--max-new-tokens", type=_positive, default=100, help="generation budget (with --export only)")
    p.add_argument("--base", help="base model id or folder for the export (default: the manifest's)")
    p.add_argument("--max-memory-gb", type=_positive_float, default=None,
                   help="use at most this much GPU memory (a shared or smaller card); batch sizes and whether "
                        "the adapter is merged into dense weights follow from it")
    p.add_argument("--device", help="torch device for the export (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide every progress bar, model loading included")
    p.add_argument("--verbose", action="store_true", help="show library warnings that are hidden by default")
    p.add_argument("--allow-train-cases", action="store_true",
                   help="with --key: score an export on cases it trained on (refused otherwise); every score "
                        'is then labelled "TRAINING CASES"')
    return p


@exit_on_interrupt
@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.strip():
        raise InputError("--out must name a folder (got ''); the working directory is not used")
    quiet_library_noise(verbose=args.verbose)  # before bitsandbytes is imported (it logs at import)
    if args.no_progress:
        hide_progress_bars()
    from inference.pipeline import InferenceOptions, run_inference  # after --help stays fast

    run_inference(InferenceOptions(
        xml=args.xml, out=Path(args.out), export=args.export, key=args.key, subtasks=args.subtasks,
        aligner=args.aligner, ensemble=args.ensemble, max_links_per_answer=args.max_links_per_answer,
        top1_fallback=args.top1_fallback, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        base=args.base, device=args.device, progress=not args.no_progress, allow_train_cases=args.allow_train_cases,
        relevance_threshold=args.relevance_threshold, max_memory_gb=args.max_memory_gb, overwrite=args.overwrite,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
