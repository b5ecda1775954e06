"""A Qwen3 tokenizer without transformers: ``tokenizers`` for the text, Jinja for the chat template.

infer.py's load spent most of its seconds importing transformers (BENCHMARKS.md, issue 22:
about 6 s of the H200 machine's 12-17 s load went to the tokenizer step alone), yet inference
asks a tokenizer for little: the chat prompt, token ids with character offsets, decoding, and
a few special ids. :class:`ChatTokenizer` does exactly that from a folder's ``tokenizer.json``
and ``tokenizer_config.json``, with the results of transformers' tokenizer for the Qwen3 files
(CPU tests compare the two on many texts and prompts). The standalone load
(:mod:`model.standalone_qwen3`) takes it; every other path keeps ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plumbing.errors import InputError, first_line

TOKENIZER_FILE, TOKENIZER_CONFIG, TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"


def chat_tokenizer_unsupported(folder: Path) -> str | None:
    """Why :func:`load_chat_tokenizer` cannot read ``folder`` (None: it can)."""
    if not (folder / TOKENIZER_FILE).is_file():
        return f"no {TOKENIZER_FILE} in the tokenizer folder"
    try:
        config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {TOKENIZER_CONFIG} in the tokenizer folder"
    if config.get("tokenizer_class") not in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        return f"tokenizer class {config.get('tokenizer_class')!r} is not Qwen2Tokenizer"
    if not isinstance(config.get("chat_template"), str) and not (folder / TEMPLATE_FILE).is_file():
        return "the tokenizer folder has no chat template"
    return None


@dataclass
class ChatTokenizer:
    """The tokenizer calls inference makes, with transformers' results for Qwen3's files."""

    backend: Any  # tokenizers.Tokenizer
    chat_template: str
    eos_token: str
    pad_token: str
    special_ids: frozenset[int]
    padding_side: str = "right"
    unk_token_id: int | None = None
    _template: Any = field(default=None, repr=False)

    @property
    def eos_token_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self._id(self.pad_token)

    def _id(self, token: str) -> int:
        index = self.backend.token_to_id(token)
        if index is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return int(index)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        index = self.backend.token_to_id(token)
        return None if index is None else int(index)

    def __call__(
        self,
        text: str | list[str],
        *,
        add_special_tokens: bool = False,
        return_offsets_mapping: bool = False,
        verbose: bool = True,
    ) -> dict[str, Any]:
        """``input_ids`` (and ``offset_mapping``) of one text or a batch; Qwen3 adds no special tokens."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        out: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encodings]
        return {k: v[0] for k, v in out.items()} if single else out

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        text: str = self.backend.decode(ids, skip_special_tokens=False)
        return text

    def batch_decode(self, rows: Any, skip_special_tokens: bool = False) -> list[str]:
        rows = rows.tolist() if hasattr(rows, "tolist") else rows
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """The template's text (transformers' Jinja settings); ``tokenize=True`` is not offered."""
        if tokenize:
            raise ValueError("ChatTokenizer.apply_chat_template renders text only (tokenize=False)")
        if self._template is None:
            self._template = _compile(self.chat_template)
        text: str = self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            **kwargs,
        )
        return text


def _compile(template: str) -> Any:
    """The template compiled as transformers compiles chat templates: a sandboxed environment,
    blocks trimmed, loop controls, ``tojson`` and ``raise_exception``."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def load_chat_tokenizer(folder: str | Path) -> ChatTokenizer:
    """The tokenizer of a local folder (``tokenizer.json`` + ``tokenizer_config.json``, as
    :func:`chat_tokenizer_unsupported` checks first)."""
    from tokenizers import Tokenizer

    root = Path(folder)
    why_not = chat_tokenizer_unsupported(root)
    if why_not:
        raise ValueError(f"{root}: {why_not}")
    config = json.loads((root / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if not isinstance(template, str):
        template = (root / TEMPLATE_FILE).read_text(encoding="utf-8")
    try:
        backend = Tokenizer.from_file(str(root / TOKENIZER_FILE))
    except Exception as err:  # tokenizers raises its own exception types for a broken file
        raise InputError(f"unreadable tokenizer ({first_line(err)})", root / TOKENIZER_FILE) from None
    eos = _token_text(config.get("eos_token"))
    pad = _token_text(config.get("pad_token")) or eos
    if not eos:
        raise ValueError(f"{root}: {TOKENIZER_CONFIG} names no eos_token")
    # transformers' skip_special_tokens drops its special tokens: the added tokens marked special
    # plus the named ones (eos, pad, additional_special_tokens).
    special = {int(k) for k, v in (config.get("added_tokens_decoder") or {}).items() if v.get("special")}
    named = [eos, pad, *(_token_text(t) for t in config.get("additional_special_tokens") or [])]
    special.update(i for i in (backend.token_to_id(t) for t in named if t) if i is not None)
    return ChatTokenizer(backend, template, eos, pad, frozenset(special))


def _token_text(token: Any) -> str:
    if isinstance(token, dict):  # an AddedToken written out
        return str(token.get("content") or "")
    return str(token or "")
