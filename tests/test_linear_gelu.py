"""ops.linear_gelu against the float64 reference: output and all three gradients, awkward shapes in the interpreter
(fp32, fp16; one row, rows that are no multiple of a block), both GELU forms, with and without bias, strided and
3-D inputs, autocast, bad input, and BERT shapes on GPU (fp16, bf16)."""

import contextlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA
from fastbert import reference
from fastbert.ops import linear_gelu
from numerics import assert_matches_reference, max_err


@contextlib.contextmanager
def allow_tf32(enabled: bool):
    """torch.backends.cuda.matmul.allow_tf32 set for the block, restored after. (Not pytest's monkeypatch: the
    attribute lives behind the module's __getattr__ / __setattr__, so monkeypatch's undo tries delattr and fails
    with AttributeError, on torch 2.13 at least.)"""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def make_inputs(m_shape, k, n, dtype, device=DEVICE, seed=0, bias=True):
    """x [*m_shape, k], weight [n, k] scaled like nn.Linear's init (pre-activations of order 1), bias, dy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((*m_shape, k), generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(device, dtype) if bias else None
    dy = torch.randn((*m_shape, n), generator=g).to(device, dtype)
    return x, w, b, dy


def run(fn, inputs, dy):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def check_against_reference(x, w, b, dy, approximate="none"):
    """Kernel vs float64 reference (and eager in the kernel's dtype, for the half-precision rule)."""
    fn = lambda x, w, b: linear_gelu(x, w, b, approximate=approximate)
    ref_fn = lambda x, w, b: reference.linear_gelu(x, w, b, approximate=approximate)
    out, grads = run(fn, (x, w, b), dy)
    ref_out, ref_grads = run(ref_fn, [None if t is None else t.double() for t in (x, w, b)], dy.double())
    eager_out, eager_grads = run(ref_fn, (x, w, b), dy)
    assert out.dtype == x.dtype
    assert_matches_reference(out, ref_out, eager_out, name="y")
    for name, g, rg, eg in zip(("dx", "dweight", "dbias"), grads, ref_grads, eager_grads, strict=True):
        if rg is None:
            assert g is None, name
            continue
        assert g.dtype == eg.dtype, name
        assert_matches_reference(g, rg, eg, name=name)


# (k, n): in / out features, multiples of 8 that are and are not multiples of the interpreter's 32-wide blocks.
FEATURES = [(16, 32), (24, 40), (64, 48)]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kn", FEATURES, ids=lambda kn: f"k{kn[0]}-n{kn[1]}")
@pytest.mark.parametrize("m", [1, 7, 64, 130], ids=lambda m: f"m{m}")
def test_matches_reference(m, kn, dtype, approximate):
    check_against_reference(*make_inputs((m,), *kn, dtype), approximate=approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m", [1, 130], ids=lambda m: f"m{m}")
def test_without_bias(m, dtype, approximate):
    check_against_reference(*make_inputs((m,), 24, 40, dtype, bias=False), approximate=approximate)


def test_3d_input():
    check_against_reference(*make_inputs((2, 5), 32, 48, torch.float32))


def test_non_contiguous_input():
    x, w, b, _ = make_inputs((9, 3), 40, 24, torch.float32)
    xt = x.transpose(0, 1)  # [3, 9, 40] with row strides that are not the row length
    assert not xt.is_contiguous()
    dy = torch.randn(3, 9, 24, device=DEVICE)
    check_against_reference(xt, w, b, dy)
    wide = torch.randn(6, 100, device=DEVICE)
    check_against_reference(wide[:, 8:72], *make_inputs((6,), 64, 16, torch.float32)[1:])


def test_large_pre_activations_stay_finite():
    # |h| in the hundreds: the tanh form's exponential overflows to inf, and must give gelu(h) = h or 0, not NaN.
    x, w, b, dy = make_inputs((7,), 16, 32, torch.float32)
    for approximate in ("none", "tanh"):
        check_against_reference(x * 100, w, b, dy, approximate=approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_infinite_and_nan_pre_activations(approximate):
    """Pre-activations of +inf, -inf and NaN (through the bias, so that no inf · 0 arises in the matmul): +inf
    gives +inf and NaN gives NaN, as eager does; -inf gives what eager gives for the tanh form (NaN: -inf · 0)
    and, for the erf form, the limit 0, which the kernel's max(h, 0) - |h| Φ(-|h|) reaches (eager: NaN)."""
    x, w, b, _ = make_inputs((3,), 16, 32, torch.float32)
    b = b.clone()
    b[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    with torch.no_grad():
        y = linear_gelu(x, w, b, approximate=approximate).cpu()
        ref = reference.linear_gelu(x.double(), w.double(), b.double(), approximate=approximate).cpu()
    if approximate == "none":
        ref[:, 1] = 0.0
    assert torch.isinf(y[:, 0]).all() and (y[:, 0] > 0).all()
    torch.testing.assert_close(y, ref.float(), equal_nan=True)


def test_erfc_literals_are_the_folded_fit():
    """_half_erfc_parts spells its constants as literals (a tl.constexpr global costs host time on every launch):
    they must be exactly erfc_kernel_constants(), the Numerical Recipes fit with log2(e) and ½ folded in."""
    import ast
    import inspect
    import textwrap

    from fastbert.kernels import linear_gelu as lg

    def number(node):
        try:
            value = ast.literal_eval(node)
        except ValueError:
            return None
        return value if type(value) is float else None

    tree = ast.parse(textwrap.dedent(inspect.getsource(lg._half_erfc_parts.fn)))
    nodes = sorted(
        (n for n in ast.walk(tree) if isinstance(n, (ast.Call, ast.BinOp))), key=lambda n: (n.lineno, n.col_offset)
    )
    literals = [v for n in nodes for arg in ((n.left, n.right) if isinstance(n, ast.BinOp) else n.args)
                if (v := number(arg)) is not None]  # fmt: skip
    # a * W_SCALE, fma(a, D_SCALE, 1.0), then Horner's fmas from Q9 down to Q0
    assert literals == [*lg.erfc_kernel_constants()[:2], 1.0, *lg.erfc_kernel_constants()[2:]], literals


def test_exact_gelu_accuracy_over_the_whole_range():
    """The erf GELU's Φ comes from a fit of erfc (kernels/linear_gelu.py, _half_erfc_parts), not libdevice's erf:
    through an identity weight in fp32, gelu(h) for h across [-12, 12] must match float64 to a few fp32 ulps
    of h, and keep its relative accuracy in the lower tail (h in [-5, -1], Φ down to 3e-7), where 1 + erf(h/√2)
    cancels (eager fp32 F.gelu is 100% off there)."""
    h = torch.linspace(-12.0, 12.0, 8 * 301)
    x = h.view(-1, 8).to(DEVICE).requires_grad_()
    with allow_tf32(False):
        y = linear_gelu(x, torch.eye(8, device=DEVICE))
    y.backward(torch.ones_like(y))
    h64 = h.double().view(-1, 8).requires_grad_()
    ref = F.gelu(h64)
    ref.backward(torch.ones_like(ref))
    err = (y.detach().cpu().double() - ref.detach()).abs()
    assert (err <= 4e-7 * h64.detach().abs().clamp(min=1.0)).all(), f"max abs error {err.max().item():.3g}"
    tail = (h64.detach() >= -5.0) & (h64.detach() <= -1.0)
    rel = err[tail] / ref.detach()[tail].abs()
    assert rel.max() <= 1e-5, f"max relative error in the lower tail {rel.max().item():.3g}"
    dx_err = (x.grad.cpu().double() - h64.grad).abs()
    assert dx_err.max() <= 1e-6, f"max gelu' error {dx_err.max().item():.3g}"


def test_preactivation_stored_only_for_backward(monkeypatch):
    from fastbert.kernels import linear_gelu as kernels

    calls = []
    launcher = kernels.linear_gelu_fwd
    monkeypatch.setattr(kernels, "linear_gelu_fwd", lambda *a: calls.append(a[-1]) or launcher(*a))
    x, w, b, _ = make_inputs((5,), 16, 32, torch.float32)
    with torch.no_grad():
        y = linear_gelu(x, w, b.requires_grad_())
    torch.testing.assert_close(y, reference.linear_gelu(x, w, b), rtol=1e-5, atol=1e-5)
    assert linear_gelu(x, w, b.detach()).grad_fn is None  # nothing requires grad: no autograd node
    assert linear_gelu(x, w, b).grad_fn is not None
    assert calls == [False, False, True]


def test_autocast_follows_eager_linear():
    # fp16 autocast (bf16 is wrong in the interpreter): fp32 inputs are cast, the result is fp16, like F.linear's.
    x, w, b, dy = make_inputs((7,), 24, 40, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out, grads = run(lambda *t: linear_gelu(*t), (x, w, b), dy.half())
        eager_out, eager_grads = run(lambda *t: F.gelu(F.linear(*t)), (x, w, b), dy.half())
    assert out.dtype == torch.float16 and eager_out.dtype == torch.float16
    ref_out, ref_grads = run(reference.linear_gelu, [t.half().double() for t in (x, w, b)], dy.half().double())
    assert_matches_reference(out, ref_out, eager_out, name="y")
    for name, g, rg, eg in zip(("dx", "dweight", "dbias"), grads, ref_grads, eager_grads, strict=True):
        assert g.dtype == torch.float32 == eg.dtype, name  # gradients flow back through the casts
        err, eager_err = (g - rg).abs().max().item(), (eg - rg).abs().max().item()
        assert err <= 2 * eager_err + 2.0**-10 * max(1.0, rg.abs().max().item()), name


def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, _ = make_inputs((3,), 16, 32, torch.float32, device="cpu")
    torch.testing.assert_close(linear_gelu(x, w, b), reference.linear_gelu(x, w, b))


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's warning")
def test_bf16_in_the_interpreter_warns():
    x, w, b, _ = make_inputs((4,), 16, 32, torch.float32)
    from fastbert.ops import _common

    _common._warn_bf16_interpreted.cache_clear()
    with pytest.warns(RuntimeWarning, match="bfloat16 kernels under TRITON_INTERPRET=1 give wrong numbers"):
        linear_gelu(x.bfloat16(), w.bfloat16(), b.bfloat16())


def test_zero_rows():
    x, w, b, _ = make_inputs((0,), 16, 32, torch.float32)
    assert linear_gelu(x, w, b).shape == (0, 32)


@pytest.mark.parametrize(
    "case, message",
    [
        ("features", "last dimension must equal"),
        ("weight_1d", "weight must be 2-D"),
        ("bias", "bias must have shape"),
        ("k_not_8", "multiples of 8"),
        ("n_not_8", "multiples of 8"),
        ("k_zero", "nonzero multiples of 8"),
        ("dtype", "one dtype"),
        ("int", "float16, bfloat16 or float32"),
        ("approximate", "approximate must be one of"),
        ("device", "one device"),
    ],
)
def test_bad_input_raises_value_error(case, message):
    x, w, b, _ = make_inputs((4,), 16, 32, torch.float32)
    kwargs = {}
    if case == "features":
        x = x[:, :8]
    elif case == "weight_1d":
        w = w[0]
    elif case == "bias":
        b = b[:16]
    elif case == "k_not_8":
        x, w = x[:, :12], w[:, :12]
    elif case == "n_not_8":
        w, b = w[:20], b[:20]
    elif case == "k_zero":
        x, w = x[:, :0], w[:, :0]
    elif case == "dtype":
        w = w.half()
    elif case == "int":
        x = x.long()
    elif case == "approximate":
        kwargs["approximate"] = "sigmoid"
    elif case == "device":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA device beside the CPU")
        w = w.cpu()
    with pytest.raises(ValueError, match=message):
        linear_gelu(x, w, b, **kwargs)


def test_opcheck():
    import fastbert.ops._linear_gelu  # noqa: F401 - registers the custom ops

    x, w, b, _ = make_inputs((5,), 16, 32, torch.float32)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.fastbert.linear_gelu_fwd.default, (x, w, b, "none", True))
    torch.library.opcheck(torch.ops.fastbert.linear_gelu_fwd.default, (x, w, None, "tanh", True))
    torch.library.opcheck(torch.ops.fastbert.linear_gelu_fwd.default, (x.detach(), w, b, "none", False))


# ----------------------------------------------------------------------------------------------- linear_of_gelu
def ffn_fused(x, w1, b1, w2, b2, approximate="none"):
    """W2 · gelu(W1 x + b1) + b2 through linear_gelu_with_preact + linear_of_gelu (the drop-in's FFN path)."""
    from fastbert.ops._linear_gelu import linear_gelu_with_preact, linear_of_gelu

    y, h = linear_gelu_with_preact(x, w1, b1, approximate=approximate)
    return linear_of_gelu(y, h, w2, b2, approximate=approximate)


def ffn_eager(x, w1, b1, w2, b2, approximate="none"):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m_shape", [(7,), (2, 65)], ids=["m7", "b2-s65"])
def test_linear_of_gelu_matches_reference(m_shape, dtype, approximate):
    """The feed-forward chain whose second Linear saves the pre-activation and recomputes gelu(h) in its
    backward: output and all five gradients against float64, by the project's rule."""
    x, w1, b1, _ = make_inputs(m_shape, 24, 40, dtype, seed=1)
    _, w2, b2, dy = make_inputs(m_shape, 40, 16, dtype, seed=2)
    inputs = (x, w1, b1, w2, b2)
    fused = lambda *t: ffn_fused(*t, approximate=approximate)
    eager = lambda *t: ffn_eager(*t, approximate=approximate)
    out, grads = run(fused, inputs, dy)
    ref_out, ref_grads = run(eager, [t.double() for t in inputs], dy.double())
    eager_out, eager_grads = run(eager, inputs, dy)
    assert_matches_reference(out, ref_out, eager_out, name="out")
    for name, g, rg, eg in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, ref_grads, eager_grads, strict=True):
        assert g.dtype == dtype, name
        assert_matches_reference(g, rg, eg, name=name)


def saved_storages(fn, *args) -> tuple[torch.Tensor, set[int]]:
    """fn(*args) and the data pointers of every tensor autograd saved for its backward."""
    ptrs = set()

    def pack(t):
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, ptrs


def test_linear_of_gelu_keeps_the_preactivation_not_the_gelu_output():
    from fastbert.ops._linear_gelu import linear_gelu_with_preact, linear_of_gelu

    x, w1, b1, _ = make_inputs((9,), 16, 32, torch.float32)
    _, w2, b2, _ = make_inputs((9,), 32, 16, torch.float32, seed=1)
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    found = {}

    def chain(x, w1, b1, w2, b2):
        y, h = linear_gelu_with_preact(x, w1, b1)
        found.update(y=y, h=h)
        return linear_of_gelu(y, h, w2, b2)

    _, saved = saved_storages(chain, *leaves)
    assert found["h"] is not None and found["h"].shape == (9, 32)
    assert found["h"].untyped_storage().data_ptr() in saved
    assert found["y"].untyped_storage().data_ptr() not in saved
    # the same chain with a plain Linear keeps y too (what the drop-in avoids)
    plain = []
    _, saved = saved_storages(lambda *t: F.linear(plain.append(linear_gelu(*t[:3])) or plain[0], *t[3:]), *leaves)
    assert plain[0].untyped_storage().data_ptr() in saved
    y = found["y"]
    with torch.no_grad():  # nothing to save: no pre-activation, and linear_of_gelu is a plain Linear
        assert linear_gelu_with_preact(x, w1, b1)[1] is None
        torch.testing.assert_close(linear_of_gelu(y, None, w2, b2), F.linear(y, w2, b2))


def test_linear_of_gelu_autocast_follows_eager():
    # fp16 autocast (bf16 is wrong in the interpreter): the second Linear runs in fp16 like F.linear's, and the
    # gradients come back through the casts in fp32.
    x, w1, b1, _ = make_inputs((7,), 24, 40, torch.float32, seed=3)
    _, w2, b2, dy = make_inputs((7,), 40, 16, torch.float32, seed=4)
    inputs = (x, w1, b1, w2, b2)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out, grads = run(ffn_fused, inputs, dy.half())
        eager_out, eager_grads = run(ffn_eager, inputs, dy.half())
    assert out.dtype == torch.float16 == eager_out.dtype
    ref_out, ref_grads = run(ffn_eager, [t.half().double() for t in inputs], dy.half().double())
    assert_matches_reference(out, ref_out, eager_out, name="out")
    for name, g, rg, eg in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, ref_grads, eager_grads, strict=True):
        assert g.dtype == torch.float32 == eg.dtype, name
        err, eager_err = (g - rg).abs().max().item(), (eg - rg).abs().max().item()
        assert err <= 2 * eager_err + 2.0**-10 * max(1.0, rg.abs().max().item()), name


def test_linear_after_gelu_falls_back_when_y_changed_or_hooked():
    from fastbert import modules

    torch.manual_seed(0)
    ffn = modules.FusedFeedForward(16, 32).to(DEVICE)
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    y = ffn.intermediate(x)
    assert getattr(y, "_fastbert_preact", None) is not None
    y.mul_(2.0)  # changed in place after the pre-activation was taken: gelu(h) is no longer y
    out = modules.linear_after_gelu(ffn.output, y)
    (g,) = torch.autograd.grad(out.sum(), ffn.output.weight)
    torch.testing.assert_close(g, out.new_ones(out.shape).t() @ y.detach())
    calls = []
    ffn.output.register_forward_hook(lambda *a: calls.append(1))
    ffn(x).sum().backward()
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kn", [(768, 3072), (1024, 4096)], ids=["h768", "h1024"])
def test_bert_shapes_gpu(kn, dtype, approximate):
    check_against_reference(*make_inputs((16384,), *kn, dtype), approximate=approximate)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_gpu(tf32):
    x, w, b, dy = make_inputs((1000,), 768, 3072, torch.float32)
    if not tf32:
        with allow_tf32(False):
            check_against_reference(x, w, b, dy)
        return
    # TF32 rounds the inputs to 10 mantissa bits: the project's rule against eager cuBLAS under the same setting
    # (error vs float64 at most 2x eager's, plus a TF32 ulp at the output's scale).
    with allow_tf32(True):
        y = linear_gelu(x, w, b)
        ref = reference.linear_gelu(x.double(), w.double(), b.double())
        err, eager_err = max_err(y, ref), max_err(reference.linear_gelu(x, w, b), ref)
    assert err <= 2 * eager_err + 2.0**-10 * max(1.0, ref.abs().max().item()), (err, eager_err)


@pytest.mark.parametrize(
    "setting, tf32",
    [("", False), ("torch.backends.cuda.matmul.allow_tf32 = True", True),
     ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
     ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False), ("torch.backends.fp32_precision = 'tf32'", True),
     ("torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cuda.matmul.fp32_precision = 'tf32'", True)],
)  # fmt: skip
def test_fp32_follows_either_tf32_api(tmp_path, setting, tf32):
    """fp32 inputs use TF32 as F.linear does, set through the legacy flag or torch >= 2.9's fp32_precision (after
    which reading the legacy flag raises). A fresh process each: once mixed, the two APIs stay mixed."""
    if "fp32_precision" in setting and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    code = f"import torch; {setting}\nfrom fastbert.kernels.linear_gelu import tf32_matmul; print(tf32_matmul())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == str(tf32)


@pytest.mark.parametrize(
    "case", ["timed", "pinned", "fp32", "capturing-untuned", "capturing-tuned", "capturing-tuned-at-other-rows"]
)
def test_the_autotuner_runs_only_where_it_may_time(monkeypatch, case):
    """The forward's autotuner (which times its configs on a shape's first call) is passed by, for a config
    launched directly, where timing must not run: tuning pinned (Triton 3.6 times even one config), fp32 (one
    config), and a shape first met during CUDA-graph capture (timing synchronises; the capture would fail). There
    the graph takes the config the kernel last ran at the same features (loaded: loading one in a capture fails
    too), or the default. A shape tuned before capture keeps its tuned config in the graph."""
    from triton.runtime.autotuner import Autotuner

    from fastbert.kernels import common
    from fastbert.kernels import linear_gelu as lg

    calls, direct = [], []
    real = Autotuner.run
    spy = lambda self, *a, **kw: (calls.append(self.fn.__name__), real(self, *a, **kw))[1]
    monkeypatch.setattr(Autotuner, "run", spy)

    def direct_spy(kernel, grid, config, *args, **kwargs):
        direct.append(config)
        common.launch_untimed(kernel, grid, config, *args, **kwargs)

    monkeypatch.setattr(lg, "launch_untimed", direct_spy)
    for name in ("_TUNED", "_RAN", "_SM90_CHOICE"):
        monkeypatch.setattr(lg, name, type(getattr(lg, name))())
    monkeypatch.setenv(lg.SM90_ENV, "0")  # (on Hopper the choice between the two kernels times both)
    monkeypatch.delenv("FASTBERT_AUTOTUNE", raising=False)
    if case == "pinned":
        monkeypatch.setenv("FASTBERT_AUTOTUNE", "0")
    dtype = torch.float32 if case == "fp32" else torch.float16
    rows = 130 if case == "capturing-tuned-at-other-rows" else 7
    x, w, b, _ = make_inputs((rows,), 16, 32, dtype)
    if case.startswith("capturing-tuned"):
        linear_gelu(x[:7], w, b)  # an eager call tunes the features (at 7 rows)
        assert calls and not direct
    calls.clear()
    if case.startswith("capturing"):
        monkeypatch.setattr(lg, "_capturing", lambda t: True)
    y = linear_gelu(x, w, b)
    expected = reference.linear_gelu(x.double(), w.double(), b.double())
    assert_matches_reference(y, expected, reference.linear_gelu(x, w, b))
    assert calls == (["_linear_gelu_fwd_kernel"] if case in ("timed", "capturing-tuned") else []), calls
    if case == "capturing-tuned-at-other-rows":
        assert direct == [lg._linear_gelu_fwd_kernel.best_config]  # what the 7-row call ran
    elif not calls:
        assert len(direct) == 1 and direct[0] in lg._linear_gelu_fwd_kernel.configs


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs one config; on a GPU the autotuner may pick either")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m, n", [(7, 64), (40, 96)])
def test_epilogue_in_halves_matches_whole(m, n, dtype, approximate):
    """The wide-tile config's epilogue (bias + GELU + stores in two column halves) against the reference: the
    interpreter's own config uses the whole-tile epilogue, so this launches the kernel with each form directly."""
    import triton

    from fastbert.kernels import linear_gelu as lg

    x, w, b, _ = make_inputs((m,), 48, n, dtype)
    ref_h = x.double() @ w.double().t() + b.double()
    ref_y = F.gelu(ref_h, approximate=approximate)
    eager_h = F.linear(x, w, b)
    eager_y = F.gelu(eager_h, approximate=approximate)
    for halves in (False, True):
        y = torch.full((m, n), float("nan"), dtype=dtype)
        h = torch.full((m, n), float("nan"), dtype=dtype)
        grid = (triton.cdiv(m, 32) * triton.cdiv(n, 32),)
        lg._linear_gelu_fwd_kernel.fn[grid](
            x, w, b, y, h, m, n, 48, x.stride(0), w.stride(0), lg.m_bucket(m), BLOCK_M=32, BLOCK_N=32, BLOCK_K=32,
            GROUP_M=2, APPROX=lg._APPROX[approximate], STORE_PREACT=True, INPUT_PRECISION="ieee",
            EPILOGUE_HALVES=halves,
        )  # fmt: skip
        assert_matches_reference(y, ref_y, eager_y, name=f"y (halves={halves})")
        assert_matches_reference(h, ref_h, eager_h, name=f"h (halves={halves})")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(
    "m, kn, pinned",
    [(1, (24, 40), False), (7, (64, 48), True), (130, (16, 32), False)],
    ids=["m1", "m7-pinned", "m130"],
)
def test_sm90_forward_matches_reference(monkeypatch, m, kn, pinned, approximate):
    """The Hopper forward (TMA descriptors, persistent grid), forced on: in the interpreter here, on sm_90 GPUs
    there. Output and every gradient (the backward reads the pre-activation it stored). Pinned: the default config
    launched past the autotuner (its pre_hook sets the descriptors' block shapes)."""
    from fastbert.kernels import linear_gelu as lg

    if HAS_CUDA and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA kernel runs on sm_90 only")
    monkeypatch.setenv(lg.SM90_ENV, "1")
    if pinned:
        monkeypatch.setenv("FASTBERT_AUTOTUNE", "0")
    dtypes = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]
    for dtype in dtypes:
        check_against_reference(*make_inputs((m,), *kn, dtype), approximate=approximate)


