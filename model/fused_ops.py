"""The element-wise work of a Qwen3 decoder layer at inference, eager or in fused kernels.

The packed forwards (:mod:`model.packed`) and the decode step (:mod:`model.decoding`) run a
layer as the model's own projections and attention around four element-wise pieces: RMSNorm,
the residual add before a norm, the rotary embedding, and SwiGLU's ``silu(gate) * up``.
:class:`LayerOps` holds them, two ways:

* ``EAGER``: torch ops with the Qwen3 modules' casts, rounding points and weights (CPU, fp32,
  and wherever the kernels are not used);
* ``TRITON``: one kernel each (:mod:`model.triton_kernels`) that rounds where the eager ops
  round, chosen on CUDA in bf16 once a probe at the model's widths agrees with the eager
  ops (:func:`choose_layer_ops`); a refusal is said and recorded by the caller.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import head_dim_of
from .kernel_probe import kernel_mismatch

EAGER, TRITON = "eager", "triton"


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a Qwen3 RMSNorm in fewer kernels: the fp32 normalisation runs as one
    fused op instead of pow, mean, add, rsqrt and mul, the casts and the weight as the module
    does them (bit for bit on CPU; on CUDA the fused mean may round its last fp32 bit apart).
    The decode step is bound by its kernel count: 4 norms a layer were half of its ~60 kernels."""
    eps, weight = _qwen3_norm(norm)
    if weight is None:  # not the Qwen3 formulation: its own forward
        out: torch.Tensor = norm(x)
        return out
    normed = F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps)
    return weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding as Qwen3 applies it: ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _qwen3_norm(norm: nn.Module) -> tuple[float, torch.Tensor | None]:
    eps, weight = getattr(norm, "variance_epsilon", None), getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor):
        return 0.0, None
    return float(eps), weight


class LayerOps:
    """RMSNorm, add + RMSNorm, rotary embedding and the SwiGLU MLP of a Qwen3 layer (eager ops)."""

    name = EAGER

    def norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(norm, x)

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(``norm(h + delta)``, ``h + delta``): a residual add and the norm after it."""
        h = h + delta
        return self.norm(norm, h), h

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` [T, Hq, d] and ``k`` [T, Hk, d] rotated by ``cos``/``sin`` [T, d] (the fused
        ops rotate them in place)."""
        cos, sin = cos[:, None], sin[:, None]
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = mlp(x)
        return out


