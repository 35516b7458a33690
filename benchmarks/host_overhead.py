"""Host time of each public op on a machine without a GPU: the whole Python path of a call (validation, autograd,
launcher, Triton's JIT launch: argument binding, specialisation, cache lookup) down to the C launch itself,
which is replaced by a no-op. Kernels are compiled for sm_90 on the CPU (as the compile gate does) by a stand-in
Triton driver, and CPU tensors are routed to the Triton path. A diagnostic for host overhead, which bounds
fastbert at small batches and in training (an H100 session measured ~300 us of host time per op call in a
BERT-base training step); what it leaves out is the driver's launch (~5-10 us) and the allocator's CUDA calls.

    python benchmarks/host_overhead.py [--profile OP]     # OP: a row name below, e.g. "add_layer_norm"
    python benchmarks/host_overhead.py --bert [--layers N] [--profile fastbert]

Prints microseconds per call (median of 7 rounds) for the forward (no grad) and forward + backward. --bert
times a whole BERT training step's forward + backward instead (12 layers as in BERT-base, but hidden 64 and
2 x 16 tokens so that the CPU's real work stays small), bf16 autocast, fastbert (kernel launches stubbed) beside
transformers' SDPA model (real, tiny CPU kernels): the host time a step costs each, which bounds the training
step on a GPU when it exceeds the kernels' time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("host_overhead measures Triton's compiled launch path: unset TRITON_INTERPRET")

import torch


class _Launcher:
    """Stands in for Triton's CUDA launcher: the launch is a no-op, counted in ``launches``."""

    launches = 0

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        _Launcher.launches += 1


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class FakeDriver:
    """Triton's active driver for an H100 that is not there: compiles for sm_90, launches nothing."""

    def __init__(self):
        from triton.backends.nvidia.driver import CudaDriver

        self._real = CudaDriver.__new__(CudaDriver)  # for the few methods used only at compile time
        self.utils = _Utils()
        self.launcher_cls = _Launcher

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=0):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def fake_gpu(zero_outputs: bool = False):
    """Route CPU tensors through the Triton kernels with the stand-in driver. zero_outputs: kernel outputs are
    allocated as zeros (the kernels never write them), so that the real CPU work of the ops around them (--bert)
    does not meet NaNs or denormals and their slow paths; the op rows keep torch.empty, as on a GPU."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver

    from fastbert.kernels import add_layer_norm, attention, attention_bwd, common, linear_cross_entropy, linear_gelu
    from fastbert.ops import _add_layer_norm, _attention, _common, _linear_cross_entropy, _linear_gelu

    mods = (_common, _add_layer_norm, _attention, _linear_gelu, _linear_cross_entropy)
    saved = [m.use_triton for m in mods], driver._active, Autotuner._bench, os.environ.get("FASTBERT_LINEAR_GELU_SM90")
    saved_tiles = attention._on_gpu, attention._time
    driver.set_active(FakeDriver())
    for m in mods:
        m.use_triton = lambda t: True
    allocators = (common, add_layer_norm, attention, attention_bwd, linear_gelu, linear_cross_entropy)
    allocators = allocators if zero_outputs else ()
    saved_empty = [k.empty for k in allocators]
    for k in allocators:
        k.empty = lambda shape, *, device, dtype: torch.zeros(shape, device=device, dtype=dtype)
    # Nothing can be timed: the autotuners keep their first config, linear_gelu its portable kernel.
    Autotuner._bench = lambda self, *args, config, **kwargs: [1.0, 1.0, 1.0]
    # attention's tiles take the GPU's path (the bucket lookup a launch), all timed alike: the defaults stay
    attention._on_gpu, attention._time = (lambda q: True), (lambda launch, meta: 1.0)
    os.environ["FASTBERT_LINEAR_GELU_SM90"] = "0"
    try:
        yield
    finally:
        for m, f in zip(mods, saved[0], strict=True):
            m.use_triton = f
        for k, f in zip(allocators, saved_empty, strict=True):
            k.empty = f
        driver._active, Autotuner._bench = saved[1], saved[2]
        attention._on_gpu, attention._time = saved_tiles
        if saved[3] is None:
            os.environ.pop("FASTBERT_LINEAR_GELU_SM90")
        else:
            os.environ["FASTBERT_LINEAR_GELU_SM90"] = saved[3]


def cases():
    from fastbert import ops

    dt = torch.float16
    M, N = 128, 768
    x, r = (torch.randn(M, N, dtype=dt, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(N, dtype=dt, requires_grad=True) for _ in range(2))
    W, B = torch.randn(4 * N, N, dtype=dt, requires_grad=True), torch.randn(4 * N, dtype=dt, requires_grad=True)
    q, k, v = (torch.randn(1, 128, 12, 64, dtype=dt).transpose(1, 2).requires_grad_() for _ in range(3))
    # the masked-LM decoder + loss at a tiny vocabulary (its GEMMs are real CPU work here), an odd one (padded)
    xs, D = torch.randn(16, 64, dtype=dt, requires_grad=True), torch.randn(500, 64, dtype=dt, requires_grad=True)
    labels = torch.randint(0, 500, (16,))
    return {
        "add_layer_norm": (lambda: ops.add_layer_norm(x, r, w, b), (x, r, w, b)),
        "add_layer_norm p=0.1": (lambda: ops.add_layer_norm(x, r, w, b, dropout_p=0.1), (x, r, w, b)),
        "linear_gelu": (lambda: ops.linear_gelu(x, W, B), (x, W, B)),
        "attention": (lambda: ops.attention(q, k, v), (q, k, v)),
        "attention p=0.1": (lambda: ops.attention(q, k, v, dropout_p=0.1), (q, k, v)),
        "linear_cross_entropy": (lambda: ops.linear_cross_entropy(xs, D, None, labels)[1], (xs, D)),
    }


def bert_step(provider: str, layers: int = 12):
    """A closure running one BertForPreTraining forward + backward (bf16 autocast), and the model."""
    import transformers

    import fastbert

    cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(cfg).train()
    model.set_attn_implementation("sdpa")
    if provider == "fastbert":
        fastbert.optimize(model)
    ids = torch.randint(5, cfg.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # one padded sequence: the varlen path, as in a real batch
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    nsp = torch.zeros(2, dtype=torch.long)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=nsp).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def print_profile(fn, calls: int, rows: int) -> None:
    """cProfile of ``calls`` calls of fn, the top ``rows`` functions by own time."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(rows)
    print(out.getvalue())


