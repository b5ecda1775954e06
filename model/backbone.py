"""Load the Qwen3 backbone (released or random-init) with LoRA, optionally in NF4 4-bit.

Everything a user's load would do happens here, in one place:

* ``qwen3-4b`` (or ``base_path``): ``AutoModelForCausalLM.from_pretrained`` with
  ``use_safetensors=True`` and never ``trust_remote_code``; NF4 4-bit with double
  quantisation and bf16 compute when quantised.
* ``qwen3-4b-random`` / ``tiny``: a ``Qwen3Config(**arch)`` with a seeded random init.
  Unquantised, it is built in memory; quantised, it is first written once as
  safetensors (:func:`save_random_base`) and then loaded through the very same
  ``from_pretrained`` + ``BitsAndBytesConfig`` path as released weights, so a
  benchmark measures what users run.

LoRA goes on every attention and MLP projection. When quantised the model goes
through ``prepare_model_for_kbit_training`` first (fp32 norms, input grads).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from plumbing.hf_loading import local_code_only
from plumbing.timing import StepClock

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from torch.utils.hooks import RemovableHandle
    from transformers import BitsAndBytesConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from plumbing.errors import InputError

from .locate import default_device  # noqa: F401  (re-exported: callers import it from here)
from .presets import LORA_TARGETS, LoraSettings, ModelPreset, bundled_tokenizer_dir, get_preset  # noqa: F401

RANDOM_INIT_SEED = 0


def head_dim_of(config: PreTrainedConfig) -> int:
    """A Qwen3-style config's attention head size (``head_dim``, else hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def resolve_preset(preset: ModelPreset | str) -> ModelPreset:
    return preset if isinstance(preset, ModelPreset) else get_preset(preset)


def is_random_preset(preset: ModelPreset) -> bool:
    return preset.source is None


def load_tokenizer(preset_or_path: ModelPreset | str) -> PreTrainedTokenizerBase:
    """Tokenizer of a preset (its own, the source's, or the bundled Qwen3 one) or of a folder/hub id."""
    from transformers import AutoTokenizer

    if isinstance(preset_or_path, str) and not isinstance(preset_or_path, ModelPreset):
        try:
            preset = get_preset(preset_or_path)
        except ValueError:
            preset = None
        location = preset_or_path if preset is None else None
    else:
        preset = preset_or_path
        location = None
    if preset is not None:
        location = preset.tokenizer or preset.source or str(bundled_tokenizer_dir())
    try:
        tok = AutoTokenizer.from_pretrained(location)
    except OSError as err:
        raise base_load_error(str(location), err) from None
    if tok.pad_token is None:  # Qwen ships <|endoftext|> as pad; keep a fallback for other folders
        tok.pad_token = tok.eos_token
    return tok


