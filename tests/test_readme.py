"""The README's commands as a newcomer meets them: they run as written, run again, and what it
says about the command lines (options, choices, defaults) is what the parsers do."""

from __future__ import annotations

import re
import shlex
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def bash_blocks(text: str) -> list[list[str]]:
    """The command lines of every ```bash block (comments dropped, continuations joined)."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines, pending = [], ""
        for raw in body.splitlines():
            line = pending + raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else pending
            if line.endswith("\\"):
                pending = line[:-1]
                continue
            pending = ""
            if line.strip():
                lines.append(line.strip())
        blocks.append(lines)
    return blocks


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def default_torch_pin() -> str:
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    return re.search(r'TORCH_SPEC="\$\{TORCH_SPEC:-(torch==[^}"]+)\}"', setup).group(1)


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def test_readme_says_how_to_get_a_cpu_only_torch_before_installing():
    """PyPI's Linux torch is the CUDA build (6.5 GB on a CPU-only machine): the README installs the
    CPU build first, pinned as setup.sh pins it, with the set-up script and by hand."""
    pin = default_torch_pin()
    commands = [line for block in bash_blocks(readme_text()) for line in block]
    script = [c for c in commands if "scripts/setup.sh" in c and "TORCH_SPEC=" in c]
    assert any(shlex.split(c)[0] == f"TORCH_SPEC={pin} --index-url {CPU_INDEX}" for c in script), script
    by_hand = [i for i, c in enumerate(commands) if c.split()[:4] == [".venv/bin/python", "-m", "pip", "install"]]
    torch_first = [i for i in by_hand if shlex.split(commands[i])[4:] == [pin, "--index-url", CPU_INDEX]]
    package = [i for i in by_hand if shlex.split(commands[i])[4:] == ["."]]
    assert torch_first and package and torch_first[0] < package[0], commands
    assert any(c.startswith("python3 -m venv .venv") for c in commands[: torch_first[0]])


def readme_command(number: int) -> list[str]:
    """README command ``number`` (the first bash block's comment-numbered lines) as argv lists."""
    first = bash_blocks(readme_text())[0]
    return [shlex.split(part) for part in first[number - 1].split("&&")]


def test_readme_command_1_infer_line_runs_twice(tmp_path, monkeypatch):
    """README command 1 as written, twice in a row from a checkout: the second run succeeds too
    and leaves one complete output set (the first run's is replaced, not mixed)."""
    import infer

    setup, infer_line = readme_command(1)
    assert setup == ["bash", "scripts/setup.sh"]
    assert infer_line[:2] == [".venv/bin/python", "infer.py"]
    for name in ("examples", "configs"):  # a checkout's relative paths, with runs/ in a fresh folder
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    out = Path(infer_line[infer_line.index("--out") + 1])
    snapshots = []
    for _ in range(2):
        assert infer.main(infer_line[2:]) == 0
        snapshots.append(sorted(str(p.relative_to(out)) for p in out.rglob("*")))
    assert snapshots[0] == snapshots[1]
    assert {"run.json", "subtask2.zip", "subtask3.zip", "subtask4.zip"} <= set(snapshots[1])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing staged left behind


# --- what the README and --help say about the command lines ---------------------------------

OTHER_TOOLS_OPTIONS = {  # options of commands that are not ours (accelerate launch, torchrun, pip, servers)
    "--config_file",
    "--num_processes",
    "--num_machines",
    "--machine_rank",
    "--main_process_ip",
    "--main_process_port",
    "--index-url",
    "--master_addr",
    "--check",
    "--durations",
    "--master_port",
    "--node_rank",
    "--nproc_per_node",
    "--nnodes",
    "--rdzv_backend",
    "--rdzv_endpoint",
    "--logdir",
    "--name",
    "--model-path",
    "--port",
    "--max-model-len",
    "--served-model-name",
    "--host",
}


def argparse_parsers() -> dict[str, object]:
    import argparse

    import infer
    import score
    import train
    from baselines import fit
    from inference import served

    score_parser = score.build_parser()
    [commands] = [a for a in score_parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        "infer.py": infer.build_parser(),
        "score.py": score_parser,
        "score.py cv": commands.choices["cv"],
        "-m baselines.fit": fit.build_parser(),
        "train.py export": train.export_parser(),
        "-m inference.served": served.build_parser(),
    }


def train_options() -> set[str]:
    from dataclasses import fields

    import train
    from training.config import TrainConfig

    return {f"--{f.name}" for f in fields(TrainConfig)} | {"--config", "--resume", "--help", *train.CLI_FLAGS}


def options_of(parser) -> dict[str, object]:
    return {option: action for action in parser._actions for option in action.option_strings}


def readme_commands() -> list[tuple[str, str]]:
    """(CLI, rest of the line) for every command line of ours in the README's code."""
    text = readme_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]  # a span may wrap lines
    segments = spans + [line for block in bash_blocks(text) for line in block]
    found = []
    for segment in segments:
        for match in re.finditer(
            r"python (?:\S*/)?(train\.py(?: export)?|infer\.py|score\.py(?: cv)?|-m baselines\.fit|-m inference\.served)"
            r"((?:(?!&&|python ).)*)",
            segment,
        ):
            found.append((match.group(1), match.group(2)))
    return found


def test_readme_command_options_exist_with_the_choices_shown():
    """Every option in a README command line is one its CLI takes, and a `{a,b}` choice list shown
    after it is exactly the parser's (the README showed `--subtask {3,4}` while 2 exists)."""
    parsers = argparse_parsers()
    commands = readme_commands()
    assert {cli for cli, _ in commands} >= {"train.py", "infer.py", "score.py", "score.py cv", "-m baselines.fit"}
    for cli, rest in commands:
        known = train_options() if cli == "train.py" else options_of(parsers[cli])
        for option, choices in re.findall(r"(--[a-z][a-z0-9_-]*)(?:[ =]\{([^}]*)\})?", rest):
            assert option in known, f"README: `python {cli}` has no option {option}"
            if choices:
                assert sorted(choices.split(",")) == sorted(map(str, known[option].choices)), (cli, option)


def test_every_option_the_readme_names_exists_somewhere():
    every = train_options() | OTHER_TOOLS_OPTIONS
    for parser in argparse_parsers().values():
        every |= set(options_of(parser))
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", readme_text()))
    assert named - every == set()


def test_help_shows_every_default():
    """Each option that has a default says it in --help; an option taking a number without one
    says what happens when it is left out."""
    import argparse

    for cli, parser in argparse_parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{cli} {action.option_strings[0]}"
            shown = formatter._expand_help(action) if action.help else ""
            if (
                action.default is not None
                and action.default is not False
                and action.default not in (argparse.SUPPRESS, [])
            ):  # `is`: 0 == False
                values = action.default if isinstance(action.default, list) else [action.default]
                assert "default" in shown and all(str(v) in shown for v in values), f"{name}: {shown!r}"
            elif action.default is None and action.nargs is None and action.type not in (None, str, Path):
                assert "default" in shown or "required" in shown, (
                    f"{name} (a number) does not say what leaving it out means: {shown!r}"
                )


def test_readme_states_setup_default_torch_pin():
    assert f"`TORCH_SPEC`, default `{default_torch_pin()}`" in readme_text()