def per_call_us(fn, n: int = 200, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", help="cProfile the forward + backward of this row")
    p.add_argument("--only", help="comma list of rows")
    p.add_argument("--bert", action="store_true", help="a whole BERT training step's host time (see above)")
    p.add_argument("--layers", type=int, default=12, help="--bert: encoder layers (BERT-base: 12)")
    args = p.parse_args()
    import triton

    from fastbert.benchtools import forward_backward

    print(f"torch {torch.__version__}, triton {triton.__version__}; host us per call, launches stubbed")
    if args.bert:
        with fake_gpu(zero_outputs=True):
            for provider in ("sdpa", "fastbert"):
                step = bert_step(provider, args.layers)
                print(f"bert train step {provider:10s} fwd+bwd {per_call_us(step, n=5, rounds=5) / 1e3:8.2f} ms",
                      flush=True)  # fmt: skip
                if args.profile == provider:
                    print_profile(step, 5, 40)
        return
    with fake_gpu():
        for name, (fwd, leaves) in cases().items():
            if args.only and name not in args.only.split(","):
                continue
            fb = forward_backward(fwd, leaves, torch.ones_like)
            # linear_gelu's backward runs its matmuls in PyTorch: on the CPU they are real work, not overhead.
            with torch.no_grad():
                f_us = per_call_us(fwd)
            fb_us = per_call_us(fb, n=20, rounds=3) if "linear_gelu" not in name else float("nan")
            counts = []
            for fn in (fwd, fb):  # kernel launches of one call: what the timings cover
                before = _Launcher.launches
                with torch.set_grad_enabled(fn is fb):
                    fn()
                counts.append(_Launcher.launches - before)
            print(f"{name:24s} fwd {f_us:8.1f}   fwd+bwd {fb_us:8.1f}   launches {counts[0]} / {counts[1]}", flush=True)
            if args.profile == name:
                print_profile(fb, 100, 30)


if __name__ == "__main__":
    main()
