"""Load an export folder (``RUN/export``) for inference: backbone + adapter + head (a :class:`LoadedExport`).

The base model comes from the manifest (hub id or local path) unless ``base`` overrides
it; a random-init preset (``tiny``, ``qwen3-4b-random``) is rebuilt from the seed and
shape recorded in the manifest, so tiny exports reload on any machine. Where only the fast engine
runs the merged model, :func:`load_backbone_for_inference` builds it without transformers
(:mod:`model.standalone_qwen3`) when the base is one that load reads.
"""

from __future__ import annotations

from plumbing.ranges import DEFAULT_NEW_TOKENS
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data.prompts import chat_prompt, example_from_case
from data.records import Case
from heads.alignment import NotePairHead, load_head

from .backbone import RANDOM_INIT_SEED, load_adapted, load_tokenizer
from .export_folder import MANIFEST
from .locate import local_model_folder, resolve_device
from .manifest import ExportManifest
from .head_scoring import encode_for_scoring, pair_probabilities
from .lora_merge import ADAPTER_CONFIG, plain_lora_scale
from .presets import PRESETS, ModelPreset, bundled_tokenizer_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class LoadedExport:
    manifest: ExportManifest
    threshold: float
    tokenizer: PreTrainedTokenizerBase
    # A PreTrainedModel (merged) or PeftModel (NF4 + LoRA) in eval mode; Any because transformers'
    # annotations of .generate and .to (functools.wraps) do not type-check at the call sites.
    model: Any
    head: NotePairHead
    # How the backbone was built: "standalone" (model.standalone_qwen3, no transformers) or
    # "transformers" with the reason the standalone load did not apply.
    loader: str = "transformers"

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @torch.no_grad()
    def generate_answers(
        self,
        cases: list[Case],
        max_new_tokens: int = DEFAULT_NEW_TOKENS,
        batch_size: int = 16,
        cache_implementation: str | None = None,
    ) -> list[str]:
        """Greedy answers (raw decoded text), batched with left padding, thinking disabled.

        Prompts are batched in length order (less padding per batch) and the answers
        returned in the order of ``cases``.
        """
        tok = self.tokenizer
        prompts = [chat_prompt(tok, example_from_case(c, with_answer=False))[0] for c in cases]
        lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        answers: list[str] = [""] * len(prompts)
        previous_side = tok.padding_side
        tok.padding_side = "left"
        try:
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                enc = tok([prompts[j] for j in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                out = self.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=stop_ids(tok),
                    # "static" pre-allocates the KV cache, which lets transformers compile the
                    # decode step (CUDA graphs); None keeps the default dynamic cache.
                    **({"cache_implementation": cache_implementation} if cache_implementation else {}),
                )
                new = out[:, enc["input_ids"].shape[1] :]
                for j, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                    answers[j] = text.strip()
        finally:
            tok.padding_side = previous_side
        return answers

    @torch.no_grad()
    def score_pairs(self, case: Case) -> np.ndarray:
        """[n_answer, n_note] link probabilities from one forward over prompt + answer sentences."""
        return self.score_all([case])[0]

    @torch.no_grad()
    def score_all(self, cases: list[Case], batch_size: int = 8) -> list[np.ndarray]:
        """Link probabilities for many cases, several cases per forward (right-padded:
        causal attention keeps every real token's state independent of the padding)."""
        out, encoded = encode_for_scoring(self.tokenizer, cases)
        probs = pair_probabilities(
            self.model,
            self.head,
            [enc for _, enc in encoded],
            batch_size=batch_size,
            pad_id=self.tokenizer.pad_token_id,
        )
        for (i, _), p in zip(encoded, probs):
            out[i] = p
        return out  # type: ignore[return-value]


def stop_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS and Qwen's ``<|im_end|>``."""
    ids = {tok.eos_token_id}
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def preset_from_manifest(manifest: ExportManifest) -> ModelPreset:
    """The preset an export was trained with, its random-init shape as recorded (not today's table)."""
    name = manifest.preset
    random_init = manifest.base_model.random_init
    if name in PRESETS:
        preset = PRESETS[name]
        if random_init and dict(random_init.arch) != dict(preset.arch):
            # The table changed since training: rebuild the recorded shape, not today's.
            preset = ModelPreset(name, source=None, arch=dict(random_init.arch), load_in_4bit=preset.load_in_4bit)
        return preset
    if random_init:
        return ModelPreset(str(name), source=None, arch=dict(random_init.arch), load_in_4bit=False)
    return ModelPreset(str(name), source=manifest.base_model.id)


def base_in_4bit(manifest: ExportManifest, preset: ModelPreset, device: str) -> bool:
    """Whether inference loads the base in NF4 by default: as training loaded it (the manifest's
    ``base_model.load_in_4bit``; the preset's default for a manifest without it), on CUDA; on a
    CPU only when asked. A base trained unquantised (``--load_in_4bit false``) and merged through
    NF4 would not be the model that was trained, nor an NF4-trained one merged unquantised."""
    if torch.device(device).type != "cuda":
        return False
    trained = manifest.base_model.load_in_4bit
    return preset.load_in_4bit if trained is None else bool(trained)


def load_export(
    export_dir: str | Path,
    *,
    base: str | None = None,
    device: str | None = None,
    load_in_4bit: bool | None = None,
    merge: bool | None = None,
    timings: dict[str, float] | None = None,
    engine_only: bool = False,
) -> LoadedExport:
    """Rebuild tokenizer, base model + LoRA adapter and head from an export folder.

    ``base`` overrides the manifest's base model id/path; ``load_in_4bit`` defaults to
    the base as trained (:func:`base_in_4bit`; on CPU only when asked). ``merge`` (default:
    on CUDA) folds the adapter into dense bf16 weights of the NF4 base as trained
    (:func:`model.backbone.load_merged`): about 8 GB at 4B instead of 2.5, much faster
    decoding; ``merge=False`` keeps NF4 + LoRA for small cards. ``timings`` (a dict) receives
    the seconds of each step: checks, tokenizer, base, dequantise, adapter + merge, head.
    """
    from plumbing.timing import StepClock

    clock = StepClock(timings)
    root = Path(export_dir)
    if (root / "export" / MANIFEST).is_file():
        root = root / "export"
    from .export_checks import check_export  # every file and field, before anything is built

    manifest = check_export(root, base)
    clock("check_s")
    preset = preset_from_manifest(manifest)
    base_path = base or manifest.base_model.path or None
    random_init = manifest.base_model.random_init
    device = resolve_device(device)
    if load_in_4bit is None:
        load_in_4bit = base_in_4bit(manifest, preset, device)
    seed = random_init.seed if random_init is not None else RANDOM_INIT_SEED
    if merge is None:  # dense merged weights decode several times faster; default where memory is plentiful
        merge = torch.device(device).type == "cuda"
    model, tokenizer, loader = load_backbone_for_inference(
        preset, root, merge=merge, load_in_4bit=load_in_4bit, device=device, base_path=base_path, seed=seed,
        engine_only=engine_only, timings=timings,
    )  # fmt: skip
    clock.restart()  # the loads timed their own steps into ``timings``
    head = load_head(root, device=device).eval()
    clock("head_s")
    from .packed import layer_ops

    layer_ops(model)  # the fused kernels probed and compiled here, not in the first forward
    clock("kernels_s")
    return LoadedExport(
        manifest=manifest, threshold=manifest.threshold, tokenizer=tokenizer, model=model, head=head, loader=loader
    )


def standalone_folders(
    preset: ModelPreset, base_path: str | None, seed: int, quantised: bool
) -> tuple[Path, Path] | str:
    """(base folder, tokenizer folder) of a load :mod:`model.standalone_qwen3` can build, or why not."""
    from .backbone import random_base_cache_dir, save_random_base
    from .chat_tokenizer import chat_tokenizer_unsupported
    from .standalone_qwen3 import standalone_unsupported

    if base_path:
        base = tokenizer = local_model_folder(base_path)
    elif preset.source is not None:
        base = local_model_folder(preset.source)
        tokenizer = local_model_folder(preset.tokenizer) if preset.tokenizer else base
    elif quantised:  # a random preset's NF4 load reads the base it writes once as safetensors
        base = save_random_base(preset, random_base_cache_dir(preset, seed), seed=seed)
        tokenizer = local_model_folder(preset.tokenizer) if preset.tokenizer else bundled_tokenizer_dir()
    else:
        return "an unquantised random base is built in memory by transformers"
    if base is None or tokenizer is None:
        return "the base is a hub id not in the local Hugging Face cache"
    why_not = standalone_unsupported(base) or chat_tokenizer_unsupported(tokenizer)
    return why_not if why_not else (base, tokenizer)


def load_backbone_for_inference(
    preset: ModelPreset,
    adapter_dir: Path,
    *,
    merge: bool,
    load_in_4bit: bool,
    device: str,
    base_path: str | None,
    seed: int,
    engine_only: bool,
    timings: dict[str, float] | None = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, loader): the standalone load (:mod:`model.standalone_qwen3`) where only
    the fast engine runs the merged model and the base is one it reads; else tokenizer and
    :func:`model.backbone.load_adapted` through transformers, ``loader`` saying why. The one
    backbone load of ``infer.py`` and of ``bench.run``'s inference rows."""
    from plumbing.timing import StepClock

    clock = StepClock(timings)
    loader = "transformers"
    if engine_only and merge:
        folders = standalone_folders(preset, base_path, seed, load_in_4bit)
        if isinstance(folders, str):
            loader = f"transformers: {folders}"
        elif plain_lora_scale(json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))) is None:
            loader = "transformers: the adapter is not plain LoRA (merged through PEFT)"
        else:
            from .chat_tokenizer import load_chat_tokenizer
            from .standalone_qwen3 import load_standalone_merged

            chat_tokenizer = load_chat_tokenizer(folders[1])
            clock("tokenizer_s")
            standalone = load_standalone_merged(
                folders[0], adapter_dir, quantised=load_in_4bit, device=device, timings=timings
            )
            return standalone, chat_tokenizer, "standalone"
    tokenizer = load_tokenizer(base_path or preset)
    clock("tokenizer_s")
    model = load_adapted(
        preset, adapter_dir, merge=merge, load_in_4bit=load_in_4bit, device=device, base_path=base_path,
        random_seed=seed, timings=timings,
    )  # fmt: skip
    return model, tokenizer, loader
