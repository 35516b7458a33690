"""The benchmark scripts' helpers: fastbert.benchtools (shared with ``fastbert bench``), plus the scripts' --check
mode and their gradient check.

--check (no GPU needed; CI runs it): the script runs at tiny shapes on the CPU with the Triton kernels in Triton's
interpreter, checks every provider it checks on a GPU, calls each timed function once and times nothing, so a
script that would fail on a GPU fails here first. Results are written only where --out says. What it does not
follow: the kernels run the interpreter's tiles (not the GPU's tables), in fp16 only (the interpreter holds bf16
as raw bits), without torch.compile, and linear_gelu's timed choice between its two forwards is not made (both
forced providers run). A script exits 1 when a check failed (exit_status).
"""

import math
import os

import torch

from fastbert import benchtools
from fastbert.benchtools import *  # noqa: F403
from fastbert.benchtools import _git  # noqa: F401

CHECK = False


def add_check_flag(parser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="no GPU: tiny shapes, kernels in Triton's interpreter, checked, not timed")  # fmt: skip


def start(name: str, args) -> str:
    """The device a script runs on: 'cpu' under --check (Triton's interpreter, chosen before fastbert's kernels
    are imported), else 'cuda', or a one-line message and exit 0 without CUDA."""
    global CHECK
    if getattr(args, "check", False):
        os.environ["TRITON_INTERPRET"] = "1"
        CHECK = True
        return "cpu"
    benchtools.no_cuda_exit(name)
    return "cuda"


def time_ms(fn, *, args_list=None, grad_to_none=None, **kwargs) -> dict:
    """benchtools.time_ms; under --check one call, and NaN timings."""
    if not CHECK:
        return benchtools.time_ms(fn, args_list=args_list, grad_to_none=grad_to_none, **kwargs)
    fn(*args_list[0]) if args_list else fn()
    return {"median_ms": math.nan, "p20_ms": math.nan, "p80_ms": math.nan}


def write_results(suite, rows, out_dir=None, *args, **kwargs):
    if CHECK and out_dir is None:
        print("--check: no result files written (give --out to see them)")
        return None
    return benchtools.write_results(suite, rows, out_dir, *args, **kwargs)


class TrainingReference:
    """The test suite's rule on a training call, for one set of inputs: ref's output and gradients of the
    floating-point inputs (for the incoming gradient grad_out; ref returns one tensor) in float64 (ref64's, default
    ref's) and in the inputs' own dtype (eager's error), computed once; check(fn) holds a provider's to them
    (benchtools.check_close, one tensor at a time). The output is the one of the autograd call, the path a
    fwd+bwd row times, which may differ from the no-grad forward's (linear_gelu then also stores its
    pre-activation). ``real`` (optional) multiplies the outputs before they are compared (attention: padding
    queries, whose outputs a packed provider leaves zero)."""

    def __init__(self, ref, inputs, grad_out: torch.Tensor, ref64=None, real=None):
        self.inputs, self.grad_out, self.real = inputs, grad_out, real
        self.want, self.eager = self._run(ref64 or ref, torch.float64), self._run(ref)

    def _run(self, f, dtype=None) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t.is_floating_point() else t
                  for t in self.inputs]  # fmt: skip
        out = f(*leaves)
        out.backward(self.grad_out.to(dtype or out.dtype))
        seen = out.detach() if self.real is None else out.detach() * self.real
        return [seen, *(t.grad for t in leaves if t.is_floating_point())]

    def check(self, fn, name: str = "") -> bool:
        """Whether fn's output and every gradient pass."""
        got = self._run(fn)
        names = [f"{name} {'output' if i == 0 else f'd{i}'}" for i in range(len(got))]
        return all(benchtools.check_close(*g, n)[0] for *g, n in zip(got, self.want, self.eager, names, strict=True))


def exit_status(rows: list[dict]) -> int:
    """1 when a row's output or gradient check failed (said on one line; the rows are written), else 0."""
    failed = [r for r in rows if r.get("check_ok") is False or r.get("grad_check_ok") is False]
    if failed:
        print(f"CHECK FAILED in {len(failed)} rows: {sorted({r['provider'] for r in failed})}; their timings mean "
              "nothing")  # fmt: skip
    return int(bool(failed))
