"""ops.add_layer_norm against the float64 reference: output and all four gradients, awkward shapes in the
interpreter (fp32, fp16), BERT shapes on GPU (fp16, bf16), dropout with the kernel's own keep-mask, bad input."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import DEVICE, HAS_CUDA, graph_replays
from fastbert import ops, reference
from fastbert.ops._common import draw_seed
from numerics import assert_matches_reference


def make_inputs(shape, dtype, param_dtype=None, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g).to(device, dtype)
    r = torch.randn(shape, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, param_dtype or dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(device, param_dtype or dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, r, w, b, dy


def run(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves]


def check_against_reference(x, r, w, b, dy, eps=1e-12, dropout_p=0.0, keep=None, seed=None):
    """Kernel vs float64 reference (and eager in the kernel's dtype, for the half-precision rule)."""
    if seed is not None:
        torch.manual_seed(seed)
    out, grads = run(lambda *t: ops.add_layer_norm(*t, eps, dropout_p=dropout_p), (x, r, w, b), dy)
    ref_out, ref_grads = run(
        lambda *t: reference.add_layer_norm(*t, eps, dropout_p=dropout_p, keep=keep),
        [t.double() for t in (x, r, w, b)], dy.double(),
    )  # fmt: skip
    eager_out, eager_grads = run(
        lambda *t: reference.add_layer_norm(*t, eps, dropout_p=dropout_p, keep=keep), (x, r, w, b), dy
    )
    assert out.dtype == r.dtype
    assert_matches_reference(out, ref_out, eager_out, name="y")
    for name, g, rg, eg in zip(("dx", "dresidual", "dweight", "dbias"), grads, ref_grads, eager_grads, strict=True):
        assert g.dtype == eg.dtype, name
        assert_matches_reference(g, rg, eg, name=name)


# Awkward shapes: one row, odd rows, hidden sizes that are not powers of two, leading dimensions, the widest rows,
# and rows of two elements (dx is exactly 0 there: float32 leaves ~1e-5 of cancellation, eager included; see
# numerics.py for how the rule treats it).
SHAPES = [(1, 16), (3, 384), (2, 3, 1000), (5, 768), (4, 1024), (7, 17), (2, 8192), (2, 7, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    check_against_reference(*make_inputs(shape, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_hidden_size_one_is_exact(dtype):
    # LayerNorm over one element: y = bias, dx = dresidual = dweight = 0 and dbias = sum(dy), all exactly. A GPU
    # gave dx = 0.014 in float32 while the backward fused dy * w - mean into one fma (see the backward kernel;
    # the interpreter never fuses, so only a GPU run tests that). Eager float16 gives NaN here (rstd = 1e6).
    x, r, w, b, dy = make_inputs((3, 1), dtype)
    out, (dx, dr, dw, db) = run(lambda *t: ops.add_layer_norm(*t), (x, r, w, b), dy)
    assert torch.equal(out, b.expand(3, 1))
    for name, g in (("dx", dx), ("dresidual", dr), ("dweight", dw)):
        assert torch.equal(g, torch.zeros_like(g)), (name, g)
    torch.testing.assert_close(db, dy.float().sum(0).to(dtype))


def test_half_activations_fp32_params():
    check_against_reference(*make_inputs((5, 96), torch.float16, param_dtype=torch.float32))


def test_non_contiguous_inputs():
    x, r, w, b, dy = make_inputs((6, 2, 160), torch.float32)
    # transposed views and a column slice: row strides that are not the row length
    xt = x.transpose(0, 1)
    rt = r.transpose(0, 1)
    assert not xt.is_contiguous()
    check_against_reference(xt, rt, w, b, dy.transpose(0, 1))
    wide = torch.randn(5, 300, device=DEVICE)
    check_against_reference(wide[:, :128], wide[:, 128:256], w[:128], b[:128], torch.randn(5, 128, device=DEVICE))


def test_strided_and_expanded_weight_and_bias():
    """weight and bias views that are not contiguous vectors (every other element; one value expanded): the
    kernel reads them as given, not as if contiguous."""
    x, r, w, b, dy = make_inputs((3, 96), torch.float32)
    check_against_reference(x, r, w.repeat_interleave(2)[::2], b.repeat_interleave(2)[::2], dy)
    out = ops.add_layer_norm(x, r, w[:1].expand(96), b[:1].expand(96))
    torch.testing.assert_close(out, reference.add_layer_norm(x, r, w[:1].expand(96), b[:1].expand(96)))


def test_eps_is_used():
    x, r, w, b, dy = make_inputs((4, 64), torch.float32)
    check_against_reference(x * 1e-3, r * 1e-3, w, b, dy, eps=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(3, 100), (65, 384)], ids=["3x100", "65x384"])
def test_dropout_matches_reference_with_kernel_mask(shape, dtype):
    from fastbert.kernels.add_layer_norm import dropout_keep_mask

    p = 0.3
    torch.manual_seed(1234)
    seed = int(draw_seed(DEVICE).item())
    keep = dropout_keep_mask(seed, shape[0], shape[1], p, DEVICE)
    check_against_reference(*make_inputs(shape, dtype), dropout_p=p, keep=keep, seed=1234)


def test_dropout_reproducible_and_keep_rate():
    from fastbert.kernels.add_layer_norm import dropout_keep_mask

    x, r, w, b, _ = make_inputs((64, 256), torch.float32)
    torch.manual_seed(7)
    y1 = ops.add_layer_norm(x, r, w, b, dropout_p=0.2)
    torch.manual_seed(7)
    y2 = ops.add_layer_norm(x, r, w, b, dropout_p=0.2)
    y3 = ops.add_layer_norm(x, r, w, b, dropout_p=0.2)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    keep = dropout_keep_mask(99, 64, 256, 0.2, DEVICE)
    n = keep.numel()
    rate = keep.float().mean().item()
    # keep ~ Binomial(n, 0.8): 5 standard deviations
    assert abs(rate - 0.8) < 5 * (0.8 * 0.2 / n) ** 0.5
    # independent across rows and columns: no two rows share a mask
    assert len({tuple(row.tolist()) for row in keep}) == keep.shape[0]


def test_dropout_wide_rows_fall_back_to_torch_dropout():
    x, r, w, b, _ = make_inputs((2, 8192), torch.float32)
    torch.manual_seed(3)
    y = ops.add_layer_norm(x, r, w, b, dropout_p=0.5)
    torch.manual_seed(3)
    expected = reference.add_layer_norm(x, r, w, b, dropout_p=0.5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, p", [((5, 64), 0.0), ((3, 100), 0.3), ((65, 384), 0.3), ((2, 8192), 0.0)],
                         ids=["5x64", "3x100-drop", "65x384-drop", "2x8192"])  # fmt: skip
def test_autocast_follows_pytorch_layer_norm(shape, p):
    # Under autocast a Linear hands a half x to an fp32 residual stream; eager computes the add and the
    # LayerNorm in fp32. fp16 autocast on CPU keeps the interpreter away from bf16. The training forward stores
    # s in fp32 and the backward reads it (unaligned rows, dropout and the widest rows included).
    from fastbert.kernels.add_layer_norm import dropout_keep_mask

    x, _, _, _, _ = make_inputs(shape, torch.float16)
    _, r, w, b, dy = make_inputs(shape, torch.float32, seed=1)
    keep = None
    if p:
        torch.manual_seed(1234)
        keep = dropout_keep_mask(int(draw_seed(DEVICE).item()), *shape, p, DEVICE)
        torch.manual_seed(1234)
    eager_fn = lambda *t: reference.add_layer_norm(*t, dropout_p=p, keep=keep)  # noqa: E731
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out, grads = run(lambda *t: ops.add_layer_norm(*t, dropout_p=p), (x, r, w, b), dy)
        eager_out, eager_grads = run(eager_fn, (x, r, w, b), dy)
    assert out.dtype == torch.float32 and eager_out.dtype == torch.float32
    ref_out, ref_grads = run(eager_fn, [t.double() for t in (x, r, w, b)], dy.double())
    assert_matches_reference(out, ref_out, name="y")
    assert grads[0].dtype == torch.float16
    for name, g, rg, eg in zip(("dx", "dresidual", "dweight", "dbias"), grads, ref_grads, eager_grads, strict=True):
        assert_matches_reference(g, rg, eg if g.dtype != torch.float32 else None, name=name)


def test_autocast_training_keeps_the_sum_not_x_and_residual():
    """Autocast's half x and fp32 residual: autograd keeps s (fp32, [M, N]) and neither input; with one dtype
    throughout it keeps x and residual (residual is the next Linear's saved input anyway) and stores no s."""
    x, _, _, _, _ = make_inputs((6, 64), torch.float16)
    _, r, w, b, _ = make_inputs((6, 64), torch.float32, seed=1)
    x, r = x.requires_grad_(), r.requires_grad_()

    def saved(fn):
        found = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append(t) or t, lambda t: t):
            fn()
        return [t for t in found if t.dim() == 2]

    with torch.autocast(DEVICE.type, dtype=torch.float16):
        (s,) = saved(lambda: ops.add_layer_norm(x, r, w, b, dropout_p=0.1))
    assert s.dtype == torch.float32 and s.shape == (6, 64)
    assert s.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in (x, r)}
    x32 = x.detach().float().requires_grad_()
    assert {t.untyped_storage().data_ptr() for t in saved(lambda: ops.add_layer_norm(x32, r, w, b))} == {
        x32.untyped_storage().data_ptr(), r.untyped_storage().data_ptr()}  # fmt: skip
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.float16):
        torch.testing.assert_close(ops.add_layer_norm(x, r, w, b), reference.add_layer_norm(x.float(), r, w, b))


def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, r, w, b, _ = make_inputs((3, 32), torch.float32, device="cpu")
    torch.testing.assert_close(ops.add_layer_norm(x, r, w, b), reference.add_layer_norm(x, r, w, b))


def test_zero_rows():
    x, r, w, b, dy = make_inputs((0, 64), torch.float32)
    assert ops.add_layer_norm(x, r, w, b).shape == (0, 64)
    out, grads = run(lambda *t: ops.add_layer_norm(*t), (x, r, w, b), dy)  # the backward too (it divided by 0)
    assert out.shape == (0, 64) and all((g == 0).all() for g in grads[2:]) and grads[0].shape == (0, 64)


@pytest.mark.parametrize(
    "case, message",
    [
        ("shape", "one shape"),
        ("weight", "weight and bias must have shape"),
        ("dtype", "one dtype"),
        ("param_dtype", "share a dtype"),
        ("int", "float16, bfloat16 or float32"),
        ("too_wide", "beyond add_layer_norm's limit"),
        ("zero_hidden", "must not be 0"),
        ("dropout", "dropout_p"),
        ("device", "one device"),
    ],
)
def test_bad_input_raises_value_error(case, message):
    x, r, w, b, _ = make_inputs((4, 32), torch.float32)
    kwargs = {}
    if case == "shape":
        r = r[:, :16]
    elif case == "weight":
        w = w[:16]
    elif case == "dtype":
        r = r.half()
    elif case == "param_dtype":
        x, r, b = x.half(), r.half(), b.half()
    elif case == "int":
        x = x.long()
    elif case == "too_wide":
        x, r, w, b, _ = make_inputs((1, 8200), torch.float32)
    elif case == "zero_hidden":
        x, r, w, b, _ = make_inputs((2, 0), torch.float32)
    elif case == "dropout":
        kwargs["dropout_p"] = 1.0
    elif case == "device":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA device beside the CPU")
        w = w.cpu()
    with pytest.raises(ValueError, match=message):
        ops.add_layer_norm(x, r, w, b, **kwargs)


def test_opcheck():
    x, r, w, b, _ = make_inputs((3, 48), torch.float32)
    x.requires_grad_()
    args = (x, r, w, b, 1e-12, 0.0, torch.zeros(1, dtype=torch.int64, device=DEVICE), False)
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_fwd.default, args)
    args = (x, r, w, b, 1e-12, 0.25, torch.tensor([5], dtype=torch.int64, device=DEVICE), False)
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_fwd.default, args)
    # autocast's mix: half x, fp32 residual, the sum stored for the backward
    five = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    args = (x.detach().half().requires_grad_(), r, w, b, 1e-12, 0.25, five, True)
    torch.library.opcheck(torch.ops.fastbert.add_layer_norm_fwd.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("hidden", [768, 1024])
def test_bert_shapes_gpu(hidden, dtype):
    check_against_reference(*make_inputs((16384, hidden), dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_bert_shapes_dropout_gpu(dtype):
    from fastbert.kernels.add_layer_norm import dropout_keep_mask

    torch.manual_seed(5)
    keep = dropout_keep_mask(int(draw_seed(DEVICE).item()), 16384, 768, 0.1, DEVICE)
    check_against_reference(*make_inputs((16384, 768), dtype), dropout_p=0.1, keep=keep, seed=5)


# Drawn at random, rows of two elements with dropout (exact gradients 0, float32 leaves cancellation) failed a
# clean-clone .ci/run once (2026-12-04): the rule's float32 fallback keys on eager missing the tight tolerance too,
# and eager's six such rows happened to round well (dx: kernel 1.2e-5, eager 2.4e-7). Over many such rows the
# kernel is the more accurate (test_two_element_rows_cancel_no_worse_than_eager), so this test leaves them out, and
# draws the same examples on every run (derandomize): a failure here repeats.
@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 9),
    hidden=st.integers(1, 300),
    lead=st.sampled_from([(), (2,)]),
    dropout=st.sampled_from([0.0, 0.5]),
)
def test_property_any_shape(rows, hidden, lead, dropout):
    """Random shapes (hidden sizes that are no power of two, down to 1), with and without dropout."""
    from fastbert.kernels.add_layer_norm import dropout_keep_mask

    assume(hidden != 2)  # (a handful of two-element rows is the rule's lottery; the population test covers them)

    shape = (*lead, rows, hidden)
    keep = None
    if dropout:
        torch.manual_seed(11)
        n_rows = rows * (lead[0] if lead else 1)
        keep = dropout_keep_mask(int(draw_seed(DEVICE).item()), n_rows, hidden, dropout, DEVICE).view(shape)
    check_against_reference(*make_inputs(shape, torch.float32), dropout_p=dropout, keep=keep, seed=11)


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["no-dropout", "dropout"])
def test_two_element_rows_cancel_no_worse_than_eager(dropout):
    """LayerNorm over two elements: dx and dresidual are exactly 0, and float32 leaves only cancellation, as large
    as rstd · |dy · w| · eps whatever computes it. A few rows make the project's rule a lottery (which one rounds
    worst); over 1000 rows the kernel's mean error must be at most eager float32's (measured here for seeds 0-5,
    with and without dropout: 0.001-0.74 of it; eager's worst rows, pairs of nearly equal values, err by up to
    ~10 over 4000 rows, the kernel's by 0.05-0.2)."""
    from fastbert.kernels.add_layer_norm import dropout_keep_mask

    shape, keep = (1000, 2), None
    if dropout:
        torch.manual_seed(3)
        keep = dropout_keep_mask(int(draw_seed(DEVICE).item()), *shape, dropout, DEVICE)
    x, r, w, b, dy = make_inputs(shape, torch.float32, seed=3)
    torch.manual_seed(3)
    out, grads = run(lambda *t: ops.add_layer_norm(*t, 1e-12, dropout_p=dropout), (x, r, w, b), dy)
    ref = lambda *t: reference.add_layer_norm(*t, 1e-12, dropout_p=dropout, keep=keep)  # noqa: E731
    ref_out, ref_grads = run(ref, [t.double() for t in (x, r, w, b)], dy.double())
    eager_out, eager_grads = run(ref, (x, r, w, b), dy)
    assert_matches_reference(out, ref_out, eager_out, name="y")
    names = ("dx", "dresidual", "dweight", "dbias")
    for name, g, rg, eg in zip(names, grads, ref_grads, eager_grads, strict=True):
        if name in ("dweight", "dbias"):  # (not cancellation-bound: the rule as everywhere)
            assert_matches_reference(g, rg, eg, name=name)
            continue
        assert torch.isfinite(g).all(), name
        err, eager_err = ((t.double() - rg).abs().mean().item() for t in (g, eg))
        assert err <= eager_err, f"{name}: mean error {err:.3g} > eager float32's {eager_err:.3g}"


