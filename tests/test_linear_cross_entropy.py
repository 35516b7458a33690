"""ops.linear_cross_entropy (the masked-LM decoder + loss) against the float64 reference: logits, loss and the
gradients of x, weight and bias, in the interpreter (fp32, fp16; one row to several hundred, vocabularies of one
word, odd sizes and more than one 4096-column block), with ignored rows, nothing labelled, out-of-range labels,
logits used beside the loss, autocast, what autograd keeps, bad input, and BERT's shapes on GPU."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA
from fastbert import reference
from fastbert.ops import linear_cross_entropy
from numerics import assert_matches_reference


def make_inputs(rows, hidden, vocab, dtype, *, bias=True, ignore_every=3, seed=0, device=DEVICE):
    """x [*rows, hidden] of order 1, weight / bias scaled like BERT's decoder (logits of order a few), labels with
    every ``ignore_every``-th one from the second on ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    rows = (rows,) if isinstance(rows, int) else tuple(rows)
    x = torch.randn((*rows, hidden), generator=g).to(device, dtype)
    w = (2 * torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype)
    b = (0.5 * torch.randn(vocab, generator=g)).to(device, dtype) if bias else None
    labels = torch.randint(0, vocab, rows, generator=g)
    if ignore_every:
        labels.view(-1)[1::ignore_every] = -100  # row 0 stays labelled
    return x, w, b, labels.to(device)


