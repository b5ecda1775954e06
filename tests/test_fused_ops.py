"""The element-wise ops of the inference forwards (model/fused_ops.py): which are chosen where,
the probe that refuses a fused kernel that disagrees with the eager ops, and that the packed
forward and the decode step run every element-wise piece through the chosen ops.

The Triton kernels themselves run only on CUDA: tests/test_gpu.py compares them with the eager
ops element by element, and the fast-path numerics test covers them end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import fused_ops
from model.fused_ops import EAGER, EAGER_OPS, LayerOps, choose_layer_ops, rotate

ROOT = Path(__file__).resolve().parents[1]

CONFIG = SimpleNamespace(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu", rms_norm_eps=1e-6
)
CUDA = torch.device("cuda")  # only named: the refusals below come before anything runs on it


def test_cpu_runs_the_eager_ops_without_a_reason():
    assert choose_layer_ops(torch.device("cpu"), torch.bfloat16, CONFIG) == (EAGER_OPS, None)


@pytest.mark.parametrize(
    "dtype, config, norm, reason",
    [
        (torch.float16, CONFIG, None, "take bf16, the model runs in torch.float16"),
        (torch.float32, CONFIG, None, "take bf16, the model runs in torch.float32"),
        (torch.bfloat16, SimpleNamespace(**{**vars(CONFIG), "hidden_act": "gelu"}), None, "activation is 'gelu'"),
        (torch.bfloat16, CONFIG, nn.LayerNorm(64), "not LayerNorm"),
    ],
)
def test_cuda_refusals_name_their_reason(dtype, config, norm, reason):
    ops, why_not = choose_layer_ops(CUDA, dtype, config, norm)
    assert ops is EAGER_OPS
    assert why_not is not None and reason in why_not


def _reference_kernels(broken: str = "") -> SimpleNamespace:
    """What each Triton kernel computes, in torch (``broken`` names one made wrong)."""

    def rms_norm(x, weight, eps, delta=None):
        total = x if delta is None or broken == "add" else x + delta
        normed = F.rms_norm(total.float(), (x.shape[-1],), None, eps).to(x.dtype)
        return (normed if broken == "norm" else weight * normed), total

    def rope_(q, k, cos, sin):
        sin = -sin if broken == "rope" else sin
        q.copy_(rotate(q, cos[:, None], sin[:, None]))
        k.copy_(rotate(k, cos[:, None], sin[:, None]))

    def silu_mul(gate, up):
        return F.silu(up) * gate if broken == "silu" else F.silu(gate) * up

    return SimpleNamespace(rms_norm=rms_norm, rope_=rope_, silu_mul=silu_mul)


@pytest.fixture(autouse=True)
def _triton_folder_restored(monkeypatch):
    """The probe sets TRITON_CACHE_DIR (where unset): undone after each test ("" reads as unset)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", "")


def _probe_with(monkeypatch, kernels: SimpleNamespace) -> tuple[LayerOps, str | None]:
    monkeypatch.setattr(fused_ops.TritonLayerOps, "__init__", lambda self: setattr(self, "kernels", kernels))
    return fused_ops._probe(torch.device("cpu"), torch.bfloat16, 64, 4, 2, 16, 1e-6)


def test_the_probe_takes_kernels_that_agree(monkeypatch):
    ops, why_not = _probe_with(monkeypatch, _reference_kernels())
    assert why_not is None
    assert isinstance(ops, fused_ops.TritonLayerOps) and ops.name == fused_ops.TRITON


@pytest.mark.parametrize(
    "broken, named",
    [("norm", "fused RMSNorm kernel"), ("add", "add + RMSNorm"), ("rope", "rotary"), ("silu", "SwiGLU")],
)
def test_the_probe_refuses_a_kernel_that_disagrees_and_names_it(monkeypatch, broken, named):
    ops, why_not = _probe_with(monkeypatch, _reference_kernels(broken))
    assert ops is EAGER_OPS
    assert why_not is not None and named in why_not and "differs from eager" in why_not


def test_the_probe_points_triton_at_the_folder_torch_compile_uses():
    """Kernels compiled by a training run's export (inductor set TRITON_CACHE_DIR in that
    process) are found by infer.py, which compiles nothing with inductor."""
    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

    fused_ops._probe(torch.device("cpu"), torch.bfloat16, 64, 4, 2, 16, 1e-6)
    chosen = os.environ["TRITON_CACHE_DIR"]
    del os.environ["TRITON_CACHE_DIR"]  # inductor's own choice, as a training process makes it
    assert chosen == triton_cache_dir(0)
    fused_ops.share_compiled_kernels_folder(torch.device("cuda", 1))
    assert os.environ["TRITON_CACHE_DIR"] == triton_cache_dir(1)


def test_the_kernels_folder_is_found_without_importing_the_compiler(tmp_path):
    """infer.py points Triton at inductor's folder without importing torch._inductor, whose
    package imports dynamo (seconds of load); the folder is the one inductor itself names."""
    script = (
        "import os, sys, torch\n"
        "from model import fused_ops\n"
        "fused_ops.share_compiled_kernels_folder(torch.device('cuda', 1))\n"
        "loaded = sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules)\n"
        "chosen = os.environ.pop('TRITON_CACHE_DIR')\n"
        "from torch._inductor.runtime.cache_dir_utils import triton_cache_dir\n"
        "print(loaded, chosen == triton_cache_dir(1), chosen.startswith(os.environ['TORCHINDUCTOR_CACHE_DIR']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "True", "True"]


def test_a_triton_folder_the_user_chose_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    fused_ops._probe(torch.device("cpu"), torch.bfloat16, 64, 4, 2, 16, 1e-6)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path)


