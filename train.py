"""Train the backbone adapter (+ alignment head): domain stage on emrQA, task stage on ArchEHR-QA.

    python train.py --stage domain --preset tiny --data emrqa.jsonl --out runs/domain
    python train.py --stage task --joint --preset tiny --init runs/domain \\
        --xml archehr-qa.xml --key archehr-qa_key.json --out runs/task
    python train.py --resume runs/task            # continue from the latest checkpoint

Every TrainConfig field can be overridden as ``--name value`` (see configs/*.toml).
"""
from __future__ import annotations

import sys

from data.errors import InputError, exit_on_input_error, exit_on_interrupt
from training.config import build_config, load_run_config, parse_overrides


def split_meta(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    """Pull ``--config FILE`` and ``--resume DIR`` out of the argument list."""
    config = resume = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, _, inline = token.partition("=")
        if name in ("--config", "--resume"):
            value = inline or (argv[i + 1] if i + 1 < len(argv) else None)
            if not value:
                raise InputError(f"{name} needs a value")
            if name == "--config":
                config = value
            else:
                resume = value
            i += 1 if inline else 2
            continue
        rest.append(token)
        i += 1
    return config, resume, rest


@exit_on_interrupt
@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    config_file, resume, rest = split_meta(argv)
    overrides = parse_overrides(rest)
    if resume:
        overrides["out"] = resume
        cfg = build_config(overrides, base=load_run_config(resume))
    else:
        cfg = build_config(overrides, config_file=config_file)
    from training.interrupt import deferred_stops, interrupted_message
    from training.loop import run_training

    with deferred_stops() as stops:  # SIGINT/SIGTERM: checkpoint after the current step, exit 130
        result = run_training(cfg, resume=bool(resume))
    if result.interrupted and stops.requested is not None:
        raise interrupted_message(result.steps, cfg.out)
    if result.export_dir is not None:
        print(f"export: {result.export_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