def run(fn, x, w, b, labels, logits_weight=0.0):
    """(logits, loss, [dx, dweight, dbias]) of fn, the gradient of loss + logits_weight * sum(logits²)/n."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    logits, loss = fn(leaves[0], leaves[1], leaves[2], labels)
    total = loss.float() if logits_weight == 0 else loss.float() + logits_weight * logits.float().square().mean()
    total.backward()
    return logits.detach(), loss.detach(), [None if t is None else t.grad for t in leaves]


def check_against_reference(x, w, b, labels, logits_weight=0.0):
    """Kernel vs float64 reference (and eager in the kernel's dtype, for the half-precision rule)."""
    out = run(linear_cross_entropy, x, w, b, labels, logits_weight)
    ref = run(reference.linear_cross_entropy, *[None if t is None else t.double() for t in (x, w, b)], labels,
              logits_weight)  # fmt: skip
    eager = run(reference.linear_cross_entropy, x, w, b, labels, logits_weight)
    assert out[0].dtype == x.dtype and out[1].dtype == x.dtype and out[1].dim() == 0
    assert_matches_reference(out[0], ref[0], eager[0], name="logits")
    assert_matches_reference(out[1], ref[1], eager[1], name="loss")
    for name, g, rg, eg in zip(("dx", "dweight", "dbias"), out[2], ref[2], eager[2], strict=True):
        if rg is None:
            assert g is None, name
            continue
        assert g.dtype == eg.dtype and g.shape == eg.shape, name
        assert_matches_reference(g, rg, eg, name=name)
    return out


# (hidden, vocab): vocabularies of one word, below, at and past a multiple of 64, and past one 4096-wide block
# (the online softmax then rescales across blocks). BERT's real 30522 runs on the GPU.
SIZES = [(8, 1), (16, 100), (32, 64), (24, 4100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("hv", SIZES, ids=lambda hv: f"h{hv[0]}-v{hv[1]}")
@pytest.mark.parametrize("rows", [1, 7, 130], ids=lambda m: f"m{m}")
def test_matches_reference(rows, hv, dtype):
    check_against_reference(*make_inputs(rows, *hv, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_without_bias_and_3d_input(dtype):
    check_against_reference(*make_inputs((2, 5), 16, 100, dtype, bias=False))
    check_against_reference(*make_inputs((3, 4), 16, 70, dtype, ignore_every=0))


def test_logits_padded_view():
    """The logits are F.linear's values in a row stride padded to a multiple of 64, and view(-1, vocab) works."""
    x, w, b, labels = make_inputs((2, 3), 16, 100, torch.float32)
    logits, _ = linear_cross_entropy(x, w, b, labels)
    assert logits.shape == (2, 3, 100) and logits.stride() == (3 * 128, 128, 1)
    assert logits.view(-1, 100).shape == (6, 100)


def test_online_softmax_across_blocks():
    """The kernels over many column blocks (32 wide here, 7 blocks and a partial one), with the largest logit of
    each row in a different block: lse and the gradient must match float64."""
    from fastbert.kernels import linear_cross_entropy as k

    rows, v = 9, 230
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(rows, 256, generator=g).to(DEVICE) * 3
    for r in range(rows):
        logits[r, (r * 29) % v] += 20.0  # a dominant logit, block by block
    labels = torch.randint(0, v, (rows,), generator=g).to(DEVICE)
    labels[2] = -100
    loss, lse, inv_count = k.cross_entropy_fwd(logits, v, labels, -100, block_v=32)
    ref = logits[:, :v].double().requires_grad_()
    ref_loss = F.cross_entropy(ref, labels)
    ref_loss.backward()
    torch.testing.assert_close(lse.double(), torch.logsumexp(ref.detach(), 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-6, atol=1e-6)
    d = k.cross_entropy_bwd(torch.ones(1, device=DEVICE), logits, v, labels, lse, inv_count, -100, block_v=32)
    torch.testing.assert_close(d[:, :v].double(), ref.grad, rtol=1e-5, atol=1e-7)
    assert (d[:, v:] == 0).all() and (d[2] == 0).all()
    # the compact form (the backward's GEMMs then run over the labelled rows alone): those rows, in that order
    rows = torch.tensor([5, 0, 8, 3], device=DEVICE)
    compact = k.cross_entropy_bwd(torch.ones(1, device=DEVICE), logits, v, labels, lse, inv_count, -100, rows,
                                  block_v=32)  # fmt: skip
    assert torch.equal(compact, d[rows])


def test_large_logits_stay_finite():
    x, w, b, labels = make_inputs(7, 16, 100, torch.float32)
    check_against_reference(x * 30, w, b, labels)  # logits in the hundreds: exp would overflow without the max


def test_logits_used_beside_the_loss():
    """A second loss on the logits (distillation, a regulariser) sends a gradient into them too."""
    check_against_reference(*make_inputs(7, 16, 100, torch.float32), logits_weight=0.5)
    x, w, b, labels = make_inputs(5, 16, 70, torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    logits, _ = linear_cross_entropy(*leaves, labels)
    logits.sum().backward()  # only the logits: the loss brings no gradient
    torch.testing.assert_close(leaves[0].grad, w.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaves[2].grad, torch.full_like(b, 5.0), rtol=0, atol=0)


def test_nothing_labelled_gives_nan_loss_and_zero_gradients():
    """As PyTorch: the mean over no labelled row is 0 / 0 = NaN, and the gradients are zero."""
    x, w, b, labels = make_inputs(6, 16, 100, torch.float32)
    labels = torch.full_like(labels, -100)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    _, loss = linear_cross_entropy(*leaves, labels)
    assert torch.isnan(loss)
    loss.backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)


@pytest.mark.parametrize("bad", [100, -1, -7])
def test_label_out_of_range_gives_nan(bad):
    """A label outside [0, vocab) other than ignore_index: PyTorch raises; the kernels make the loss and the
    gradients NaN rather than a silent wrong answer (a host check would cost a device sync)."""
    x, w, b, labels = make_inputs(6, 16, 100, torch.float32)
    labels[1] = bad
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    _, loss = linear_cross_entropy(*leaves, labels)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(leaves[0].grad[1]).all() and torch.isfinite(leaves[0].grad[0]).all()


def test_loss_can_be_scaled_in_place():
    """Trainer divides the loss in place (gradient accumulation): the op's loss must be its own tensor, not a
    view of one of its outputs (autograd refuses in-place ops on those)."""
    x, w, b, labels = make_inputs(7, 16, 100, torch.float32)
    grads = []
    for scale in (1.0, 0.25):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        _, loss = linear_cross_entropy(*leaves, labels)
        loss.mul_(scale)
        loss.backward()
        grads.append(leaves[1].grad)
    torch.testing.assert_close(grads[1], 0.25 * grads[0], rtol=1e-6, atol=1e-9)


def test_custom_ignore_index():
    x, w, b, labels = make_inputs(8, 16, 100, torch.float32, ignore_every=0)
    labels[::2] = 3  # "ignore class 3"
    out = run(lambda *a: linear_cross_entropy(*a, ignore_index=3), x, w, b, labels)
    ref = run(lambda *a: reference.linear_cross_entropy(*a, ignore_index=3), x.double(), w.double(), b.double(),
              labels)  # fmt: skip
    torch.testing.assert_close(out[1].double(), ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2][1].double(), ref[2][1], rtol=1e-5, atol=1e-6)


def test_deterministic():
    x, w, b, labels = make_inputs(130, 16, 100, torch.float32)
    a, b_ = (run(linear_cross_entropy, x, w, b, labels) for _ in range(2))
    assert torch.equal(a[1], b_[1]) and all(torch.equal(g, h) for g, h in zip(a[2], b_[2], strict=True))


def test_autocast():
    """Under autocast, as eager autocast computes the decoder and CrossEntropyLoss: logits in the autocast dtype,
    the loss in fp32 from them, fp32 gradients for the fp32 parameters. (fp16: the interpreter cannot compute
    bf16.)"""
    x, w, b, labels = make_inputs(7, 16, 100, torch.float32)

    def eager(x, w, b, labels):  # what CUDA autocast does for F.linear then F.cross_entropy
        logits = F.linear(x.half(), w.half(), b.half())
        return logits, F.cross_entropy(logits.float(), labels)

    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out = run(linear_cross_entropy, x, w, b, labels)
    ref = run(reference.linear_cross_entropy, x.double(), w.double(), b.double(), labels)
    eag = run(eager, x, w, b, labels)
    assert out[0].dtype == torch.float16 and out[1].dtype == torch.float32
    assert_matches_reference(out[0], ref[0], eag[0], name="logits")
    assert_matches_reference(out[1], ref[1], eag[1], name="loss")
    for name, g, rg, eg in zip(("dx", "dweight", "dbias"), out[2], ref[2], eag[2], strict=True):
        assert g.dtype == torch.float32, name
        assert_matches_reference(g, rg, eg, name=name)


def test_keeps_no_vocab_sized_float32_tensor():
    """What autograd keeps: x, the parameters, the labels, the logits (in their own dtype) and one fp32 value per
    row; eager autocast keeps an fp32 log-softmax of [rows, vocab] instead."""
    rows, vocab = 40, 300
    x, w, b, labels = make_inputs(rows, 16, vocab, torch.float32)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(DEVICE.type, torch.float16):
        linear_cross_entropy(x, w, b, labels)
    big_fp32 = [n for dt, n in saved.values() if dt == torch.float32 and n >= rows * vocab * 4]
    assert not big_fp32, saved
    logits_bytes = rows * 320 * 2  # fp16, padded row stride
    assert sum(n for _, n in saved.values()) <= x.nbytes // 2 + w.nbytes + labels.nbytes + logits_bytes + 4 * rows + 4


def test_strided_and_int32_labels(monkeypatch):
    """Labels as a strided view (a column of a batch) and as int32, on the kernel path and the eager one."""
    x, w, b, labels = make_inputs(6, 16, 70, torch.float32)
    column = torch.stack([labels, torch.zeros_like(labels)], dim=1)[:, 0]  # stride 2
    assert not column.is_contiguous()
    check_against_reference(x, w, b, column)
    expected = reference.linear_cross_entropy(x, w, b, labels)[1]
    torch.testing.assert_close(linear_cross_entropy(x, w, b, labels.int())[1], expected)
    torch.testing.assert_close(linear_cross_entropy(x, w, b, column.int())[1], expected)
    import fastbert.ops._linear_cross_entropy as mod

    monkeypatch.setattr(mod, "use_triton", lambda t: False)  # the eager path (F.cross_entropy wants int64)
    torch.testing.assert_close(linear_cross_entropy(x, w, b, column.int())[1], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_eager_fallback_under_autocast_takes_the_loss_in_float32(monkeypatch, dtype):
    """The CPU fallback under autocast does what eager autocast does: logits from the half GEMM, the
    cross-entropy (an fp32 op under autocast) of their fp32 copy, not of the half logits (which gave the loss to
    bf16's 3 significant digits)."""
    import fastbert.ops._linear_cross_entropy as mod

    monkeypatch.setattr(mod, "use_triton", lambda t: False)
    x, w, b, labels = make_inputs(64, 16, 100, torch.float32)
    x = x * 3  # logits of order ten: their half rounding moves a half-precision loss by ~1e-2
    with torch.autocast("cpu", dtype=dtype):
        logits, loss = linear_cross_entropy(x, w, b, labels)
        eager_logits = F.linear(x, w, b)
        eager_loss = F.cross_entropy(eager_logits, labels)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)


def test_bad_input_raises():
    x, w, b, labels = make_inputs(4, 16, 100, torch.float32)
    with pytest.raises(ValueError, match="hidden size"):
        linear_cross_entropy(x[:, :8], w, b, labels)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_cross_entropy(x, w, b[:50], labels)
    with pytest.raises(ValueError, match="integers"):
        linear_cross_entropy(x, w, b, labels.float())
    with pytest.raises(ValueError, match="one class index per row"):
        linear_cross_entropy(x, w, b, labels[:3])
    with pytest.raises(ValueError, match="one dtype"):
        linear_cross_entropy(x.half(), w, b, labels)
    with pytest.raises(ValueError, match="2-D"):
        linear_cross_entropy(x, w[None], b, labels)
    with pytest.raises(ValueError, match="one device"):
        linear_cross_entropy(x, w, b, labels.to("meta"))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        linear_cross_entropy(x.double(), w.double(), b.double(), labels)
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        linear_cross_entropy(x, w, b, labels, ignore_index=-100.5)


def test_custom_op_opcheck():
    """The torch.library custom ops (what torch.compile sees): schema, fake tensors and autograd registration."""
    x, w, b, labels = make_inputs(5, 16, 100, torch.float32)
    args = (x, w.requires_grad_(), b.requires_grad_(), labels, -100)
    torch.library.opcheck(torch.ops.fastbert.linear_cross_entropy_fwd.default, args)
    labels = torch.where(labels < 0, 7, labels)  # ignore_index 7: those rows, and no bias
    torch.library.opcheck(torch.ops.fastbert.linear_cross_entropy_fwd.default, (x, w, None, labels, 7))


def test_torch_compile():
    x, w, b, labels = make_inputs(7, 16, 100, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    out = run(compiled, x, w, b, labels)
    ref = run(linear_cross_entropy, x, w, b, labels)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=1e-6)
    for g, h in zip(out[2], ref[2], strict=True):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("vocab", [30522, 250002], ids=["bert", "xlmr"])
@pytest.mark.parametrize("labelled", [1.0, 0.15], ids=["all-labelled", "mlm-15pct"])
def test_gpu_bert_shapes(dtype, vocab, labelled):
    """BERT's masked-LM head (768 hidden) over 2048 tokens (XLM-R's vocabulary: 256), every token labelled (the
    full backward) or 15% as in masked-LM batches (the labelled rows' GEMMs alone)."""
    x, w, b, labels = make_inputs(2048 if vocab < 100000 else 256, 768, vocab, dtype, ignore_every=0)
    labels[torch.rand(labels.shape, device=DEVICE) >= labelled] = -100
    check_against_reference(x, w, b, labels)