class TritonLayerOps(LayerOps):
    """The same four pieces in one Triton kernel each (bf16 on CUDA)."""

    name = TRITON

    def __init__(self) -> None:
        from . import triton_kernels  # imports triton: only where the kernels run

        self.kernels: Any = triton_kernels

    def _fits(self, norm: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        """(eps, weight) of a Qwen3 RMSNorm the kernel takes for ``x`` (bf16 both), else None."""
        eps, weight = _qwen3_norm(norm)
        return (eps, weight) if weight is not None and weight.dtype == x.dtype == torch.bfloat16 else None

    def norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        fits = self._fits(norm, x)
        if fits is None:
            return rms_norm(norm, x)
        out: torch.Tensor = self.kernels.rms_norm(x, fits[1], fits[0])[0]
        return out

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        fits = self._fits(norm, h)
        if fits is None or delta.dtype != h.dtype or delta.shape != h.shape:
            return super().add_norm(h, delta, norm)
        normed, total = self.kernels.rms_norm(h, fits[1], fits[0], delta=delta)
        return normed, total

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not q.dtype == k.dtype == cos.dtype == sin.dtype == torch.bfloat16:
            return super().rope(q, k, cos, sin)
        q, k = q.contiguous(), k.contiguous()
        self.kernels.rope_(q, k, cos, sin)  # in place: the forwards' q and k are fresh norm outputs
        return q, k

    def mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
        g, u = gate(x), up(x)
        act = self.kernels.silu_mul(g, u) if g.dtype == u.dtype == torch.bfloat16 else F.silu(g) * u
        out: torch.Tensor = down(act)
        return out


EAGER_OPS = LayerOps()

_CHOICES: dict[tuple[Any, ...], tuple[LayerOps, str | None]] = {}


def choose_layer_ops(
    device: torch.device, dtype: torch.dtype, config: Any, norm: nn.Module | None = None
) -> tuple[LayerOps, str | None]:
    """(the ops, why not the fused kernels): the Triton kernels on CUDA in bf16 for a
    SwiGLU (silu) model, once a probe at the model's widths agrees with the eager ops (cached
    per shape); else the eager ops. ``norm`` (one of the model's RMSNorms) must be Qwen3's."""
    if device.type != "cuda":
        return EAGER_OPS, None
    if dtype != torch.bfloat16:
        return EAGER_OPS, f"the fused element-wise kernels take bf16, the model runs in {dtype}"
    act = getattr(config, "hidden_act", None)
    if act != "silu":
        return EAGER_OPS, f"the fused MLP kernel is SwiGLU (silu); the model's activation is {act!r}"
    if norm is not None and _qwen3_norm(norm)[1] is None:
        return EAGER_OPS, f"the fused norm kernel is Qwen3's RMSNorm, not {type(norm).__name__}"
    hidden, heads = config.hidden_size, config.num_attention_heads
    n_kv, head_dim = config.num_key_value_heads, head_dim_of(config)
    key = (str(device), dtype, hidden, heads, n_kv, head_dim)
    if key not in _CHOICES:
        _CHOICES[key] = _probe(device, dtype, hidden, heads, n_kv, head_dim, float(config.rms_norm_eps))
    return _CHOICES[key]


def share_compiled_kernels_folder(device: torch.device) -> None:
    """Point Triton at the folder torch.compile's kernels go to, unless the user chose one.

    A process that compiles with inductor (training) sets ``TRITON_CACHE_DIR`` to inductor's
    folder at its first compiled kernel; one that does not (``infer.py``) left Triton at its own
    default, so the first ``infer.py`` on a machine compiled again the kernels the training
    run's export had compiled (2.3 s of its load in the journey of 2026-12-03)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return
    os.environ.pop("TRITON_CACHE_DIR", None)  # set but empty: unset, also for inductor's helper below
    rule = _inductor_cache_dir_rule()
    if rule is None:  # a torch without inductor: Triton's default folder
        return
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    os.environ["TRITON_CACHE_DIR"] = rule.triton_cache_dir(index)


def _inductor_cache_dir_rule() -> Any | None:
    """inductor's module that names its cache folders, without importing ``torch._inductor``:
    that package imports dynamo (1.7 s on the CPU machine, 6-7 s in a fresh process on the H200
    machine, where torch's bytecode is not cached), which infer.py never uses. The module has no
    torch dependencies by design ("factored out to a file without torch dependencies"), so it
    runs from its file; where inductor is already imported, its own copy is taken."""
    name = "torch._inductor.runtime.cache_dir_utils"
    if "torch._inductor" in sys.modules:
        try:
            return importlib.import_module(name)
        except ImportError:
            return None
    spec = importlib.util.find_spec("torch._inductor")  # imports torch only, not the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "runtime" / "cache_dir_utils.py"
    if not path.is_file():
        return None
    file_spec = importlib.util.spec_from_file_location("archehr_inductor_cache_dir_utils", path)
    if file_spec is None or file_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def _probe(
    device: torch.device, dtype: torch.dtype, hidden: int, heads: int, n_kv: int, head_dim: int, eps: float
) -> tuple[LayerOps, str | None]:
    """Each kernel against its eager formulation on small random inputs at the model's widths
    (which also compiles the kernels the forwards will launch)."""
    share_compiled_kernels_folder(device)
    try:
        fused = TritonLayerOps()
    except ImportError as exc:
        return EAGER_OPS, f"fused element-wise kernels unavailable ({exc})"
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    t = 37
    h, delta = rand(t, hidden), rand(t, hidden)
    q, k = rand(t, heads, head_dim), rand(t, n_kv, head_dim)
    angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * torch.linspace(
        1.0, 1e-3, head_dim // 2, device=device
    )
    cos, sin = (f(torch.cat((angles, angles), dim=-1)).to(dtype) for f in (torch.cos, torch.sin))
    norm, head_norm, mlp = _ProbeNorm(rand(hidden), eps), _ProbeNorm(rand(head_dim), eps), _ProbeMLP()
    checks: dict[str, Callable[[LayerOps], torch.Tensor]] = {
        "RMSNorm": lambda ops: ops.norm(norm, h),
        "q/k RMSNorm": lambda ops: ops.norm(head_norm, q),
        "add + RMSNorm": lambda ops: torch.cat(ops.add_norm(h, delta, norm)),
        "rotary embedding": lambda ops: torch.cat([x.flatten() for x in ops.rope(q.clone(), k.clone(), cos, sin)]),
        "SwiGLU": lambda ops: ops.mlp(mlp, delta),
    }
    for what, run in checks.items():
        why_not = kernel_mismatch(
            f"fused {what} kernel",
            lambda: run(fused),
            f"eager {what}",
            lambda: run(EAGER_OPS),  # noqa: B023
        )
        if why_not:
            return EAGER_OPS, why_not
    return fused, None


class _ProbeNorm(nn.Module):
    """The two attributes of a Qwen3 RMSNorm the ops read (the probe's stand-in)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * weight, requires_grad=False)
        self.variance_epsilon = eps


class _ProbeMLP(nn.Module):
    """A SwiGLU MLP whose projections scale by fixed factors (gate 2, up -1, down 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _Scale(2.0), _Scale(-1.0), _Scale(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor
