"""Train the backbone adapter (+ alignment head): domain stage on emrQA, task stage on ArchEHR-QA.

    python train.py --stage domain --preset tiny --data emrqa.jsonl --out runs/domain
    python train.py --stage task --joint --preset tiny --init runs/domain \\
        --xml archehr-qa.xml --key archehr-qa_key.json --out runs/task
    python train.py --resume runs/task            # continue from the latest checkpoint
    python train.py export runs/task --merged     # + RUN/export/merged: a plain HF model folder (bf16)

Each stage starts from its preset TOML (configs/STAGE.toml, next to this file; ``--config FILE``
for your own) and any key below can be overridden as ``--key value`` (``--flag`` alone = true).

    --config FILE     the stage's TOML instead of configs/STAGE.toml
    --resume DIR      continue a run from its latest checkpoint, with the settings it was started with
                      (a finished run, one with an export, is left as it is: exit 0)
    --print-config    print the resolved config (TOML) on stdout and exit; writes nothing
    --no-progress     hide every progress bar, model loading included (= --progress false)
    --verbose         show library warnings that are hidden by default

``train.py export RUN --merged`` merges the adapter into the base (dequantised as trained) and
writes a standard Hugging Face folder for serving engines (``train.py export --help``).
"""

from __future__ import annotations

import sys

from plumbing.console import hide_progress_bars, quiet_library_noise
from plumbing.errors import CliParser, DeprecatedAlias, InputError, exit_on_input_error, exit_on_interrupt
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

    return (
        f"{__doc__.rstrip()}\n\nconfig keys (type, the default of each stage: configs/STAGE.toml over the "
        f"built-in value; --print-config shows a run's resolved values):\n{config_keys_help()}\n"
    )


def export_parser():
    import argparse

    p = CliParser(
        prog="train.py export",
        description=(
            "Write a merged model folder of a finished run: the adapter merged into the base (NF4 bases "
            "dequantised as trained), config, tokenizer, greedy generation config and sharded safetensors; "
            "loads with AutoModelForCausalLM.from_pretrained and serves with vLLM or SGLang. The alignment "
            "head stays in the export (infer.py --export applies it)."
        ),
    )
    p.add_argument("run", help="run folder (uses RUN/export) or export folder")
    p.add_argument("--merged", action="store_true", required=True, help="write the merged model folder")
    p.add_argument("--out", help="output folder (default: EXPORT/merged; an earlier merged folder is replaced)")
    p.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weights dtype (default: %(default)s)"
    )
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default: %(default)s)")
    p.add_argument("--base", help="local folder or hub id of the base (default: the manifest's)")
    p.add_argument("--base_path", "--base-path", dest="base", action=DeprecatedAlias, help=argparse.SUPPRESS)
    p.add_argument("--device", help="torch device for the merge (default: cuda if available)")
    p.add_argument(
        "--cv",
        help="a score.py cv run folder: its held-out scores go into the model cards' "
        "model-index (merged/README.md and the export's README.md)",
    )
    return p


def export_main(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    quiet_library_noise(verbose=False)
    from model.export_folder import read_cv_ladder, refresh_model_card
    from model.merged_export import export_merged

    ladder = read_cv_ladder(args.cv) if args.cv else None
    folder = export_merged(
        args.run,
        args.out,
        base=args.base,
        device=args.device,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        ladder=ladder,
    )
    if ladder is not None:
        refresh_model_card(args.run, ladder)
    print(f"merged: {folder}")  # the result, on stdout
    return 0


@exit_on_interrupt
@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        return export_main(argv[1:])
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
            print(
                f"note: {resume} has finished training: nothing to resume, its export is left as it is "
                "(to train further, start a new run with another --out)",
                file=sys.stderr,
            )
            print(f"export: {export}")
            return 0
    else:
        cfg = build_config(overrides, config_file=config_file)
        if cfg.init and cfg.stage == "task":
            from training.init_settings import check_init_settings

            cfg = check_init_settings(cfg, cfg.init, explicit=overrides, note=lambda line: print(line, file=sys.stderr))
    if "--print-config" in flags:
        from training.config_docs import config_as_toml

        sys.stdout.write(config_as_toml(cfg))
        return 0
    quiet_library_noise(verbose="--verbose" in flags)
    if not cfg.progress:
        hide_progress_bars()
    from training.interrupt import deferred_stops, interrupted_message
    from training.run import run_training

    with deferred_stops() as stops:  # SIGINT/SIGTERM: checkpoint after the current step, exit 130
        result = run_training(cfg, resume=bool(resume))
    if result.interrupted and stops.requested is not None:
        raise interrupted_message(result.steps, cfg.out)
    if result.export_dir is not None:
        print(f"export: {result.export_dir}")  # the result, on stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
