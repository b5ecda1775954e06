"""Triton kernels for the element-wise work of a Qwen3 decoder layer at inference.

Imported only where they run (CUDA, bf16), by :mod:`model.fused_ops`, which also holds
the eager formulation each kernel replaces. Each kernel rounds where the eager ops round (every
torch op on bf16 computes in fp32 and rounds its result), so the two agree bit for bit except
for the fp32 sum of squares' order and the hardware ``rsqrt``/``exp``. bf16 only: the rounding
in between is written for bf16 (:func:`_bf16`).

One launch each instead of the eager ops' 4-8 element-wise kernels: the packed alignment forward
spent 40% of its time in them (BENCHMARKS.md, issue 22, fourth pass) and the CUDA-graphed decode
step is bound by its kernel count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 4096  # elements a program handles: rows of 2560 one at a time, rows of 128 thirty-two at a time


@triton.jit
def _bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), kept in fp32: what a cast to bf16
    and back gives, in integer ops, which the compiler cannot fold away as it may a cast pair
    (a folded pair let a multiply and an add fuse into one rounding)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr,
    delta_ptr,
    w_ptr,
    y_ptr,
    sum_ptr,
    n_rows,
    x_stride,
    d_stride,
    y_stride,
    s_stride,
    eps,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ADD: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
    if ADD:  # the residual sum first, rounded as ``h + delta`` rounds
        d = tl.load(delta_ptr + rows[:, None] * d_stride + cols[None, :], mask=mask, other=0.0)
        xf = _bf16(x.to(tl.float32) + d.to(tl.float32))
        tl.store(sum_ptr + rows[:, None] * s_stride + cols[None, :], xf.to(sum_ptr.dtype.element_ty), mask=mask)
    else:
        xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
    normed = _bf16(xf * rstd[:, None])  # Qwen3RMSNorm: back to the input dtype (bf16)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0)
    y = w.to(tl.float32)[None, :] * normed  # then times the weight
    tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(base, c1, c2, s1, s2, N_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    mask = (heads < N_HEADS)[:, None]
    at = base + heads[:, None] * (2 * HALF) + cols[None, :]
    x1 = tl.load(at, mask=mask, other=0.0)
    x2 = tl.load(at + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + cat(-x2, x1) * sin: each product rounded, then their sum
    o1 = _bf16(f1 * c1[None, :]) + _bf16(-f2 * s1[None, :])
    o2 = _bf16(f2 * c2[None, :]) + _bf16(f1 * s2[None, :])
    tl.store(at, o1.to(dt), mask=mask)
    tl.store(at + HALF, o2.to(dt), mask=mask)


@triton.jit(do_not_specialize=["n_tokens"])
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    n_tokens,
    q_stride,
    k_stride,
    cs_stride,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + t * cs_stride + cols).to(tl.float32)
    c2 = tl.load(cos_ptr + t * cs_stride + HALF + cols).to(tl.float32)
    s1 = tl.load(sin_ptr + t * cs_stride + cols).to(tl.float32)
    s2 = tl.load(sin_ptr + t * cs_stride + HALF + cols).to(tl.float32)
    _rotate_heads(q_ptr + t * q_stride, c1, c2, s1, s2, HQ, BLOCK_H, HALF)
    _rotate_heads(k_ptr + t * k_stride, c1, c2, s1, s2, HK, BLOCK_H, HALF)


@triton.jit  # n specialised (a multiple of 16 or not): an unknown bound would keep loads unvectorised
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    act = _bf16(g / (1.0 + tl.exp(-g)))  # silu, rounded as F.silu rounds
    tl.store(out_ptr + offs, (act * u.to(tl.float32)).to(u.dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, last dim] with unit stride in the last dim (a copy only where needed)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of ``x + delta`` (or of ``x``), the sum ``x + delta`` (or ``x``)), Qwen3's
    formulation; the output in the dtype ``weight * x`` promotes to."""
    n = x.shape[-1]
    x2 = _rows(x)
    d2 = _rows(delta) if delta is not None else x2
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    total = torch.empty_like(x2) if delta is not None else x2
    block_n = triton.next_power_of_2(n)
    rows_per = max(1, min(64, TILE // block_n))
    grid = (triton.cdiv(x2.shape[0], rows_per),)
    _rms_norm_kernel[grid](
        x2,
        d2,
        weight,
        y,
        total,
        x2.shape[0],
        x2.stride(0),
        d2.stride(0),
        y.stride(0),
        total.stride(0),
        eps,
        N=n,
        BLOCK_N=block_n,
        ROWS=rows_per,
        ADD=delta is not None,
        num_warps=8 if rows_per * block_n >= TILE else 4,
    )
    return y.view(x.shape), total.view(x.shape)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``q`` [T, Hq, d] and ``k`` [T, Hk, d] in place by ``cos``/``sin`` [T, d]
    (the head dims contiguous; tokens may be strided)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    for x in (q, k):
        if x.stride(-1) != 1 or x.stride(-2) != d:
            raise ValueError("rope_ needs each token's heads contiguous")
    cos, sin = cos.reshape(t, d), sin.reshape(t, d)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    _rope_kernel[(t,)](
        q,
        k,
        cos,
        sin,
        t,
        q.stride(0),
        k.stride(0),
        cos.stride(0),
        HQ=hq,
        HK=hk,
        BLOCK_H=triton.next_power_of_2(max(hq, hk)),
        HALF=d // 2,
        num_warps=4,
    )


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one pass (same shapes, contiguous)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(up)
    n = up.numel()
    _silu_mul_kernel[(triton.cdiv(n, TILE),)](gate, up, out, n, BLOCK=TILE, num_warps=8)
    return out
