"""Seconds a fresh process spends importing what ``infer.py``'s load imports: torch,
transformers with the Qwen3 modelling code, bitsandbytes (``--path transformers``); or torch and
what the standalone load imports instead (``--path standalone``: tokenizers, Jinja, safetensors,
bitsandbytes without torch's compiler); and how many of the imported modules had cached
bytecode (a ``.pyc``). One JSON line on stdout.

    python -m bench.import_cost            # run it twice: the second run reads the first's bytecode
    python -m bench.import_cost --path standalone

BENCHMARKS.md (sixth pass): on the GPU machine these imports are most of ``infer.py``'s load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

from plumbing.errors import CliParser, exit_on_input_error


@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--path", choices=("transformers", "standalone"), default="transformers", help="default: transformers"
    )
    args = p.parse_args(argv)
    out: dict = {
        "path": args.path,
        "dont_write_bytecode": sys.flags.dont_write_bytecode,
        "pycache_prefix": sys.pycache_prefix,
        "python": sys.version.split()[0],
    }
    t = time.perf_counter()
    import torch

    out["torch_s"] = round(time.perf_counter() - t, 3)
    if args.path == "standalone":
        t = time.perf_counter()
        import jinja2.sandbox  # noqa: F401 - the chat template
        import safetensors.torch  # noqa: F401 - the weights
        import tokenizers  # noqa: F401 - the tokenizer

        out["tokenizers_jinja_safetensors_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        from model.standalone_qwen3 import import_bitsandbytes

        import_bitsandbytes()
        out["bitsandbytes_s"] = round(time.perf_counter() - t, 3)
        out["compiler_imported"] = "torch._dynamo" in sys.modules
    else:
        t = time.perf_counter()
        import transformers
        import transformers.models.qwen3.modeling_qwen3  # noqa: F401 - the class the base loads with
        from transformers import AutoTokenizer  # noqa: F401 - the tokenizer's import path

        out["transformers_s"] = round(time.perf_counter() - t, 3)
        out["transformers"] = transformers.__version__
        t = time.perf_counter()
        import bitsandbytes  # noqa: F401 - the NF4 base

        out["bitsandbytes_s"] = round(time.perf_counter() - t, 3)
    out["torch"] = torch.__version__
    cached = uncached = 0
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not source or not source.endswith(".py"):
            continue
        if os.path.exists(importlib.util.cache_from_source(source)):
            cached += 1
        else:
            uncached += 1
    out.update(modules=len(sys.modules), py_modules_with_bytecode=cached, py_modules_without_bytecode=uncached)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