def build_random_base(
    preset: ModelPreset | str, seed: int = RANDOM_INIT_SEED, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A ``Qwen3ForCausalLM`` of the preset's shape, initialised from ``seed`` (global RNG untouched)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    preset = resolve_preset(preset)
    config = Qwen3Config(**preset.arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Qwen3ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    return model


def random_base_cache_dir(preset: ModelPreset | str, seed: int = RANDOM_INIT_SEED) -> Path:
    root = Path(os.environ.get("ARCHEHR_CACHE", Path.home() / ".cache" / "archehr"))
    return root / "random-bases" / f"{resolve_preset(preset).name}-seed{seed}"


def save_random_base(preset: ModelPreset | str, out_dir: str | Path, seed: int = RANDOM_INIT_SEED) -> Path:
    """Write the preset's seeded random model once as safetensors (idempotent); return the folder."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    # Several processes (the ranks of one launch) may ask at once: one builds, the others wait
    # for it and then find the finished folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f"{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
            return out
        return _write_random_base(preset, out, seed)


def _write_random_base(preset: ModelPreset | str, out: Path, seed: int) -> Path:
    preset = resolve_preset(preset)
    # The big shape is stored in bf16 (what users' checkpoints hold); tiny stays fp32.
    dtype = torch.bfloat16 if preset.arch.get("hidden_size", 0) >= 1024 else torch.float32
    model = build_random_base(preset, seed=seed, dtype=dtype)
    # Write beside the target and rename: a crash or a concurrent writer never leaves half a model.
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    from plumbing.atomic import fsync_tree

    fsync_tree(tmp)  # the umask's permissions (safetensors writes 0600), on disk before the rename
    try:
        tmp.rename(out)
    except OSError:  # another process finished first (or `out` is a stale empty folder)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


# The NF4 base as trained: 4-bit NormalFloat, double quantisation (the block scales quantised
# too), bf16 compute. nf4_config hands them to transformers; the standalone inference load
# (model.standalone_qwen3) quantises with them itself.
NF4_QUANT_TYPE, NF4_DOUBLE_QUANT, NF4_COMPUTE_DTYPE = "nf4", True, torch.bfloat16
QUANT_STORAGE = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def nf4_config(quant_storage: str = "uint8") -> BitsAndBytesConfig:
    """NF4, double quantisation, bf16 compute. ``quant_storage`` is the dtype the packed
    4-bit weights are stored in: the default uint8, or ``bfloat16`` for FSDP, which can
    only flatten and shard a layer whose weights share one float dtype."""
    from transformers import BitsAndBytesConfig

    if quant_storage not in QUANT_STORAGE:
        raise ValueError(f"quant_storage must be one of {sorted(QUANT_STORAGE)}, got {quant_storage!r}")
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]  # transformers leaves its __init__ unannotated
        load_in_4bit=True,
        bnb_4bit_quant_type=NF4_QUANT_TYPE,
        bnb_4bit_use_double_quant=NF4_DOUBLE_QUANT,
        bnb_4bit_compute_dtype=NF4_COMPUTE_DTYPE,
        bnb_4bit_quant_storage=QUANT_STORAGE[quant_storage],
    )


def load_base_model(
    preset: ModelPreset | str,
    *,
    load_in_4bit: bool | None = None,
    device: str | torch.device | None = None,
    base_path: str | None = None,
    random_seed: int = RANDOM_INIT_SEED,
    quant_storage: str = "uint8",
) -> PreTrainedModel:
    """The bare causal LM (no LoRA), on ``device``, quantised to NF4 when asked."""
    from transformers import AutoModelForCausalLM

    preset = resolve_preset(preset)
    device = torch.device(device or default_device())
    quantise = preset.load_in_4bit if load_in_4bit is None else load_in_4bit
    if quantise and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    location = base_path or preset.source
    if location is None and quantise:
        location = str(save_random_base(preset, random_base_cache_dir(preset, random_seed), seed=random_seed))
    if location is None:  # unquantised random preset: build directly, no disk round trip
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return _on_device(build_random_base(preset, seed=random_seed, dtype=dtype), device)
    kwargs: dict[str, Any] = dict(use_safetensors=True)
    if quantise:
        kwargs.update(quantization_config=nf4_config(quant_storage), device_map={"": device}, dtype=torch.bfloat16)
    else:
        kwargs.update(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs, **local_code_only())
    except OSError as err:  # no such repo, a download that failed, files missing: one line, not a traceback
        raise base_load_error(location, err) from None
    return model if quantise else _on_device(model, device)


def _on_device(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    # transformers wraps PreTrainedModel.to with functools.wraps, which mypy reads as an unbound method.
    return model.to(device)  # type: ignore[arg-type]


def base_load_error(location: str, err: OSError) -> InputError:
    """The one line a base model that cannot be loaded ends with (InputError, exit 2)."""
    from plumbing.errors import InputError, first_line

    return InputError(
        f"--base {location}: cannot load the model ({first_line(err)}); check the id or folder, "
        f"or download it first (hf download {location})"
    )


def _enable_checkpointing(model: PreTrainedModel) -> None:
    # Non-reentrant checkpointing: works with frozen inputs and with forward hooks.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        # transformers leaves gradient_checkpointing_enable unannotated.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[no-untyped-call]


def lora_config(lora: LoraSettings) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_backbone(
    preset: ModelPreset | str,
    *,
    load_in_4bit: bool | None = None,
    device: str | torch.device | None = None,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = True,
    base_path: str | None = None,
    adapter_dir: str | Path | None = None,
    trainable: bool = True,
    random_seed: int = RANDOM_INIT_SEED,
    keep_bf16: bool = False,
    quant_storage: str = "uint8",
) -> PeftModel:
    """Base model + LoRA as a PEFT model: a fresh adapter, or ``adapter_dir``'s weights.

    ``trainable=False`` gives an inference model (eval mode, no checkpointing).
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    preset = resolve_preset(preset)
    quantise = preset.load_in_4bit if load_in_4bit is None else load_in_4bit
    model = load_base_model(
        preset,
        load_in_4bit=quantise,
        device=device,
        base_path=base_path,
        random_seed=random_seed,
        quant_storage=quant_storage,
    )
    model.config.use_cache = not trainable
    if quantise and trainable:
        if keep_bf16:
            # PEFT's prepare step upcasts every non-quantised weight to fp32, the tied
            # embedding/lm_head included (0.8 GB more at 4B, and fp32 lm_head matmuls).
            # Under bf16 autocast that upcast buys nothing; freezing is all we need.
            for param in model.parameters():
                param.requires_grad_(False)
        else:
            # peft leaves prepare_model_for_kbit_training unannotated; it returns the model it was given.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # type: ignore[no-untyped-call]
    if trainable and gradient_checkpointing:
        _enable_checkpointing(model)
    peft_model: PeftModel
    if adapter_dir is not None:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    else:
        peft_model = get_peft_model(model, lora_config(lora or LoraSettings()))
    if not trainable:
        peft_model.eval()
    return peft_model


class AttentionBlock(Protocol):
    """What the fast paths use of a Qwen3 attention block (``Qwen3Attention``)."""

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module
    k_norm: nn.Module
    head_dim: int
    scaling: float


class DecoderLayer(Protocol):
    """What the fast paths use of a Qwen3 decoder layer (``Qwen3DecoderLayer``)."""

    self_attn: AttentionBlock
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    mlp: nn.Module
    training: bool
    gradient_checkpointing: bool  # transformers' GradientCheckpointingLayer flag
    _compiled_call_impl: Callable[..., Any] | None  # set by compile()

    def register_forward_hook(self, hook: Callable[..., None]) -> RemovableHandle: ...

    def compile(self, *args: Any, **kwargs: Any) -> None: ...


class DecoderStack(Protocol):
    """What this package uses of the bare transformer under a causal LM (``Qwen3Model``)."""

    config: PreTrainedConfig
    embed_tokens: nn.Embedding
    layers: Sequence[DecoderLayer]
    norm: nn.Module
    rotary_emb: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def unwrapped(model: nn.Module) -> nn.Module:
    """The causal LM under a PEFT wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)  # a PEFT wrapper's
    return get_base_model() if get_base_model is not None else model


def decoder(model: nn.Module) -> DecoderStack:
    """The bare transformer (``Qwen3Model``) under a PEFT or plain causal-LM wrapper."""
    # Its submodules are set at run time per architecture (mypy sees ``Tensor | Module``): the
    # protocol names the structure this package relies on.
    return cast("DecoderStack", unwrapped(model).model)


def lm_head(model: nn.Module) -> nn.Module:
    return cast(nn.Module, unwrapped(model).lm_head)


def is_quantised(model: nn.Module) -> bool:
    return bool(getattr(unwrapped(model), "is_loaded_in_4bit", False))


def _layer_module(dec: DecoderStack, layer: int) -> nn.Module | DecoderLayer | None:
    """Module whose output is hidden state ``layer`` (output_hidden_states numbering); None = final."""
    n = len(dec.layers)
    if layer in (-1, n):
        return None
    if layer < 0:
        layer = n + 1 + layer
    if not 0 <= layer < n:
        raise ValueError(f"head layer {layer} out of range for a {n}-layer model")
    return dec.embed_tokens if layer == 0 else dec.layers[layer - 1]


@contextlib.contextmanager
def tap_hidden(dec: DecoderStack, layer: int) -> Iterator[dict[str, torch.Tensor]]:
    """Capture one intermediate hidden state with a forward hook (no all-layers tuple)."""
    module = _layer_module(dec, layer)
    captured: dict[str, torch.Tensor] = {}
    if module is None:
        yield captured
        return

    def hook(_mod: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        captured["hidden"] = out[0] if isinstance(out, tuple) else out

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def training_attention() -> contextlib.AbstractContextManager[None]:
    """The attention kernels of a training step: PyTorch's SDPA without cuDNN's.

    On the H200 with torch 2.11, SDPA took cuDNN's kernel, masked or causal, and each call spent
    so long on the host that the GPU sat idle for a quarter to a half of a checkpointed step
    (BENCHMARKS.md, issue 21, fifth pass). Causal attention without a padding mask (what
    training sends, :func:`training.joint.joint_losses`) takes the flash kernel instead. Held
    for the forward and the backward alike: a checkpointed layer's recompute must take the
    kernel its forward took."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def backbone_hidden(
    backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(final normed hidden [B,T,H], the head's hidden [B,T,H]) from one forward (``attention_mask``
    None: causal attention only, exact for the real tokens of right-padded rows)."""
    dec = decoder(backbone)
    with tap_hidden(dec, layer) as captured:
        out = dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    final = out.last_hidden_state
    return final, captured.get("hidden", final)


@torch.no_grad()
def dense_from_4bit(module: nn.Linear, chunk: int = 4096) -> nn.Linear:
    """The dense Linear that a 4-bit layer computes, read off its own forward pass.

    Feeding the identity through the layer returns its effective weight exactly as the
    training forward used it (same dequantisation kernel, products with 1 and 0 are
    exact), on any device; bitsandbytes' standalone dequantise has disagreed with its
    own CPU forward, so this avoids depending on the two staying in step.
    """
    in_f, out_f = module.in_features, module.out_features
    device = module.weight.device
    dtype = getattr(module, "compute_dtype", None) or torch.bfloat16
    weight = torch.empty(out_f, in_f, dtype=dtype, device=device)
    for start in range(0, in_f, chunk):
        stop = min(in_f, start + chunk)
        probe = torch.zeros(stop - start, in_f, dtype=dtype, device=device)
        probe[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=device)
        out = module(probe)
        if module.bias is not None:
            out = out - module.bias.to(out.dtype)
        weight[:, start:stop] = out.T.to(dtype)
    dense = nn.Linear(in_f, out_f, bias=module.bias is not None, device=device, dtype=dtype)
    dense.weight.copy_(weight)
    if module.bias is not None:
        dense.bias.copy_(module.bias.to(dtype))
    return dense


def dequantize_model(model: PreTrainedModel) -> None:
    """Replace every 4-bit Linear with its dense bf16 equivalent, in place."""
    from bitsandbytes.nn.modules import Linear4bit

    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Linear4bit)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dense_from_4bit(mod))
        del mod
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        setattr(model, "hf_quantizer", None)
    if getattr(model, "quantization_method", None) is not None:  # else .to(dtype) is refused as bitsandbytes
        setattr(model, "quantization_method", None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_merged(
    preset: ModelPreset | str,
    adapter_dir: str | Path,
    *,
    load_in_4bit: bool | None = None,
    device: str | torch.device | None = None,
    base_path: str | None = None,
    random_seed: int = RANDOM_INIT_SEED,
    timings: dict[str, float] | None = None,
) -> PreTrainedModel:
    """Inference model with the LoRA merged into dense weights (no adapter overhead per step).

    A QLoRA adapter was trained against the NF4 base, so the base is loaded in NF4 as in
    training, turned dense (:func:`dequantize_model`) and the adapter merged into that:
    the merged model computes what the trained model computed, up to bf16 rounding.
    ``timings`` (a dict) receives the seconds of each step: base, dequantise, adapter + merge
    (:func:`model.lora_merge.merge_adapter`: PEFT's fold without its wrappers or its import).
    """
    clock = StepClock(timings)
    preset = resolve_preset(preset)
    quantise = preset.load_in_4bit if load_in_4bit is None else load_in_4bit
    model = load_base_model(preset, load_in_4bit=quantise, device=device, base_path=base_path, random_seed=random_seed)
    clock("base_s")
    if quantise:
        dequantize_model(model)
    clock("dequantise_s")
    model.config.use_cache = True
    from .lora_merge import merge_adapter

    if not merge_adapter(model, adapter_dir):  # not a plain LoRA adapter: PEFT's own merge
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
    clock("adapter_merge_s")
    nn.Module.eval(model)  # transformers leaves its own eval unannotated
    return model


def load_adapted(
    preset: ModelPreset | str,
    adapter_dir: str | Path,
    *,
    merge: bool,
    load_in_4bit: bool | None = None,
    device: str | torch.device | None = None,
    base_path: str | None = None,
    random_seed: int = RANDOM_INIT_SEED,
    timings: dict[str, float] | None = None,
) -> PreTrainedModel | PeftModel:
    """The base model with a trained adapter, for inference: merged into dense weights
    (:func:`load_merged`) or kept as NF4 + LoRA (less memory); ``timings`` gets the steps."""
    if merge:
        return load_merged(
            preset,
            adapter_dir,
            load_in_4bit=load_in_4bit,
            device=device,
            base_path=base_path,
            random_seed=random_seed,
            timings=timings,
        )
    clock = StepClock(timings)
    model = load_backbone(
        preset,
        load_in_4bit=load_in_4bit,
        device=device,
        base_path=base_path,
        adapter_dir=adapter_dir,
        trainable=False,
        random_seed=random_seed,
    )
    clock("base_adapter_s")
    return model


def start_compile_workers() -> bool:
    """Start inductor's compile worker processes now, so they come up while the data and
    weights load. torch starts them only when the first graph reaches inductor, and a kernel
    reached before they are ready compiles in this process, one after another. False where
    this torch has no such hook (nothing started; compiling still works)."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:
        return False
    maybe_warm_pool()
    return True


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer (regional compilation: one graph reused by all
    layers, dynamic sequence lengths), fusing the norm / RoPE / SwiGLU element-wise work.
    The first steps pay the compile time.

    Python floats (norm eps, LoRA dropout p and scaling) are compiled in as constants; they
    never change during a run. Left symbolic (``dynamic=True``'s default), dynamo traced each
    layer twice (it restarts once it has turned them into tensors). With
    :func:`start_compile_workers`, this took the warm-up from ~70 s to ~20 s on an H200
    (BENCHMARKS.md, issue 21). The setting is dynamo's, so it holds for the whole process.

    A layer under gradient checkpointing is checkpointed around its compiled call
    (:func:`checkpoint_compiled_call`), whatever the transformers version."""
    torch._dynamo.config.specialize_float = True
    for layer in decoder(model).layers:
        layer.compile(dynamic=True)
        if getattr(layer, "gradient_checkpointing", False):
            checkpoint_compiled_call(layer)


def checkpoint_compiled_call(layer: DecoderLayer) -> None:
    """Checkpoint ``layer`` around its compiled call instead of inside it.

    transformers >= 5.24 checkpoints a layer inside its ``forward``, that is inside the compiled
    region, and torch's ``checkpoint`` runs what it calls with dynamo disabled: the compiled
    layer ran eagerly, forward and recompute (a CPU profile: no compiled graph called, the norms'
    and SwiGLU's element-wise ops one by one). transformers 5.17 checkpointed around the call, so
    the forward and the recompute both ran the compiled graph; this does the same for any
    version: the layer's own checkpointing off, ours around ``_compiled_call_impl``."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    compiled = layer._compiled_call_impl
    if compiled is None:
        raise ValueError("checkpoint_compiled_call needs a compiled layer (layer.compile() first)")
    checkpoint_fn = getattr(layer, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
    layer.gradient_checkpointing = False

    def call(*args: Any, **kwargs: Any) -> Any:
        if layer.training and torch.is_grad_enabled():
            # As transformers does under checkpointing: no KV cache (the recompute would write
            # it twice). Training loads the model with use_cache off, so none comes here.
            for key in ("past_key_values", "cache", "layer_past"):
                if kwargs.get(key) is not None:
                    kwargs[key] = None
            return checkpoint_fn(partial(compiled, **kwargs), *args)
        return compiled(*args, **kwargs)

    layer._compiled_call_impl = call
