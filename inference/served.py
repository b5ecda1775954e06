"""Subtask 3 answers from a serving engine (vLLM, SGLang, or any OpenAI-compatible server) that
serves the merged model (``train.py export RUN --merged``).

    python -m inference.served cases.xml --url http://127.0.0.1:8000/v1 --model archehr \\
        --tokenizer runs/task/export/merged --out runs/served

The prompts are built here with our own prompt builder and chat template (thinking disabled), the
exact text ``infer.py`` decodes from, and sent to the server's ``/completions`` endpoint as plain
text (so the server's chat handling cannot change them), greedy (temperature 0), stopped at
``<|im_end|>``. The answers then go through our cleaning, 75-word cut, extractive fallback for an
empty answer (named on stderr) and the official validation, and are written as
``OUT/subtask3/submission.json`` + ``OUT/subtask3.zip``, all or nothing. The alignment head is not
served: Subtasks 2 and 4 come from ``infer.py --export RUN/export --subtasks 2,4``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from plumbing.errors import CliParser, InputError, exit_on_input_error, exit_on_interrupt
from plumbing.ranges import DEFAULT_NEW_TOKENS, GENERATION_BATCH, MAX_NEW_TOKENS
from data.records import Case

STOP = ["<|im_end|>", "<|endoftext|>"]


class ServedGenerator:
    """``generate_answers`` (as :class:`model.loaded_export.LoadedExport` has it) over HTTP."""

    def __init__(self, url: str, model: str, tokenizer, timeout_s: float = 600.0):
        self.url = url.rstrip("/") + "/completions"
        self.model, self.tokenizer, self.timeout_s = model, tokenizer, timeout_s

    def prompts(self, cases: list[Case]) -> list[str]:
        from data.prompts import chat_prompt, example_from_case

        return [chat_prompt(self.tokenizer, example_from_case(c, with_answer=False))[0] for c in cases]

    def generate_answers(
        self, cases: list[Case], max_new_tokens: int = DEFAULT_NEW_TOKENS, batch_size: int = 16
    ) -> list[str]:
        body = {
            "model": self.model,
            "prompt": self.prompts(cases),
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "stop": STOP,
        }
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"}
        )
        try:
            with _opener(self.url).open(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise InputError(
                f"the server answered HTTP {err.code} ({err.reason}); is --model the served name?", self.url
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise InputError(f"cannot reach the server ({getattr(err, 'reason', err)})", self.url) from None
        except json.JSONDecodeError:
            raise InputError("the server's reply is not JSON", self.url) from None
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != len(cases):
            raise InputError(f"expected {len(cases)} completions, got {len(choices or [])}", self.url)
        # OpenAI's completions API gives each choice the index of its prompt.
        ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        return [str(c.get("text") or "") if isinstance(c, dict) else "" for c in ordered]


def _opener(url: str) -> urllib.request.OpenerDirector:
    """A server on this machine is reached directly, whatever HTTP(S)_PROXY says."""
    from urllib.parse import urlsplit

    local = urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
    return urllib.request.build_opener(urllib.request.ProxyHandler({})) if local else urllib.request.build_opener()


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m inference.served", description=__doc__.split("\n\n")[0])
    p.add_argument("xml", type=Path, help="official cases XML")
    p.add_argument(
        "--url", required=True, help="the server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    )
    p.add_argument("--model", required=True, help="the served model name (vllm --served-model-name)")
    p.add_argument(
        "--tokenizer",
        required=True,
        type=Path,
        help="the merged folder (or the export): its chat template builds the prompts",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (subtask3/, subtask3.zip)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier set in --out")
    p.add_argument(
        "--max-new-tokens",
        type=MAX_NEW_TOKENS.argtype(),
        default=DEFAULT_NEW_TOKENS,
        help=MAX_NEW_TOKENS.help("generation budget (default: %(default)s)"),
    )
    p.add_argument(
        "--batch-size",
        type=GENERATION_BATCH.argtype(),
        default=64,
        help=GENERATION_BATCH.help("prompts per request (default: %(default)s)"),
    )
    return p


def served_answers(
    generator: "ServedGenerator", cases: list[Case], batch_size: int, max_new_tokens: int
) -> tuple[dict[str, str], list[str]]:
    """Cleaned answers by case id, as ``infer.py`` makes them; the cases whose served answer came
    back empty get the extractive answer instead (returned second, so the run can say so)."""
    from baselines.extractive import answers_or_extractive

    raw: dict[str, str] = {}
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        texts = generator.generate_answers(batch, max_new_tokens=max_new_tokens, batch_size=batch_size)
        raw.update(zip((case.case_id for case in batch), texts, strict=True))
    return answers_or_extractive(cases, raw)


@exit_on_interrupt
@exit_on_input_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data.archehr import load_xml
    from plumbing.atomic import OutputSet, check_output_set_target
    from data.submission import subtask3_entries, write_submission
    from model.backbone import load_tokenizer
    from model.export_folder import MANIFEST

    check_output_set_target(args.out, args.overwrite)
    cases = load_xml(args.xml)
    if not (args.tokenizer / "tokenizer_config.json").is_file():
        hint = " (an export folder: pass its merged/ folder)" if (args.tokenizer / MANIFEST).is_file() else ""
        raise InputError(f"no tokenizer here{hint}", args.tokenizer)
    generator = ServedGenerator(args.url, args.model, load_tokenizer(str(args.tokenizer)))
    answers, fell_back = served_answers(generator, cases, args.batch_size, args.max_new_tokens)
    for case_id in fell_back:
        print(
            f"warning: case {case_id}: the served answer was empty; the extractive answer replaces it", file=sys.stderr
        )
    with OutputSet(args.out, args.overwrite) as stage:
        write_submission(subtask3_entries(answers), stage, 3, cases)
    print(
        f"subtask 3: {args.out / 'subtask3' / 'submission.json'} ({len(answers)} answers, "
        f"{len(fell_back)} extractive fallbacks)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
