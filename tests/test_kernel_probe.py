"""The kernel probe behind the fast paths' choices (model.kernel_probe), on CPU with fake kernels."""

import torch

from model.kernel_probe import PROBE_TOLERANCE, kernel_mismatch


def reference() -> torch.Tensor:
    return torch.tensor([[1.0, -2.0], [0.5, 3.0]])


def test_a_kernel_that_agrees_within_the_tolerance_is_used():
    def fast() -> torch.Tensor:
        return (reference() + PROBE_TOLERANCE / 2).to(torch.bfloat16)

    assert kernel_mismatch("fused", fast, "plain", reference) is None


def test_a_kernel_that_disagrees_is_refused_with_the_difference():
    def fast() -> torch.Tensor:
        return reference() + torch.tensor([[0.0, 0.0], [0.0, 0.25]])

    assert kernel_mismatch("fused", fast, "plain", reference) == "fused differs from plain by 0.25"
    # The tolerance is strict: a difference equal to it is refused.
    assert kernel_mismatch("fused", lambda: reference() + 0.5, "plain", reference, tolerance=0.5) is not None


def test_a_kernel_that_raises_is_refused_with_the_error_and_the_reference_is_not_needed():
    calls = []

    def fast() -> torch.Tensor:
        raise RuntimeError("no kernel image is available " + "x" * 300)

    def counted_reference() -> torch.Tensor:
        calls.append(1)
        return reference()

    why = kernel_mismatch("fused", fast, "plain", counted_reference)
    assert why is not None and why.startswith("fused unavailable (RuntimeError: no kernel image is available x")
    assert len(why) == len("fused unavailable (RuntimeError: ") + 120 + 1
    assert calls == []


def test_a_reference_or_shape_failure_also_counts_as_unavailable():
    def wrong_shape() -> torch.Tensor:
        return torch.zeros(3, 3)

    why = kernel_mismatch("fused", wrong_shape, "plain", reference)
    assert why is not None and why.startswith("fused unavailable (RuntimeError: ")
