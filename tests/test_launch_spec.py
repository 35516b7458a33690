"""The compile gate checks what actually runs: each kernel launch the public ops make is specialised by Triton
exactly like one of the gate's cases (argument types, divisibility by 16, integers pinned to 1, constexprs,
warps), so the gate's verdicts (no spill, 16-byte loads, wgmma) hold for real launches, not for a variant that
never runs. Before this check existed, the gate compiled every kernel without the alignment Triton specialises
on at launch, and nothing noticed that the attention kernels loaded their tiles two bytes at a time.

Launches are captured instead of run (the arguments are what a GPU launch would get) and specialised with
Triton's own launch-time rule, honouring each kernel's do_not_specialize. Attention launches are captured with
the tiles a GPU would get (its launchers pick a small tile under the interpreter), the alternates they time
included. Autotuned kernels (linear_gelu) are matched without their autotuned meta-parameters (the interpreter
runs one config of its own; the gate compiles every GPU one).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

import pytest
import torch

from conftest import HAS_CUDA
from fastbert import ops
from fastbert.kernels import gate
from fastbert.kernels.common import FP_FUSION

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="launches are captured in the interpreter (the CPU suite)")

try:
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
except ImportError:  # pragma: no cover - older Triton
    native_specialize_impl = None


def _specialise(value, specialize: bool):
    """(type, divisible_by_16) or ("constexpr", value) of one runtime argument, as Triton's launcher decides."""
    kind, attr = native_specialize_impl(BaseBackend, value, False, specialize, True)[:2]
    if kind == "constexpr":
        return ("constexpr", attr)
    return (kind, attr == "D")


