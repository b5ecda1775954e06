"""A normal run's stderr holds what the user needs and no known-harmless library noise; --verbose
shows that noise again (plumbing/console.py names each kind and why it is harmless)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The lines a 2-GPU run printed (issue 23): DDP's flag notice per rank, bitsandbytes' kernels note,
# the HF hub's retries; and the `kernels` package's offline note (kernels 0.19, transformers 5.25).
# Each pattern is a substring of one of them.
NOISE = (
    "find_unused_parameters",
    "kernels-community",
    "Retrying in",
    "thrown while requesting",
    "Skipping publisher trust check",
)

# Stands in for the `kernels` package on an offline machine: bitsandbytes asks it for a CPU kernel
# at import (on CPUs with AVX512-BF16, GPU hosts included); it asks the hub, which logs its retries
# through its own logger, and fails. Writes a marker so the test knows it was asked. Where the real
# package is installed (transformers >= 5.25 depends on it and imports its names), the stand-in is
# the real package with only get_kernel replaced.
FAKE_KERNELS = """
import os
import sys
from pathlib import Path


def _real_package_init():
    here = Path(__file__).resolve().parent
    for entry in sys.path:
        init = Path(entry or ".").resolve() / "kernels" / "__init__.py"
        if init.is_file() and init.parent != here:
            return init
    return None


_real = _real_package_init()
if _real is not None:
    __path__.append(str(_real.parent))
    exec(compile(_real.read_text(encoding="utf-8"), str(_real), "exec"))

from huggingface_hub.utils import _http


def get_kernel(repo_id, version=None, **kwargs):
    Path(os.environ["ARCHEHR_TEST_KERNELS_ASKED"]).touch()
    url = f"https://huggingface.co/api/models/{repo_id}"
    for n in range(1, 6):
        _http.logger.warning(f"'(ConnectionError('offline'))' thrown while requesting HEAD {url}")
        _http.logger.warning(f"Retrying in {2 ** (n - 1)}s [Retry {n}/5].")
    raise ConnectionError(f"cannot reach {url}")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_tiny_run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, bool]:
    """`accelerate launch` of train.py as a user types it: 2 processes (gloo on CPU), joint domain
    stage on the bundled sample, one step; with the fake `kernels` package importable."""
    fake = tmp_path / "site"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "__init__.py").write_text(FAKE_KERNELS, encoding="utf-8")
    asked = tmp_path / "kernels-asked"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        ARCHEHR_TEST_KERNELS_ASKED=str(asked),
        PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "train.py"),
        "--stage",
        "domain",
        "--preset",
        "tiny",
        "--data",
        str(ROOT / "examples" / "emrqa_sample.jsonl"),
        "--out",
        str(tmp_path / "run"),
        "--max_steps",
        "1",
        "--batch_tokens",
        "0",
        "--save_every",
        "0",
        "--plot",
        "false",
        "--no-progress",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, asked.exists()


def test_a_normal_two_process_run_prints_no_library_noise(tmp_path):
    proc, _ = two_process_tiny_run(tmp_path)
    assert [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)] == []
    assert "step 1/1" in proc.stderr  # the run's own progress is still there


@pytest.mark.slow
def test_verbose_shows_the_library_noise(tmp_path):
    proc, kernels_asked = two_process_tiny_run(tmp_path, "--verbose")
    assert proc.stderr.count("find_unused_parameters") == 2  # once per rank
    if kernels_asked:  # bitsandbytes asks only on CPUs with AVX512-BF16
        assert "kernels-community" in proc.stderr and proc.stderr.count("Retrying in") == 10


def _emit_through_the_libraries_loggers(verbose: bool) -> str:
    """The kernels note and hub retry lines sent through the loggers that send them, after the
    CLIs' filter: independent of this CPU's features."""
    code = (
        "import logging; from plumbing.console import quiet_library_noise; "
        f"quiet_library_noise({verbose}); import bitsandbytes; "
        "from huggingface_hub.utils import _http; "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
        "'Failed to load CPU gemm_4bit_forward from kernels-community: offline'); "
        "_http.logger.warning(\"'(ConnectionError())' thrown while requesting HEAD https://huggingface.co/x\"); "
        "_http.logger.warning('Retrying in 1s [Retry 1/5].'); "
        "logging.getLogger('kernels._internals.hf_hub').warning("
        "\"Skipping publisher trust check for 'kernels-community/x' because Hugging Face Hub is in offline mode.\")"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_kernels_note_and_hub_retries_hidden_unless_verbose():
    loud, quiet = _emit_through_the_libraries_loggers(True), _emit_through_the_libraries_loggers(False)
    assert all(n in loud for n in NOISE[1:])
    assert not any(n in quiet for n in NOISE)
