"""The project's one tolerance rule, used by every numerics test (outputs and every gradient).

Against a float64 reference:
- float32 results must pass a tight assert_close (rtol 1e-5, atol 1e-5 of the reference's scale), unless eager
  PyTorch in float32 misses that tolerance itself (catastrophic cancellation: LayerNorm's dx over a row of two
  elements is exactly 0 in exact arithmetic, ~1e-5 in float32 however it is computed): then the half-precision
  rule below applies, with 1e-5 of the reference's scale as its slack;
- float16 / bfloat16 results may err at most twice as much as eager PyTorch computing the same thing in that
  dtype, plus one unit in the last place of the dtype at the reference's scale (FlashAttention's rule).
"""

from __future__ import annotations

import torch

# One ulp at magnitude 1: the small absolute slack of the half-precision rule.
HALF_ATOL = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
FP32_TOL = 1e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches_reference(
    actual: torch.Tensor,
    reference: torch.Tensor,
    eager: torch.Tensor | None = None,
    *,
    name: str = "output",
) -> None:
    """actual: the kernel's result; reference: float64 result; eager: eager PyTorch in actual's dtype (needed for
    fp16/bf16)."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    ref = reference.double()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    if actual.dtype == torch.float32:
        tight = dict(rtol=FP32_TOL, atol=FP32_TOL * scale)
        if eager is None or torch.allclose(eager.double(), ref, **tight):
            torch.testing.assert_close(actual.double(), ref, **tight, msg=lambda m: f"{name}: {m}")
            return
    assert eager is not None, f"{name}: a {actual.dtype} result needs eager's result in that dtype"
    assert eager.dtype == actual.dtype, f"{name}: eager ran in {eager.dtype}, kernel in {actual.dtype}"
    err, eager_err = max_err(actual, ref), max_err(eager, ref)
    bound = 2 * eager_err + HALF_ATOL.get(actual.dtype, FP32_TOL) * scale
    assert err <= bound, f"{name}: max error {err:.3g} > 2 x eager's {eager_err:.3g} + atol ({bound:.3g})"


def poison(*tensors: torch.Tensor) -> None:
    """Fill gradient/output buffers with NaN so that a result the kernel forgot to write cannot pass."""
    for t in tensors:
        if t is not None and t.is_floating_point():
            t.fill_(float("nan"))
