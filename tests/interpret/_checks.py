"""Comparisons that say what went wrong: the first mismatching elements, not just "not close"."""

from __future__ import annotations

import torch


def _first_entries(mask: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, count: int = 5) -> str:
    rows = []
    for index in mask.nonzero()[:count].tolist():
        a, e = actual[tuple(index)].item(), expected[tuple(index)].item()
        rows.append(f"    at {tuple(index)}: got {a:.8g}, expected {e:.8g} (diff {a - e:.3g})")
    return "\n".join(rows)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str
) -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected|; the message lists the first misses."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())  # also catches NaN
    if bad.any():
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol:g}, rtol={rtol:g}, "
            f"max abs diff {float((a - e).abs().max()):.3g}, max |expected| {float(e.abs().max()):.3g})\n"
            + _first_entries(bad, a, e)
        )


def assert_within_torch_error(
    actual: torch.Tensor, reference: torch.Tensor, torch_same_dtype: torch.Tensor, *, atol: float, what: str
) -> None:
    """flash-attention's rule for reduced precision.

    ``actual`` (the kernel on half-precision inputs) must be as close to ``reference`` (PyTorch in
    fp32 on the same inputs) as twice PyTorch's own error in the half dtype (``torch_same_dtype``),
    plus ``atol``, in max abs error.
    """
    a, r, t = actual.detach().double(), reference.detach().double(), torch_same_dtype.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values in the kernel's result"
    kernel_error = float((a - r).abs().max())
    torch_error = float((t - r).abs().max())
    bound = 2 * torch_error + atol
    if not kernel_error <= bound:
        bad = (a - r).abs() > bound
        raise AssertionError(
            f"{what}: kernel error {kernel_error:.3g} > 2 * PyTorch's own error in that dtype "
            f"{torch_error:.3g} + {atol:g}\n"
            + _first_entries(bad, a, r)
        )
