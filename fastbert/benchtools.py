"""Shared timing and recording for fastbert's benchmarks (``fastbert bench`` and the scripts in benchmarks/).

- Timing: triton.testing.do_bench (CUDA events, warm-up, median with p20/p80), optionally rotating through
  several copies of the inputs so that the L2 cache does not flatter a provider.
- Correctness before timing: check_close applies the test suite's rule (2x eager's error against float64).
- Results: JSON rows under a header (device, driver, versions, git commit, date) in
  benchmarks/results/<gpu>/ (in a source checkout; ./fastbert-results/<gpu>/ elsewhere), plus a Markdown table
  generated from them.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence

import torch


def results_root() -> pathlib.Path:
    """benchmarks/results of the source checkout fastbert runs from, else ./fastbert-results."""
    repo = pathlib.Path(__file__).resolve().parent.parent
    if (repo / "benchmarks").is_dir() and (repo / "pyproject.toml").is_file():
        return repo / "benchmarks" / "results"
    return pathlib.Path.cwd() / "fastbert-results"


def no_cuda_exit(name: str) -> None:
    """Timing needs CUDA: say so in one line and exit 0 on a machine without it."""
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device here; timing needs a GPU (nothing measured).")
        sys.exit(0)


def time_ms(
    fn: Callable, *, args_list: Sequence[tuple] | None = None, grad_to_none=None, warmup: int = 25, rep: int = 100
) -> dict:
    """Median, p20 and p80 milliseconds of fn() (or fn(*args) cycling through args_list, one set per call)."""
    import triton.testing

    if args_list:
        state = {"i": 0}

        def call():
            args = args_list[state["i"] % len(args_list)]
            state["i"] += 1
            return fn(*args)
    else:
        call = fn
    med, p20, p80 = triton.testing.do_bench(call, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                            quantiles=[0.5, 0.2, 0.8])  # fmt: skip
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}


def forward_backward(fwd: Callable, leaves: Sequence[torch.Tensor], make_grad: Callable = torch.randn_like):
    """A callable running ``fwd()`` and its backward (incoming gradient made once, by make_grad on the first
    output), then clearing the leaves' gradients: one training-style call of an op, to time or profile."""
    dy = None

    def run():
        nonlocal dy
        out = fwd()
        if dy is None:
            dy = make_grad(out)
        out.backward(dy)
        for t in leaves:
            t.grad = None

    return run


def copies_for_rotation(nbytes_per_set: int, l2_bytes: int | None = None) -> int:
    """How many input sets to rotate through so that one pass over them exceeds the L2 cache (at least 2)."""
    if l2_bytes is None:
        l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(2, min(8, -(-3 * l2_bytes // max(1, nbytes_per_set))))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_close(actual: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, name: str = "") -> tuple:
    """(ok, err, eager_err): the test suite's rule, error <= 2x eager's error + one ulp at the output's scale."""
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}.get(actual.dtype, 1e-5)
    scale = max(1.0, ref64.abs().max().item())
    err, eager_err = max_err(actual, ref64), max_err(eager, ref64)
    ok = bool(torch.isfinite(actual).all()) and err <= 2 * eager_err + ulp * scale
    if not ok:
        print(f"  CHECK FAILED {name}: err {err:.3g} vs eager {eager_err:.3g}")
    return ok, err, eager_err


def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy bandwidth (read + write), the ceiling of a memory-bound kernel."""
    n = 1 << 28
    src = torch.empty(n, device="cuda", dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src))["median_ms"]
    return 2 * n / t / 1e6


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=pathlib.Path(__file__).parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def header() -> dict:
    def version(mod: str):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as None
            return None

    cuda = torch.cuda.is_available()
    driver = None
    if cuda:
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip().splitlines()[0]  # fmt: skip
        except (OSError, IndexError):
            driver = None
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "fastbert": version("fastbert"),
        "python": platform.python_version(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def gpu_slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(suite: str, rows: list[dict], out_dir: str | os.PathLike | None = None,
                  columns: Sequence[str] | None = None, extra: dict | None = None) -> pathlib.Path:  # fmt: skip
    """Write {header, rows} as JSON and a Markdown table beside it; returns the JSON path."""
    head = header() | (extra or {})
    folder = pathlib.Path(out_dir) if out_dir else results_root() / gpu_slug(head["device"])
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{suite}-{(head['commit'] or 'nocommit')[:10]}"
    path = folder / f"{stem}.json"
    path.write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    md = [f"# {suite}", "", f"{head['device']} · torch {head['torch']} · triton {head['triton']} · "
          f"commit {(head['commit'] or '?')[:10]}{' (dirty)' if head['dirty'] else ''} · {head['date']}", "",
          markdown_table(rows, columns), ""]  # fmt: skip
    (folder / f"{stem}.md").write_text("\n".join(md))
    print(f"results: {path}")
    return path