def test_dropout_seed_is_a_device_tensor_from_torch_generator():
    """Every op with dropout draws its seed with draw_seed: an int64 [1] tensor on the op's device (the kernels
    read it there, so a CUDA graph replays with a fresh one), a value in [2^62, 2^63) (philox_seed leaves
    it as it is, so the keep-mask helpers reproduce the kernels' draws from its value), reproducible with
    torch.manual_seed."""
    from fastbert.kernels.common import philox_seed
    from fastbert.ops import _common

    torch.manual_seed(7)
    a, b = _common.draw_seed(DEVICE), _common.draw_seed(DEVICE)
    torch.manual_seed(7)
    assert torch.equal(_common.draw_seed(DEVICE), a)
    assert a.dtype == torch.int64 and a.shape == (1,) and a.device.type == DEVICE.type
    assert int(a.item()) != int(b.item())
    for seed in (a, b):
        assert 2**62 <= int(seed.item()) < 2**63 and philox_seed(int(seed.item())) == int(seed.item())


def test_dropout_reads_the_seed_tensor_at_launch(monkeypatch):
    """The forward and the backward read the seed from the seed tensor itself (what a CUDA graph's replay relies
    on): a seed tensor holding another value gives that value's keep-mask."""
    from fastbert.kernels.add_layer_norm import dropout_keep_mask

    shape, p = (8, 64), 0.3
    seed = torch.tensor([2**62 + 12345], dtype=torch.int64, device=DEVICE)
    monkeypatch.setattr("fastbert.ops._add_layer_norm.draw_seed", lambda device: seed)
    keep = dropout_keep_mask(int(seed.item()), *shape, p, DEVICE)
    check_against_reference(*make_inputs(shape, torch.float32), dropout_p=p, keep=keep)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_dropout_in_a_cuda_graph_draws_anew_on_each_replay_gpu(monkeypatch):
    """add_layer_norm with dropout captured in a CUDA graph: each replay draws a new seed on the device (different
    elements dropped) and its result and gradients match the reference with that replay's keep-mask."""
    from fastbert.kernels.add_layer_norm import dropout_keep_mask
    from fastbert.ops import _add_layer_norm as mod

    shape, p = (64, 768), 0.1
    x, r, w, b, dy = make_inputs(shape, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]

    def step():
        y = ops.add_layer_norm(*leaves, dropout_p=p)
        return y, torch.autograd.grad(y, leaves, dy)

    drawn = []
    for (y, grads), seed in graph_replays(monkeypatch, mod, step):
        drawn.append(seed)
        keep = dropout_keep_mask(seed, *shape, p, DEVICE)
        ref_y, ref_grads = run(lambda *t, keep=keep: reference.add_layer_norm(*t, dropout_p=p, keep=keep),
                               [t.double() for t in (x, r, w, b)], dy.double())  # fmt: skip
        assert_matches_reference(y, ref_y, name="y")
        for name, g, rg in zip(("dx", "dresidual", "dweight", "dbias"), grads, ref_grads, strict=True):
            assert_matches_reference(g, rg, name=name)
    assert len(drawn) == 2 and drawn[0] != drawn[1]