class _Launch:
    def __init__(self, kernel, args, kwargs):
        self.name = kernel.fn.__name__
        # A kernel module may let one pointer dtype stand for another in its gate (add_layer_norm: bf16 for fp16,
        # same code but the conversion instructions).
        standin = getattr(importlib.import_module(kernel.fn.__module__), "GATE_DTYPE_STANDIN", {})
        params = inspect.signature(kernel.fn).parameters
        bound = dict(zip(kernel.arg_names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in params}
        dns = set(kernel.kwargs.get("do_not_specialize") or ())
        self.constexprs, self.runtime = {}, {}
        for name, param in params.items():
            if name not in bound:
                continue  # a defaulted constexpr not passed
            if "constexpr" in str(param.annotation):
                self.constexprs[name] = bound[name]
            else:
                kind, rest = _specialise(bound[name], name not in dns)
                self.runtime[name] = (standin.get(kind, kind), rest)
        self.num_warps = kwargs.get("num_warps")
        self.fp_fusion = kwargs.get("enable_fp_fusion")

    def mismatches(self, case, tuned: set[str]) -> list[str]:
        """How this launch differs from a gate case (empty: the case is exactly what runs)."""
        out = []
        for name, value in self.constexprs.items():
            if name not in tuned and case.constexprs.get(name) != value:
                out.append(f"{name}={value!r} (gate: {case.constexprs.get(name)!r})")
        for name, spec in self.runtime.items():
            if spec[0] == "constexpr":
                if case.constexprs.get(name) != spec[1]:
                    out.append(f"{name}={spec[1]} specialised to a constant (gate: {case.signature.get(name)})")
            elif _type(case.signature.get(name), tuned) != _type(spec[0], tuned):
                out.append(f"{name}: {spec[0]} (gate: {case.signature.get(name)})")
            elif spec[1] != (name in case.divisible):
                out.append(f"{name}: divisible by 16 = {spec[1]} (gate: {name in case.divisible})")
        if self.fp_fusion is not FP_FUSION:
            out.append(f"enable_fp_fusion={self.fp_fusion!r} (gate: {FP_FUSION}; unset: the default changes in 3.10)")
        if not tuned and self.num_warps is not None and self.num_warps != case.num_warps:
            out.append(f"num_warps={self.num_warps} (gate: {case.num_warps})")
        return out


def _type(kind: str | None, tuned: set[str]) -> str | None:
    """A TMA descriptor's type names its block shape, which an autotuned kernel takes from its config (the
    interpreter's config differs from the GPU ones): compare only the element type there."""
    if tuned and kind is not None and kind.startswith("tensordesc<"):
        return kind.split("[")[0]
    return kind


@contextlib.contextmanager
def captured_launches():
    """Record every kernel launch (without running it) while the block runs."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(_Launch(self, args, kwargs))

    from fastbert.kernels import attention

    original = InterpretedFunction.run, attention.interpreting
    InterpretedFunction.run = record
    attention.interpreting = lambda: False  # the GPU's tiles: nothing runs while capturing
    try:
        yield launches
    finally:
        InterpretedFunction.run, attention.interpreting = original


def _gate_index():
    """Gate cases by kernel name, and the autotuned meta-parameters of each autotuned kernel."""
    from triton.runtime.autotuner import Autotuner

    cases, tuned = {}, {}
    for case in gate.all_cases():
        cases.setdefault(case.fn.__name__, []).append(case)
    for module in gate.KERNEL_MODULES:
        for obj in vars(importlib.import_module(module)).values():
            if isinstance(obj, Autotuner):
                tuned[obj.fn.__name__] = {k for c in obj.configs for k in c.kwargs}
    return cases, tuned


def assert_covered(launches):
    assert launches, "no kernel launch was captured"
    cases, tuned = _gate_index()
    for launch in launches:
        candidates = cases.get(launch.name, [])
        assert candidates, f"{launch.name} has no compile-gate case"
        diffs = [launch.mismatches(c, tuned.get(launch.name, set())) for c in candidates]
        best = min(range(len(diffs)), key=lambda i: len(diffs[i]))
        assert not diffs[best], (
            f"{launch.name}: no gate case compiles this launch; nearest {candidates[best].name}: "
            + "; ".join(diffs[best])
        )


def _rand(*shape, dtype=torch.float16):
    return torch.randn(*shape).to(dtype)


@pytest.fixture(autouse=True)
def _needs_triton_specialisation():
    if native_specialize_impl is None:
        pytest.skip("this Triton has no native_specialize_impl")


# --------------------------------------------------------------------------------------------- attention
def _attention_calls(dtype, head_dim, dropout_p, mask_kind, seq=130):
    """fwd + bwd of a transformers-style call: q, k, v as transposed [B, S, H, D] views, optional mask."""
    B, H = 2, 3
    qkv = _rand(B, seq, 3, H, head_dim, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    mask = None
    if mask_kind == "bool":
        mask = torch.arange(seq)[None, :] < torch.tensor([seq, 1])[:, None]
    elif mask_kind == "int-offset":  # a view whose base is not 16-byte aligned
        mask = torch.ones(B + 1, seq, dtype=torch.int64)[1:]
    elif mask_kind == "bool-offset":
        mask = torch.ones(B * seq + 1, dtype=torch.bool)[1:].view(B, seq)
    out = ops.attention(q, k, v, mask, dropout_p=dropout_p)
    out.backward(torch.randn_like(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128])
def test_attention_launches_are_gated(dtype, head_dim):
    with captured_launches() as launches:
        _attention_calls(dtype, head_dim, 0.0, None)
        _attention_calls(dtype, head_dim, 0.1, "bool")
    assert_covered(launches)


@pytest.mark.parametrize("mask_kind", ["bool", "int-offset", "bool-offset"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.6])
@pytest.mark.parametrize("seq", [1, 17, 512])
def test_attention_launches_any_mask_length_dropout(mask_kind, dropout_p, seq):
    with captured_launches() as launches:
        _attention_calls(torch.float16, 64, dropout_p, mask_kind, seq=seq)
    assert_covered(launches)


def test_attention_odd_layouts_are_gated():
    """Inputs that the kernels cannot read in place (an odd token stride, an unaligned base) are copied into the
    layout the gate compiled, not launched as an ungated variant."""
    with captured_launches() as launches:
        base = _rand(2, 3, 40, 65)[..., 1:]  # unaligned base, token stride 65
        q = base.detach().requires_grad_()
        out = ops.attention(q, q.detach().clone().requires_grad_(), q.detach().clone().requires_grad_())
        out.backward(torch.randn_like(out))
        single = _rand(1, 4, 1, 32).transpose(1, 2).contiguous().transpose(1, 2)  # size-1 dims, odd strides
        ops.attention(single, single, single)
    assert_covered(launches)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_attention_alternate_tiles_are_gated(monkeypatch, dtype, head_dim):
    """On a GPU the launchers time each kernel's alternate tiles against its default (kernels.attention._Tiles):
    those launches, and the alternates then chosen, are gated too."""
    from test_attention_tiles import alternates_faster, timed_tiles

    from fastbert.kernels import attention as at

    fake_time = alternates_faster(run=True)  # (runs, here: records, each timed launch)
    monkeypatch.delenv("FASTBERT_AUTOTUNE", raising=False)
    monkeypatch.setattr(at, "_on_gpu", lambda q: True)
    monkeypatch.setattr(at, "_capturing", lambda: False)
    monkeypatch.setattr(at, "_time", fake_time)
    for tiles in (at._FWD_TILES, at._DKDV_TILES, at._DQ_TILES):
        monkeypatch.setattr(tiles, "chosen", {})
    with captured_launches() as launches:
        _attention_calls(dtype, head_dim, 0.0, None)
        _attention_calls(dtype, head_dim, 0.1, "bool")
    expected = timed_tiles(dtype, head_dim, False) + timed_tiles(dtype, head_dim, True)  # 3 kernels x 2 calls
    assert len(fake_time.timed) == expected
    tiles = {(launch.name, *(launch.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "HAS_DROPOUT")))
             for launch in launches if "BLOCK_N" in launch.constexprs}  # fmt: skip
    assert len(tiles) == expected, tiles  # every default and every alternate launched
    assert_covered(launches)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_attention_varlen_launches_are_gated(dropout_p):
    hidden = _rand(3, 50, 2 * 64)
    mask = torch.arange(50)[None, :] < torch.tensor([50, 7, 1])[:, None]
    packed, indices, cu_seqlens, max_seqlen = ops.unpad(hidden, mask)
    qkv = packed.view(-1, 2, 64)
    with captured_launches() as launches:
        q, k, v = (qkv.detach().clone().requires_grad_() for _ in range(3))
        out = ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p)
        out.backward(torch.randn_like(out))
    assert_covered(launches)


# --------------------------------------------------------------------------------------------- add_layer_norm
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("hidden", [1, 40, 768, 1000, 1024, 4096, 8192])
# rows: one, a few, and several row tiles (no integer argument is specialised, so more rows add nothing but
# seconds of tensor filling in the CPU suite)
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_add_layer_norm_launches_are_gated(dtype, hidden, rows):
    x = _rand(rows, hidden, dtype=dtype).requires_grad_()
    residual = _rand(rows, hidden, dtype=dtype).requires_grad_()
    weight = _rand(hidden, dtype=dtype).requires_grad_()
    bias = _rand(hidden, dtype=dtype).requires_grad_()
    with captured_launches() as launches:
        for p in (0.0, 0.1):
            y = ops.add_layer_norm(x, residual, weight, bias, dropout_p=p)
            y.backward(torch.randn_like(y))
    assert_covered(launches)


def test_add_layer_norm_odd_layouts_are_gated():
    """Row-strided views (a slice of a wider tensor), an unaligned base, and autocast's fp32 residual stream
    (training, with the sum stored, with and without dropout; inference)."""
    wide = _rand(9, 2 * 768, dtype=torch.bfloat16)
    x = wide[1:, 3 : 3 + 768].requires_grad_()  # unaligned base, row stride 1536
    residual = _rand(8, 768, dtype=torch.float32).requires_grad_()
    weight, bias = _rand(768, dtype=torch.float32), _rand(768, dtype=torch.float32)
    with captured_launches() as launches:
        y = ops.add_layer_norm(x.float(), residual, weight, bias)
        y.backward(torch.randn_like(y))
        for p in (0.0, 0.1):  # autocast training: s stored and read back
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = ops.add_layer_norm(x, residual, weight, bias, dropout_p=p)
            y.backward(torch.randn_like(y))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ops.add_layer_norm(x, residual, weight, bias)
        odd = _rand(8, 1000, dtype=torch.bfloat16)[:, : 16 * 30]  # N % 16 == 0, row stride 1000
        ops.add_layer_norm(odd, odd, weight[:480].bfloat16(), bias[:480].bfloat16())
    assert_covered(launches)


# --------------------------------------------------------------------------------------------- linear_gelu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
# BERT-large's widths at 512 tokens: M is a runtime argument (not specialised), so 512 rows launch what 16384 do,
# and the PyTorch GEMMs of the backward, which do run here (fp16 on the CPU: ~100 s at 4096 rows), stay short.
@pytest.mark.parametrize("m, k, n", [(1, 24, 40), (7, 768, 3072), (130, 64, 48), (512, 1024, 4096)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_launches_are_gated(dtype, m, k, n, approximate):
    x = _rand(m, k, dtype=dtype).requires_grad_()
    weight = _rand(n, k, dtype=dtype).requires_grad_()
    bias = _rand(n, dtype=dtype).requires_grad_()
    with captured_launches() as launches:
        y = ops.linear_gelu(x, weight, bias, approximate=approximate)
        y.backward(torch.randn_like(y))
        with torch.no_grad():
            ops.linear_gelu(x, weight, None, approximate=approximate)
    assert_covered(launches)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m, k, n", [(1, 24, 40), (512, 768, 3072)])
def test_linear_gelu_sm90_launches_are_gated(monkeypatch, dtype, m, k, n):
    from fastbert.kernels import linear_gelu as lg

    monkeypatch.setenv(lg.SM90_ENV, "1")
    x = _rand(m, k, dtype=dtype).requires_grad_()
    weight = _rand(n, k, dtype=dtype).requires_grad_()
    bias = _rand(n, dtype=dtype).requires_grad_()
    with captured_launches() as launches:
        y = ops.linear_gelu(x, weight, bias)
        y.backward(torch.randn_like(y))
    assert {launch.name for launch in launches} >= {"_linear_gelu_fwd_sm90_kernel"}
    assert_covered(launches)


def test_linear_gelu_odd_layouts_are_gated():
    """A transposed x, an unaligned bias view, a row-strided dy."""
    x = _rand(40, 64, dtype=torch.float16).t().requires_grad_()  # [64, 40], column stride 64
    weight = _rand(48, 40, dtype=torch.float16).requires_grad_()
    bias = _rand(49, dtype=torch.float16)[1:].requires_grad_()
    with captured_launches() as launches:
        y = ops.linear_gelu(x, weight, bias)
        y.backward(_rand(64, 96, dtype=torch.float16)[:, 1:49])
    assert_covered(launches)


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_attention_tables_give_every_call_a_default(kind):
    """The attention launchers choose their tiles from a table (kernels.attention._Tiles): every dtype x head-dim
    block x dropout must match at least one entry (the first is its default, the others alternates that a GPU
    times against it), with no entry twice; fp32 has no alternates (its IEEE dots are not what BERT runs)."""
    from fastbert.kernels import attention as at

    table = {"fwd": at._FWD_CONFIGS, "dkdv": at._DKDV_CONFIGS, "dq": at._DQ_CONFIGS}[kind]
    for dtype in ("fp16", "bf16", "fp32"):
        for block_d in (32, 64, 128):
            for dropout in (False, True):
                configs = at._applicable(table, dtype, block_d, dropout)
                assert configs and len(set(configs)) == len(configs), (dtype, block_d, dropout, configs)
                assert dtype != "fp32" or len(configs) == 1, (dtype, block_d, dropout, configs)


# --------------------------------------------------------------------------------------------- linear_cross_entropy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("rows, vocab", [(1, 1), (7, 100), (130, 30522)])
def test_linear_cross_entropy_launches_are_gated(dtype, rows, vocab):
    x = _rand(rows, 32, dtype=dtype).requires_grad_()
    weight = _rand(vocab, 32, dtype=dtype).requires_grad_()
    bias = _rand(vocab, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,))
    labels[1::2] = -100
    with captured_launches() as launches:
        logits, loss = ops.linear_cross_entropy(x, weight, bias, labels)
        (loss + logits.float().mean()).backward()
        with torch.no_grad():
            ops.linear_cross_entropy(x, weight, None, labels.int()[None])  # int32 labels, 2-D
    assert {launch.name for launch in launches} >= {"_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel"}
    assert_covered(launches)


def test_linear_cross_entropy_autocast_launches_are_gated():
    x = _rand(9, 32, dtype=torch.float32)[:, None, :].expand(9, 2, 32).requires_grad_()  # odd strides
    weight = _rand(101, 32, dtype=torch.float32).requires_grad_()
    labels = torch.randint(0, 101, (9, 2))
    with captured_launches() as launches:
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = ops.linear_cross_entropy(x, weight, None, labels)
        loss.backward()
    assert_covered(launches)


def test_cross_entropy_backward_is_one_kernel_with_and_without_gather():
    """The backward over the labelled rows alone (gather: eager, with ignored labels) and over every row (a batch
    labelled throughout, or a CUDA graph, which cannot count the labelled rows) launch one compiled kernel, so a
    graph captured after an eager warm-up finds it loaded (loading a module during capture fails)."""
    specs = []
    for every_row in (False, True):
        x = _rand(7, 32, dtype=torch.float16).requires_grad_()
        weight = _rand(100, 32, dtype=torch.float16).requires_grad_()
        labels = torch.randint(0, 100, (7,))
        if not every_row:
            labels[1::2] = -100
        with captured_launches() as launches:
            _, loss = ops.linear_cross_entropy(x, weight, None, labels)
            loss.backward()
        (bwd,) = [launch for launch in launches if launch.name == "_cross_entropy_bwd_kernel"]
        specs.append((bwd.constexprs, bwd.runtime, bwd.num_warps))
    assert specs[0] == specs[1], specs
