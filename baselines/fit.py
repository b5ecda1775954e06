"""Tune the retrieval ensemble on keyed cases and save it for ``infer.py --ensemble``.

    python -m baselines.fit --xml X --key K --out ensemble.json [--cross-encoder] [--epochs N]

Grid-searches component weights and the linking rule for pooled micro F1 on the
given cases. With ``--cross-encoder`` a MiniLM cross-encoder joins the mix: its scores
for tuning come from models trained on the other folds (out-of-fold, so the tuner
does not trust a scorer that has memorised the very cases it is tuned on), and the
model saved beside the JSON (``<name>_cross_encoder/``) is trained on all cases.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from data.archehr import load_cases
from plumbing.atomic import check_file_target
from plumbing.errors import CliParser, InputError, exit_on_input_error
from data.records import Case

from .aligners import CrossEncoderAligner
from .crossval import case_folds
from .ensemble import DEFAULT_COMPONENTS, EnsembleConfig, fit_ensemble, score_components
from plumbing.ranges import integer


def out_of_fold_cross_scores(cases: Sequence[Case], n_folds: int = 3, epochs: int = 6, seed: int = 0) -> dict:
    """case_id -> cross-encoder scores from a model that did not train on that case."""
    from .cross_encoder import train_cross_encoder

    by_id = {c.case_id: c for c in cases}
    scores = {}
    for held_out in case_folds(list(by_id), min(n_folds, len(by_id)), seed):
        train = [c for c in cases if c.case_id not in set(held_out)]
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = train_cross_encoder(train, tmp, epochs=epochs, seed=seed)
            scorer = CrossEncoderAligner(model_dir)
            for cid in held_out:
                scores[cid] = scorer.score(by_id[cid])
    return scores


def fit_from_cases(
    cases: Sequence[Case],
    out: Path,
    *,
    cross_encoder: bool = False,
    epochs: int = 6,
    folds: int = 3,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    tuned_on: str | None = None,
) -> EnsembleConfig:
    """Tune on ``cases`` and save the config (and the cross-encoder, if asked) at ``out``."""
    keyed = [c for c in cases if c.answer_sentences and c.has_key]
    if len(keyed) < 2:
        raise InputError("tuning needs at least two keyed cases with answer sentences")
    names = list(components)
    scores = score_components(keyed, names)
    if cross_encoder:
        from .cross_encoder import train_cross_encoder

        scores["cross"] = out_of_fold_cross_scores(keyed, folds, epochs)
        names.append("cross")
        model_dir = out.with_name(out.stem + "_cross_encoder")
        train_cross_encoder(keyed, model_dir, epochs=epochs, progress=True)
        config = fit_ensemble(
            keyed, names, component_scores=scores, cross_encoder_dir=model_dir.name, tuned_on=tuned_on
        )
    else:
        config = fit_ensemble(keyed, names, component_scores=scores, tuned_on=tuned_on)
    config.save(out)
    return config


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m baselines.fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--xml", type=Path, required=True, help="training cases XML")
    p.add_argument("--key", type=Path, required=True, help="their key JSON")
    p.add_argument("--out", type=Path, required=True, help="ensemble JSON to write")
    p.add_argument("--cross-encoder", action="store_true", help="also fine-tune a MiniLM cross-encoder (slower)")
    p.add_argument("--epochs", default=6, **integer(1, 10_000).option("cross-encoder epochs (default: %(default)s)"))
    p.add_argument(
        "--folds",
        default=3,
        **integer(2, 10_000).option("folds for the cross-encoder's out-of-fold scores (default: %(default)s)"),
    )
    return p


@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_file_target(args.out, [args.xml, args.key], "--out")  # before any work
    cases = load_cases(args.xml, args.key)
    config = fit_from_cases(
        cases,
        args.out,
        cross_encoder=args.cross_encoder,
        epochs=args.epochs,
        folds=args.folds,
        tuned_on=f"{args.xml.name} + {args.key.name}",
    )
    print(
        f"wrote {args.out}: weights {config.weights}, {config.mode} threshold {config.threshold}, "
        f"cap {config.max_per_answer}, top-1 fallback {config.top1_fallback}; "
        f"micro F1 on the tuning cases {config.train_micro_f1} (optimistic: tuned on them)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
