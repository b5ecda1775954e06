"""Whether a fast GPU kernel runs here and agrees with its reference formulation.

The fast paths (:mod:`model.packed`, :mod:`model.decoding`) pick a fused kernel only after
running it once on a small probe against the plain formulation: a kernel that raises (no
such kernel for this card, dtype or shape) or that disagrees is not used, and the reason
is said and recorded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PROBE_TOLERANCE = 2e-2  # max abs difference on the probe: bf16 rounding, not a wrong kernel


def kernel_mismatch(
    name: str,
    fast: Callable[[], torch.Tensor],
    reference_name: str,
    reference: Callable[[], torch.Tensor],
    tolerance: float = PROBE_TOLERANCE,
) -> str | None:
    """None when ``fast()`` runs and agrees with ``reference()`` within ``tolerance``; else why not."""
    try:
        got = fast()
        want = reference()
        err = float((got.float() - want.float()).abs().max())
    except Exception as exc:  # no such kernel for this card, dtype or shape
        return f"{name} unavailable ({type(exc).__name__}: {str(exc)[:120]})"
    return None if err < tolerance else f"{name} differs from {reference_name} by {err:.3g}"