def test_hopper_kernel_choice_is_timed_once_per_shape(monkeypatch):
    """On sm_90 the launcher times the TMA and the portable forward once per shape key and keeps the faster; it
    never times during CUDA-graph capture; FASTBERT_LINEAR_GELU_SM90 overrides. (The GPU side is mocked here.)"""
    from fastbert.kernels import linear_gelu as lg
    from fastbert.kernels import linear_gelu_sm90

    monkeypatch.delenv(lg.SM90_ENV, raising=False)
    monkeypatch.setattr(lg, "interpreting", lambda: False)
    monkeypatch.setattr(linear_gelu_sm90, "supported", lambda x: True)
    monkeypatch.setattr(lg, "_SM90_CHOICE", {})
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    timed = []
    monkeypatch.setattr(lg.triton.testing, "do_bench", lambda fn, **kw: (timed.append(fn), fn())[1])
    x = torch.zeros(4, 8)

    assert lg._use_sm90(x, "a", lambda: 1.0, lambda: 2.0) is True  # the TMA kernel is faster
    assert lg._use_sm90(x, "b", lambda: 3.0, lambda: 2.0) is False
    assert len(timed) == 4
    assert lg._use_sm90(x, "a", lambda: 9.0, lambda: 2.0) is True  # cached: not timed again
    assert len(timed) == 4
    capturing[0] = True
    assert lg._use_sm90(x, "c", lambda: 1.0, lambda: 2.0) is False  # no timing under capture ...
    assert "c" not in lg._SM90_CHOICE and len(timed) == 4  # ... and no decision recorded
    monkeypatch.setenv(lg.SM90_ENV, "0")
    assert lg._use_sm90(x, "a", lambda: 1.0, lambda: 2.0) is False


