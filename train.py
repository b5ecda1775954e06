"""Train the backbone adapter (+ alignment head): domain stage on emrQA, task stage on ArchEHR-QA.

    python train.py --stage domain --preset tiny --data emrqa.jsonl --out runs/domain
    python train.py --stage task --joint --preset tiny --init runs/domain \\
        --xml archehr-qa.xml --key archehr-qa_key.json --out runs/task
    python train.py --resume runs/task            # continue from the latest checkpoint

Each stage starts from its preset TOML (configs/STAGE.toml, next to this file; ``--config FILE``
for your own) and any key below can be overridden as ``--key value`` (``--flag`` alone = true).

    --config FILE     the stage's TOML instead of configs/STAGE.toml
    --resume DIR      continue a run from its latest checkpoint, with the settings it was started with
                      (a finished run, one with an export, is left as it is: exit 0)
    --print-config    print the resolved config (TOML) on stdout and exit; writes nothing
    --no-progress     hide every progress bar, model loading included (= --progress false)
    --verbose         show library warnings that are hidden by default
"""
from __future__ import annotations

import sys

from plumbing.console import hide_progress_bars, quiet_library_noise
from plumbing.errors import InputError, exit_on_input_error, exit_on_interrupt
from training.config import build_config, parse_overrides


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


CLI_FLAGS = ("--print-config", "--no-progress", "--verbose")


def split_flags(argv: list[str]) -> tuple[set[str], list[str]]:
    """Pull the CLI's own switches (not config keys) out of the argument list."""
    return {a for a in argv if a in CLI_FLAGS}, [a for a in argv if a not in CLI_FLAGS]


def usage() -> str:
    from training.config_docs import config_keys_help

    return (f"{__doc__.rstrip()}\n\nconfig keys (type, dataclass default, meaning; the stage's TOML sets some, "
            f"--print-config shows the resolved values):\n{config_keys_help()}\n")


@exit_on_interrupt
@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    config_file, resume, rest = split_meta(argv)
    flags, rest = split_flags(rest)
    overrides = parse_overrides(rest)
    if "--no-progress" in flags:
        overrides["progress"] = False
    if resume:
        from training.run_folder import finished_export, resume_config

        cfg = resume_config(resume, overrides, config_file)
        export = finished_export(resume)
        if export is not None and "--print-config" not in flags:  # nothing to resume, nothing re-exported
            print(f"note: {resume} has finished training: nothing to resume, its export is left as it is "
                  "(to train further, start a new run with another --out)", file=sys.stderr)
            print(f"export: {export}")
            return 0
    else:
        cfg = build_config(overrides, config_file=config_file)
        if cfg.init and cfg.stage == "task":
            from training.init_settings import check_init_settings

            cfg = check_init_settings(cfg, cfg.init, explicit=overrides,
                                      note=lambda line: print(line, file=sys.stderr))
    if "--print-config" in flags:
        from training.config_docs import config_as_toml

        sys.stdout.write(config_as_toml(cfg))
        return 0
    quiet_library_noise(verbose="--verbose" in flags)
    if not cfg.progress:
        hide_progress_bars()
    from training.interrupt import deferred_stops, interrupted_message
    from training.loop import run_training

    with deferred_stops() as stops:  # SIGINT/SIGTERM: checkpoint after the current step, exit 130
        result = run_training(cfg, resume=bool(resume))
    if result.interrupted and stops.requested is not None:
        raise interrupted_message(result.steps, cfg.out)
    if result.export_dir is not None:
        print(f"export: {result.export_dir}")  # the result, on stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