def test_without_triton_the_eager_ops_run_and_say_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    monkeypatch.delitem(sys.modules, "model.triton_kernels", raising=False)
    ops, why_not = fused_ops._probe(torch.device("cpu"), torch.bfloat16, 64, 4, 2, 16, 1e-6)
    assert ops is EAGER_OPS
    assert why_not is not None and why_not.startswith("fused element-wise kernels unavailable")


class CountingOps(LayerOps):
    """The eager ops, counting the calls of each piece."""

    def __init__(self) -> None:
        self.calls = {"norm": 0, "add_norm": 0, "rope": 0, "mlp": 0}

    def norm(self, norm, x):
        self.calls["norm"] += 1
        return super().norm(norm, x)

    def add_norm(self, h, delta, norm):
        self.calls["add_norm"] += 1
        return super().add_norm(h, delta, norm)

    def rope(self, q, k, cos, sin):
        self.calls["rope"] += 1
        return super().rope(q, k, cos, sin)

    def mlp(self, mlp, x):
        self.calls["mlp"] += 1
        return super().mlp(mlp, x)


@pytest.mark.parametrize("tap", [-1, 1])
def test_the_packed_forward_runs_every_piece_through_its_ops(tap):
    from model.backbone import build_random_base
    from model.packed import pack, packed_forward

    torch.manual_seed(0)
    model = build_random_base("tiny").eval()
    n = model.config.num_hidden_layers
    packed = pack([[5, 6, 7, 8], [9, 10, 11]], torch.device("cpu"))
    want, _ = packed_forward(model, packed, tap=tap, ops=EAGER_OPS)
    counting = CountingOps()
    got, _ = packed_forward(model, packed, tap=tap, ops=counting)
    assert torch.equal(got, want)
    layers = n if tap == -1 else tap
    # two residual adds a layer, each with the norm after it, except the last add of a forward
    # that stops before the final layer; norms: the first input norm, q and k norms a layer and
    # the eager add_norm's own (the eager add_norm is h + delta, then self.norm)
    adds = 2 * layers - (0 if layers == n else 1)
    assert counting.calls == {"norm": 1 + 2 * layers + adds, "add_norm": adds, "rope": layers, "mlp": layers}


def test_the_decode_step_runs_every_piece_through_its_ops():
    from model.backbone import build_random_base
    from model.decoding import DecodeBatch

    torch.manual_seed(0)
    model = build_random_base("tiny").eval()
    n = model.config.num_hidden_layers
    counting = CountingOps()
    cpu = torch.device("cpu")
    batch = DecodeBatch(model, 2, 8, 4, [0], 1, cpu, torch.float32, ops=counting)
    plain = DecodeBatch(model, 2, 8, 4, [0], 1, cpu, torch.float32)
    assert plain.ops.name == EAGER  # on CPU the choice is the eager ops
    with torch.no_grad():
        for b in (batch, plain):
            b.prefill([[5, 6, 7], [9, 10, 11, 12]], [3, 4], 64, "per-sequence")
        counting.calls = dict.fromkeys(counting.calls, 0)
        batch.step()
        plain.step()
    assert torch.equal(batch.out, plain.out)
    assert counting.calls == {"norm": 1 + 2 * n + 2 * n, "add_norm": 2 * n, "rope": n, "mlp": n}


def test_a_refused_kernel_choice_is_said_and_recorded_by_the_engine(monkeypatch):
    """Never silent: where the fused kernels (or the prefill's varlen attention) are refused, here
    as if on CUDA, the fast engine says why once and records it in its report."""
    from bench.synthetic import inference_cases
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from inference import fast as fast_module
    from model import decoding
    from model.backbone import build_random_base, load_tokenizer
    from model.loaded_export import LoadedExport

    why = "fused RMSNorm kernel differs from eager RMSNorm by 0.5"
    monkeypatch.setattr(fast_module, "layer_ops", lambda model: (EAGER_OPS, why))
    monkeypatch.setattr(decoding, "layer_ops", lambda model: (EAGER_OPS, why))
    varlen = "varlen flash attention unavailable (RuntimeError: no kernel)"  # the prefill's: said too
    monkeypatch.setattr(decoding, "choose_packed_attention", lambda *shape: ("per-sequence", varlen))
    torch.manual_seed(0)
    plain = LoadedExport(
        manifest={},
        threshold=0.5,
        tokenizer=load_tokenizer("tiny"),
        model=build_random_base("tiny").eval(),
        head=NotePairHead(HeadConfig(hidden_size=64)).eval(),
    )
    said: list[str] = []
    engine = fast_module.FastEngine(plain, log=said.append)
    cases = inference_cases(2, seed=4)
    engine.predict(cases[:1], answers=True, max_new_tokens=2)
    prefill_said = f"warning: prefill attention: {varlen}; one SDPA per prompt"
    assert said == [prefill_said, f"warning: element-wise ops: {why}; eager torch ops"]  # by the decoding
    engine.predict(cases[1:], pairs=True)
    report = engine.report()
    assert report["decode"]["elementwise"] == EAGER and report["decode"]["elementwise_fallback"] == why
    assert report["alignment"]["elementwise"] == EAGER
    # each said once, though the decoding and the alignment forwards both met the element-wise one
    assert said == [prefill_said, f"warning: element-wise ops: {why}; eager torch ops"]
    assert report["fallbacks"] == [m.removeprefix("warning: ") for m in said]
