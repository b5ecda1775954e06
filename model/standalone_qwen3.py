"""The merged Qwen3 for the fast engine, loaded straight from safetensors: no transformers import.

infer.py's load spent most of its seconds importing transformers and its modelling code
(BENCHMARKS.md, issue 22: 10 s of imports on the H200 machine, against a 5 s target), yet the
fast engine (:mod:`model.packed`, :mod:`model.decoding`) runs its own layer loop and reads only
the model's weights, its norms' epsilon and a few config fields. :func:`load_standalone_merged`
builds that module tree under transformers' attribute names (``model.layers[i].self_attn.q_proj``
...) from a local folder's ``config.json`` and safetensors:

* the seven projections of every layer go through NF4 and back as the training forward saw them
  (bitsandbytes' ``Params4bit`` with the settings of :func:`model.backbone.nf4_config`, read back
  as its forward reads it; on CUDA the same kernels called directly, which keeps torch's compiler
  unimported), when the adapter was trained on an NF4 base;
* the adapter is folded in by :func:`model.lora_merge.merge_adapter`, as in the merged load.

The weights equal :func:`model.backbone.load_merged`'s bit for bit (CPU and GPU tests). The tree
has no forward of its own: only the engine's loops run it. :func:`standalone_unsupported` says
why a base cannot be read this way (not Qwen3, scaled rotary embeddings, not a local folder), and
the caller then loads through transformers and records why.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plumbing.errors import InputError, first_line
from plumbing.timing import StepClock

from .backbone import NF4_COMPUTE_DTYPE, NF4_DOUBLE_QUANT, NF4_QUANT_TYPE, QUANT_STORAGE, dense_from_4bit
from .safetensors_stream import TensorEntry, stream_tensors

CONFIG_FILE, INDEX_FILE = "config.json", "model.safetensors.index.json"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


@dataclass(frozen=True)
class StandaloneConfig:
    """The ``config.json`` fields a Qwen3 forward needs (transformers' names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    model_type: str = "qwen3"
    hidden_act: str = "silu"
    use_sliding_window: bool = False

    @classmethod
    def from_folder(cls, folder: Path) -> StandaloneConfig:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        rope = raw.get("rope_parameters") or {}
        values = dict(raw)
        values["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        values["head_dim"] = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
        values["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", False))
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def standalone_unsupported(folder: Path | None) -> str | None:
    """Why :func:`load_standalone_merged` cannot build the base in ``folder`` (None: it can)."""
    if folder is None or not folder.is_dir():
        return "the base is not a local folder"
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {CONFIG_FILE} in the base folder"
    try:
        weights = _weight_files(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return f"an unreadable {INDEX_FILE} in the base folder"
    if not weights:
        return "no safetensors weights in the base folder"
    if raw.get("model_type") != "qwen3":
        return f"model type {raw.get('model_type')!r} is not qwen3"
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rotary embedding type {rope.get('rope_type', rope.get('type'))!r} (only the default is built here)"
    if raw.get("use_sliding_window") or any(t != "full_attention" for t in raw.get("layer_types") or []):
        return "sliding-window attention"
    if raw.get("attention_bias") or raw.get("hidden_act", "silu") != "silu":
        return "attention bias or an activation other than SiLU"
    if "quantization_config" in raw:
        return "the base folder holds quantised weights"
    return None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [folder / s for s in shards]
        return files if all(f.is_file() for f in files) else []  # a part-downloaded snapshot: not here
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalised in fp32, cast back, times the weight."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device="meta"))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out: torch.Tensor = self.weight * h.to(x.dtype)
        return out


class RotaryEmbedding(nn.Module):
    """Qwen3's default rotary embedding: (cos, sin) [B, T, head_dim] for positions [B, T]."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.register_buffer(
            "inv_freq", 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), persistent=False
        )

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False, device="meta")


class Attention(nn.Module):
    def __init__(self, c: StandaloneConfig):
        super().__init__()
        self.head_dim, self.scaling = c.head_dim, c.head_dim**-0.5
        self.q_proj = _linear(c.hidden_size, c.num_attention_heads * c.head_dim)
        self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.o_proj = _linear(c.num_attention_heads * c.head_dim, c.hidden_size)
        self.q_norm, self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps), RMSNorm(c.head_dim, c.rms_norm_eps)


class MLP(nn.Module):
    def __init__(self, c: StandaloneConfig):
        super().__init__()
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


def _engine_only(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError(
        "the standalone Qwen3 has no forward of its own: the fast engine's loops run it (model.packed, "
        "model.decoding); load with transformers (engine_only=False) for the plain path"
    )


class DecoderLayer(nn.Module):
    forward = _engine_only

    def __init__(self, c: StandaloneConfig):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Decoder(nn.Module):
    forward = _engine_only

    def __init__(self, c: StandaloneConfig):
        super().__init__()
        self.config = c
        # A meta weight handed in: nn.Embedding's own initialisation runs, on the meta device,
        # through torch's Python references, which import dynamo (seconds of infer.py's load).
        self.embed_tokens = nn.Embedding(
            c.vocab_size, c.hidden_size, _weight=torch.empty(c.vocab_size, c.hidden_size, device="meta")
        )
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta)


class StandaloneQwen3(nn.Module):
    """A Qwen3 causal LM's modules under transformers' names, for the fast engine's loops only."""

    forward = _engine_only

    def __init__(self, c: StandaloneConfig):
        super().__init__()
        self.config = c
        self.model = Decoder(c)
        self.lm_head = _linear(c.hidden_size, c.vocab_size)


def load_standalone_merged(
    folder: str | Path,
    adapter_dir: str | Path,
    *,
    quantised: bool,
    device: str | torch.device,
    timings: dict[str, float] | None = None,
) -> StandaloneQwen3:
    """The base in ``folder`` (as :func:`standalone_unsupported` checked), through NF4 and back
    when ``quantised``, with the adapter folded in; bf16 (fp32 for an unquantised base on a CPU),
    in eval mode. ``timings`` gets the steps' seconds under :func:`model.backbone.load_merged`'s
    names, and bitsandbytes' import (:func:`import_bitsandbytes`) apart. An unreadable or
    mismatched weight file, or an adapter that does not fit the base, is an InputError naming
    the file (a CLI exits 2 with one line)."""
    from .lora_merge import merge_adapter

    clock = StepClock(timings)
    if quantised:
        import_bitsandbytes()
        clock("bitsandbytes_import_s")
    root, device = Path(folder), torch.device(device)
    config = StandaloneConfig.from_folder(root)
    dtype = torch.bfloat16 if quantised or device.type == "cuda" else torch.float32
    model = StandaloneQwen3(config)
    to_quantise = {f"model.layers.{i}.{p}.weight" for i in range(config.num_hidden_layers) for p in PROJECTIONS}
    expected = {name: tuple(param.shape) for name, param in model.named_parameters()}
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]  # the embeddings' (a checkpoint may hold a copy: unread)
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(root):

        def wanted(entry: TensorEntry, path: Path = path) -> bool:
            if entry.name in expected and entry.shape != expected[entry.name]:
                raise InputError(f"{entry.name} has shape {list(entry.shape)}, config.json says {list(expected[entry.name])}", path)  # fmt: skip
            return entry.name in expected

        try:
            for entry, raw in stream_tensors(path, wanted, device):
                tensor = raw.to(dtype)
                state[entry.name] = _through_nf4(tensor) if quantised and entry.name in to_quantise else tensor
        except OSError as err:
            raise InputError(f"unreadable weights ({first_line(err)})", path) from None
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"the base's weights lack {missing[0]}{more}", root)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.to(device)
    model.requires_grad_(False)
    clock("base_s")  # read, and through NF4 and back when quantised (tensor by tensor, read ahead)
    if not merge_adapter(model, adapter_dir):
        raise InputError("the adapter's LoRA weights do not fit the base (module names or shapes)", adapter_dir)
    clock("adapter_merge_s")
    return model.eval()


def import_bitsandbytes() -> None:
    """Import bitsandbytes without importing torch's compiler.

    Its default backend wraps four CPU fallbacks in ``torch.compile`` at import, and that call
    imports dynamo and inductor: 2.0 of bitsandbytes' 2.3 s import on the CPU machine, and most of
    the standalone load's 9-10 s base step on the H200 machine, where torch's modules run without
    cached bytecode (BENCHMARKS.md, eighth pass). ``torch.compile`` compiles at the first call
    anyway, so a stand-in that calls it then changes when the compiler is imported and nothing
    else; the CUDA kernels this load runs never compile. Where bitsandbytes or dynamo is already
    imported there is nothing to save, and nothing is swapped."""
    if "bitsandbytes" in sys.modules or "torch._dynamo" in sys.modules:
        return
    real = torch.compile
    torch.compile = _compile_on_first_call(real)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        torch.compile = real


def _compile_on_first_call(real: Callable[..., Any]) -> Callable[..., Any]:
    def stand_in(model: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        if model is None:  # used as @torch.compile(...)
            return lambda fn: stand_in(fn, **kwargs)
        compiled: Callable[..., Any] | None = None

        @functools.wraps(model)
        def call(*args: Any, **kw: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)

        return call

    return stand_in


def _through_nf4(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] as the NF4 base's forward computes with it: quantised the way
    transformers' bitsandbytes loader quantises (``Params4bit`` of a ``Linear4bit`` with
    :func:`model.backbone.nf4_config`'s settings: NF4, blocks of 64, double quantisation), read
    back as that layer's forward reads it. On CUDA the forward dequantises with
    ``dequantize_4bit`` before its GEMM, so that call is the read (a quarter of the time of
    :func:`model.backbone.dense_from_4bit`'s identity products), here through
    :func:`_nf4_round_trip_on_cuda` where bitsandbytes has the kernels it calls; on the CPU
    bitsandbytes' forward takes other kernels, so the layer's own forward it is."""
    if weight.is_cuda and weight.dtype == NF4_COMPUTE_DTYPE and NF4_QUANT_TYPE == "nf4" and NF4_DOUBLE_QUANT:
        kernels = _bitsandbytes_cuda_kernels()
        if kernels is not None:
            return _nf4_round_trip_on_cuda(weight, kernels)
    from bitsandbytes.nn.modules import Linear4bit, Params4bit

    out_f, in_f = weight.shape
    layer = Linear4bit(  # type: ignore[no-untyped-call]  # bitsandbytes leaves it unannotated
        in_f, out_f, bias=False, compute_dtype=NF4_COMPUTE_DTYPE, compress_statistics=NF4_DOUBLE_QUANT,
        quant_type=NF4_QUANT_TYPE, quant_storage=QUANT_STORAGE["uint8"], device="meta",
    )  # fmt: skip
    quantised = Params4bit(weight, requires_grad=False, **layer.weight.__dict__)
    layer.weight = quantised.to(weight.device)  # type: ignore[misc]  # quantises on the way to the device
    if weight.is_cuda:
        from bitsandbytes.functional import dequantize_4bit

        dense: torch.Tensor = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        return dense
    # In eval mode as the transformers-loaded model is: bitsandbytes' CPU forward takes another
    # kernel in training mode, whose bf16 rounding differs.
    return dense_from_4bit(layer.eval()).weight.detach()


# Blocks of bitsandbytes' NF4 round trip: Params4bit's default (transformers' loader keeps it) and
# the block ``quantize_4bit`` uses for the double-quantised scales.
_NF4_BLOCK, _SCALES_BLOCK = 64, 256


@functools.cache  # asked once per weight: the import and attribute checks once per process
def _bitsandbytes_cuda_kernels() -> Any | None:
    """bitsandbytes' CUDA backend module where it has what :func:`_nf4_round_trip_on_cuda`
    calls (as bitsandbytes 0.50 has them), else None: the round trip then goes through
    ``Params4bit``, the same numbers with torch's compiler imported on the way."""
    try:
        from bitsandbytes.backends.cuda import ops
    except ImportError:
        return None
    needed = ("lib", "_dequantize_4bit_impl", "_dequantize_blockwise_impl")
    kernels = ("cquantize_blockwise_bf16_nf4", "cquantize_blockwise_fp32")
    if not all(hasattr(ops, name) for name in needed):
        return None
    if not all(hasattr(ops.lib, k) for k in kernels):  # type: ignore[attr-defined]  # the module imports it
        return None
    return ops


@functools.cache
def _dynamic_code(device: torch.device) -> torch.Tensor:
    from bitsandbytes.functional import create_dynamic_map

    code: torch.Tensor = create_dynamic_map()  # type: ignore[no-untyped-call]  # bitsandbytes leaves it unannotated
    return code.to(device)  # quantize_blockwise's default code for the scales


@torch.no_grad()
def _nf4_round_trip_on_cuda(weight: torch.Tensor, ops: Any) -> torch.Tensor:
    """What ``Params4bit`` then ``dequantize_4bit`` compute for a bf16 ``weight`` on CUDA (NF4,
    double quantisation), by the same kernels with the same arguments in the same order, called
    without ``torch.ops``. Through ``torch.ops`` the first call of any bitsandbytes kernel
    imports torch's compiler: torch.library wraps each registered kernel in a
    ``torch._dynamo.disable`` that imports dynamo at its first call (6-7 s of infer.py's load on
    the H200 machine, where torch's modules run without cached bytecode). A GPU test checks the
    result against ``Params4bit``'s bit for bit."""
    a = weight.contiguous()
    n, device = a.numel(), a.device
    scales = torch.empty(-(n // -_NF4_BLOCK), device=device, dtype=torch.float32)
    packed = torch.empty(((n + 1) // 2, 1), device=device, dtype=torch.uint8)
    code = _dynamic_code(device)
    with torch.cuda.device(device):
        ops.lib.cquantize_blockwise_bf16_nf4(None, a.data_ptr(), scales.data_ptr(), packed.data_ptr(), _NF4_BLOCK, n)
        offset = scales.mean()
        centred = scales - offset  # the double quantisation: the scales, centred, in 8 bits
        m = centred.numel()
        scale_scales = torch.empty(-(m // -_SCALES_BLOCK), device=device, dtype=torch.float32)
        scale_codes = torch.empty_like(centred, dtype=torch.uint8)
        ops.lib.cquantize_blockwise_fp32(
            code.data_ptr(), centred.data_ptr(), scale_scales.data_ptr(), scale_codes.data_ptr(), _SCALES_BLOCK, m
        )
    restored = torch.empty_like(scale_codes, dtype=torch.float32)
    ops._dequantize_blockwise_impl(scale_codes, scale_scales, code, _SCALES_BLOCK, torch.float32, out=restored)
    restored += offset
    dense = torch.empty(a.shape, device=device, dtype=torch.bfloat16)
    ops._dequantize_4bit_impl(packed, restored, _NF4_BLOCK, "nf4", torch.bfloat16, out=dense)
    return dense
