"""The README's commands as a newcomer meets them: they run as written, run again, and what it
says about the command lines (options, choices, defaults) is what the parsers do."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

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
    assert any(c.startswith("python3 -m venv .venv") for c in commands[:torch_first[0]])


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