@pytest.mark.parametrize("how", ["env", "deterministic"])
def test_pinned_tuning_keeps_the_default_configs(monkeypatch, how):
    """FASTBERT_AUTOTUNE=0 or torch.use_deterministic_algorithms(True): the row key is 0, a key of its own, for
    which both autotuners keep their first config and the Hopper choice is the portable kernel, untimed."""
    from fastbert.kernels import linear_gelu as lg
    from fastbert.kernels import linear_gelu_sm90

    monkeypatch.delenv("FASTBERT_AUTOTUNE", raising=False)
    assert lg.m_bucket(300) == 512
    monkeypatch.setattr(lg, "interpreting", lambda: False)
    monkeypatch.setattr(linear_gelu_sm90, "supported", lambda x: True)
    monkeypatch.setattr(lg.triton.testing, "do_bench", lambda fn, **kw: pytest.fail("timed while pinned"))
    monkeypatch.delenv(lg.SM90_ENV, raising=False)
    x = torch.zeros(4, 8, dtype=torch.float16)
    configs = list(lg.HALF_CONFIGS + lg.FP32_CONFIGS)
    with monkeypatch.context() as m:
        if how == "env":
            m.setenv("FASTBERT_AUTOTUNE", "0")
        else:
            m.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        bucket = lg.m_bucket(300)
        assert bucket == 0
        assert lg._prune(configs, {"x_ptr": x, "M_BUCKET": bucket}) == [lg.HALF_CONFIGS[0]]
        assert linear_gelu_sm90._prune(list(linear_gelu_sm90.CONFIGS), {"M_BUCKET": bucket}) == [
            linear_gelu_sm90.CONFIGS[0]
        ]
        assert lg._use_sm90(x, (bucket, 8, 8), lambda: 1.0, lambda: 2.0) is False
    assert lg._prune(configs, {"x_ptr": x, "M_BUCKET": 512}) == list(lg.HALF_CONFIGS)
    assert len(linear_gelu_sm90._prune(list(linear_gelu_sm90.CONFIGS), {"M_BUCKET": 512})) > 1
