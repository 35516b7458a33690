"""ops.attention / ops.attention_varlen against the float64 reference: output and dq, dk, dv, awkward shapes and
masks in the interpreter (fp32, fp16), BERT shapes on GPU (fp16, bf16), padded == varlen, dropout with the
kernel's own keep-mask, bad input."""

import numpy as np
import pytest
import torch

from conftest import DEVICE, HAS_CUDA, graph_replays
from fastbert import reference
from fastbert.ops import attention, attention_varlen, pad, unpad
from fastbert.ops._common import draw_seed
from numerics import assert_matches_reference


def make_inputs(b, h, sq, d, dtype, sk=None, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    sk = sq if sk is None else sk
    q = torch.randn(b, h, sq, d, generator=g).to(device, dtype)
    k = torch.randn(b, h, sk, d, generator=g).to(device, dtype)
    v = torch.randn(b, h, sk, d, generator=g).to(device, dtype)
    do = torch.randn(b, h, sq, d, generator=g).to(device, dtype)
    return q, k, v, do


def random_mask(b, s, seed=0, lengths=None):
    """Right-padding mask with random lengths in [1, s] (or the given ones)."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, s + 1, (b,), generator=g).tolist()
    mask = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]
    return mask.to(DEVICE)


def run(fn, inputs, do):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(do)
    return out.detach(), [t.grad for t in leaves]


def check_against_reference(q, k, v, do, mask=None, dropout_p=0.0, keep=None, seed=None, scale=None):
    if seed is not None:
        torch.manual_seed(seed)
    out, grads = run(lambda *t: attention(*t, mask, dropout_p=dropout_p, scale=scale), (q, k, v), do)
    ref = lambda *t: reference.attention(*t, mask, dropout_p=dropout_p, keep=keep, scale=scale)  # noqa: E731
    ref_out, ref_grads = run(ref, [t.double() for t in (q, k, v)], do.double())
    eager_out, eager_grads = run(ref, (q, k, v), do)
    assert out.dtype == q.dtype
    assert_matches_reference(out, ref_out, eager_out, name="out")
    for name, g, rg, eg in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads, strict=True):
        assert g.dtype == eg.dtype, name
        assert_matches_reference(g, rg, eg, name=name)
    return out, grads


SHAPES = [(1, 1, 1, 32), (2, 2, 17, 32), (1, 2, 64, 64), (3, 1, 100, 32), (1, 1, 33, 80)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}s{}d{}".format(*s))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_reference(shape, dtype, masked):
    b, h, s, d = shape
    mask = random_mask(b, s, seed=s) if masked else None
    check_against_reference(*make_inputs(*shape, dtype), mask=mask)


@pytest.mark.parametrize("scale", [0.3, -0.2, 0.0])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_custom_scale(scale, masked):
    # The kernels treat whole unmasked key blocks apart from the masked / partial ones (the row max is taken
    # before scaling there, which needs the sign handled): 70 keys = two whole interpreter blocks and a tail.
    # Scores spanning hundreds, so that a max taken on the wrong side of a negative scale overflows 2^x; fp16 (the
    # 2x-eager rule): fp32's tight tolerance is below what such logits leave of any fp32 computation, eager's too.
    q, k, v, do = make_inputs(2, 1, 70, 32, torch.float16)
    q = q * 30
    mask = random_mask(2, 70, lengths=[70, 41]) if masked else None
    check_against_reference(q, k, v, do, mask=mask, scale=scale)


def test_cross_lengths_and_mask_patterns():
    # seq_q != seq_k, a full row, a length-1 row and a mask with holes (not right padding)
    q, k, v, do = make_inputs(3, 2, 17, 32, torch.float32, sk=40)
    mask = random_mask(3, 40, lengths=[40, 1, 40])
    mask[2, ::3] = False
    check_against_reference(q, k, v, do, mask=mask)


@pytest.mark.parametrize("prefix", [0, 1, 31, 32, 33, 64, 70, 100])
def test_mask_with_an_attended_prefix_then_holes(prefix):
    """The kernels run the key blocks inside a mask row's attended prefix (key_bias() counts it) without the bias,
    and the rest with it: prefixes ending before, on and after the interpreter's 32-key block boundaries, then
    holes (masked keys among attended ones), against the reference; also the count itself."""
    from fastbert.kernels.attention import key_bias

    b, h, s, d = 2, 2, 100, 32
    g = torch.Generator().manual_seed(prefix)
    mask = torch.ones(b, s, dtype=torch.bool)
    if prefix < s:
        mask[:, prefix] = False
        mask[:, prefix + 1 :] = torch.rand(b, s - prefix - 1, generator=g) < 0.6
    mask[1] = True  # a full row beside it
    mask = mask.to(DEVICE)
    assert key_bias(mask, s)[:, -1].tolist() == [float(prefix), float(s)]
    check_against_reference(*make_inputs(b, h, s, d, torch.float32, seed=prefix), mask=mask)


def test_shared_key_bias_is_made_once_per_mask_within_its_context(monkeypatch):
    """Inside shared_key_bias (one model forward), calls given the same unchanged mask object share one key bias;
    a mask modified in place, another mask object, or a call outside the context makes its own."""
    from fastbert.kernels import attention as kernels
    from fastbert.ops._attention import shared_key_bias

    made = []
    real = kernels.key_bias
    monkeypatch.setattr(kernels, "key_bias", lambda mask, seq_k: made.append(seq_k) or real(mask, seq_k))
    q, k, v, _ = make_inputs(2, 2, 17, 32, torch.float32)
    mask = random_mask(2, 17, lengths=[17, 9])
    expected = attention(q, k, v, mask)
    assert len(made) == 1
    with shared_key_bias():
        for _ in range(3):
            torch.testing.assert_close(attention(q, k, v, mask), expected, rtol=0, atol=0)
        assert len(made) == 2
        mask[1, 5:] = False  # in place: the version changes, so the bias is made anew
        changed = attention(q, k, v, mask)
        assert len(made) == 3
        torch.testing.assert_close(changed, reference.attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
        attention(q, k, v, mask.clone())  # another object
        assert len(made) == 4
    attention(q, k, v, mask)
    assert len(made) == 5


def test_fully_masked_row_gives_zeros_and_zero_grads():
    q, k, v, do = make_inputs(2, 2, 17, 32, torch.float32)
    mask = random_mask(2, 17, lengths=[5, 17])
    mask[0] = False
    out, grads = check_against_reference(q, k, v, do, mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for g in grads:
        assert torch.equal(g[0], torch.zeros_like(g[0]))
    # int 0/1 masks work the same as bool
    out_int = attention(q, k, v, mask.to(torch.int64))
    torch.testing.assert_close(out_int, out)


def test_non_contiguous_inputs():
    # transformers hands [B, S, H, D] projections transposed to [B, H, S, D]
    b, h, s, d = 2, 2, 33, 32
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(b, s, h, d, generator=g).to(DEVICE).transpose(1, 2) for _ in range(4))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, do, mask=random_mask(b, s, seed=1))


def test_output_layout_makes_merge_free():
    q, k, v, _ = make_inputs(2, 2, 17, 32, torch.float32)
    out = attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    assert out.transpose(1, 2).reshape(2, 17, 64).data_ptr() == out.data_ptr()
    # the gradients of transformers' [B, H, S, D] views of [B, S, H, D] storage have that layout too (back
    # through its transpose and view without copies); those of contiguous inputs are contiguous
    for views in (True, False):
        qkv = [(t.transpose(1, 2).contiguous().transpose(1, 2) if views else t).requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(attention(*qkv, random_mask(2, 17, seed=2)).sum(), qkv)
        assert all((g.transpose(1, 2) if views else g).is_contiguous() for g in grads), views


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_padded_with_mask_equals_varlen(dtype):
    b, h, s, d = 3, 2, 40, 32
    q, k, v, do = make_inputs(b, h, s, d, dtype)
    mask = random_mask(b, s, lengths=[40, 1, 23])
    real = mask[:, None, :, None]
    do = do * real  # padded queries attend too: their gradient must not reach the real keys
    out, grads = run(lambda *t: attention(*t, mask), (q, k, v), do)

    def varlen(q, k, v):
        packed = [unpad(t.transpose(1, 2), mask) for t in (q, k, v)]
        (qp, idx, cu, mx), (kp, *_), (vp, *_) = packed
        return pad(attention_varlen(qp, kp, vp, cu, mx), idx, b, s).transpose(1, 2)

    vout, vgrads = run(varlen, (q, k, v), do)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(vout * real, out * real, **tol)
    for g, vg in zip(grads, vgrads, strict=True):
        torch.testing.assert_close(vg * real, g * real, **tol)


def test_varlen_reads_a_strided_cu_seqlens():
    """cu_seqlens as a strided view: read by value, not as if contiguous."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(30, 2, 32, generator=g).to(DEVICE) for _ in range(3))
    cu = torch.tensor([0, 99, 11, 99, 30, 99], dtype=torch.int32, device=DEVICE)[::2]
    assert not cu.is_contiguous()
    expected = attention_varlen(q, k, v, cu.contiguous(), 19)
    torch.testing.assert_close(attention_varlen(q, k, v, cu, 19), expected)
    torch.testing.assert_close(attention_varlen(q, k, v, cu, 19, validate=False), expected)


def test_unpad_and_pad_refuse_what_they_would_misread():
    hidden = torch.randn(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="bool or integer"):  # an additive mask (0 = attend) would be inverted
        unpad(hidden, torch.tensor([[0.0, 0.0, -1e4, -1e4]], device=DEVICE))
    with pytest.raises(ValueError, match="must be tensors"):
        unpad(hidden, [[1, 1, 0, 0]])
    packed, indices, _, _ = unpad(hidden, torch.tensor([[1, 1, 0, 0]], device=DEVICE))
    with pytest.raises(ValueError, match="one index a row"):
        pad(packed, indices[:1], 1, 4)
    with pytest.raises(ValueError, match="one index a row"):
        pad(packed, indices, 1, 1)
    with pytest.raises(ValueError, match="1-D integer"):
        pad(packed, indices.float(), 1, 4)


def test_eager_varlen_is_contiguous_and_differentiable_without_tokens(monkeypatch):
    """The eager path (CPU without the interpreter) returns what the kernel path does: a contiguous result, and one
    that autograd connects to q, k, v even when there is no token."""
    from fastbert.ops import _attention as mod

    monkeypatch.setattr(mod, "use_triton", lambda t: False)
    q = torch.randn(2, 10, 32, device=DEVICE).transpose(0, 1)  # [10 tokens, 2 heads, 32], not contiguous
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    assert attention_varlen(q, q, q, cu, 6).is_contiguous()
    empty = torch.randn(0, 2, 32, device=DEVICE, requires_grad=True)
    out = attention_varlen(empty, empty, empty, torch.zeros(2, dtype=torch.int32, device=DEVICE), 0)
    assert out.shape == (0, 2, 32) and out.requires_grad


def test_reference_propagates_nan_like_the_kernel():
    """The eager reference zeros only the rows whose keys are all masked: a NaN input gives NaN, as in the kernel
    (and SDPA), so the CPU fallback does not hide it."""
    q, k, v, _ = make_inputs(1, 1, 4, 32, torch.float32)
    q[0, 0, 1, 0] = float("nan")
    assert torch.isnan(reference.attention(q, k, v)[0, 0, 1]).all()
    assert torch.isnan(attention(q, k, v)[0, 0, 1]).all()
    mask = torch.tensor([[0, 0, 0, 0]], device=DEVICE)
    assert (reference.attention(q.nan_to_num(), k, v, mask) == 0).all()


def test_varlen_matches_reference():
    lengths = [5, 1, 37, 0, 16]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    total = sum(lengths)
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(total, 2, 32, generator=g).to(DEVICE) for _ in range(4))
    out, grads = run(lambda *t: attention_varlen(*t, cu, max(lengths)), (q, k, v), do)
    ref_out, ref_grads = run(lambda *t: reference.attention_varlen(*t, cu, max(lengths)),
                             [t.double() for t in (q, k, v)], do.double())  # fmt: skip
    assert_matches_reference(out, ref_out, name="out")
    for name, gr, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_matches_reference(gr, rg, name=name)


def test_unpad_pad_round_trip():
    hidden = torch.randn(3, 7, 4, device=DEVICE, requires_grad=True)
    mask = random_mask(3, 7, lengths=[7, 2, 5])
    mask[2, 0] = False  # left padding too
    packed, idx, cu, mx = unpad(hidden, mask)
    assert packed.shape == (13, 4) and cu.tolist() == [0, 7, 9, 13] and mx == 7 and cu.dtype == torch.int32
    back = pad(packed, idx, 3, 7)
    torch.testing.assert_close(back, hidden * mask[..., None])
    back.sum().backward()
    torch.testing.assert_close(hidden.grad, mask[..., None].float().expand(3, 7, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_dropout_matches_reference_with_kernel_mask(dtype, masked):
    from fastbert.kernels.attention_dropout import dropout_keep_mask

    b, h, s, d, p = 2, 2, 37, 32, 0.3
    torch.manual_seed(1234)
    seed = int(draw_seed(DEVICE).item())
    keep = dropout_keep_mask(seed, b, h, s, s, p, DEVICE)
    mask = random_mask(b, s, seed=2) if masked else None
    check_against_reference(*make_inputs(b, h, s, d, dtype), mask=mask, dropout_p=p, keep=keep, seed=1234)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_dropout_in_a_cuda_graph_draws_anew_on_each_replay_gpu(monkeypatch, masked):
    """Attention with dropout (forward and backward) captured in a CUDA graph: each replay draws a new seed on the
    device and its result and gradients match the reference with that replay's keep-mask."""
    from fastbert.kernels.attention_dropout import dropout_keep_mask
    from fastbert.ops import _attention as mod

    b, h, s, d, p = 2, 4, 200, 64, 0.2
    q, k, v, do = make_inputs(b, h, s, d, torch.float16)
    mask = random_mask(b, s, seed=3) if masked else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step():
        out = attention(*leaves, mask, dropout_p=p)
        return out, torch.autograd.grad(out, leaves, do)

    drawn = []
    for (out, grads), seed in graph_replays(monkeypatch, mod, step):
        drawn.append(seed)
        keep = dropout_keep_mask(seed, b, h, s, s, p, DEVICE)
        ref = lambda *t, keep=keep: reference.attention(*t, mask, dropout_p=p, keep=keep)  # noqa: E731
        ref_out, ref_grads = run(ref, [t.double() for t in (q, k, v)], do.double())
        eager_out, eager_grads = run(ref, (q, k, v), do)
        assert_matches_reference(out, ref_out, eager_out, name="out")
        for name, g, rg, eg in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads, strict=True):
            assert_matches_reference(g, rg, eg, name=name)
    assert len(drawn) == 2 and drawn[0] != drawn[1]


def test_dropout_reproducible_and_keep_rate():
    from fastbert.kernels.attention_dropout import dropout_keep_mask

    q, k, v, _ = make_inputs(1, 2, 33, 32, torch.float32)
    torch.manual_seed(7)
    y1 = attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(7)
    y2 = attention(q, k, v, dropout_p=0.2)
    y3 = attention(q, k, v, dropout_p=0.2)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    keep = dropout_keep_mask(99, 2, 4, 64, 128, 0.2, DEVICE)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - 0.8) < 5 * (0.8 * 0.2 / n) ** 0.5
    rows = keep.reshape(-1, 128)
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]


@pytest.mark.parametrize("block_n", [32, 128])
def test_dropout_keep_mask_does_not_depend_on_the_tile(block_n):
    # The forward and the two backward kernels draw the mask in key tiles of different widths (32 to 128): each
    # must regenerate the same mask (kernels.attention_dropout._dropout_keep: one Philox counter serves eight
    # columns of a 32-key group).
    from fastbert.kernels.attention_dropout import dropout_keep_mask

    expected = dropout_keep_mask(3, 1, 2, 8, 100, 0.5, DEVICE, block_n=64)
    assert torch.equal(dropout_keep_mask(3, 1, 2, 8, 100, 0.5, DEVICE, block_n=block_n), expected)


def test_dropout_draws_are_not_reused():
    # No two elements, in one row or in neighbouring rows, may share a draw (each row has its own range of Philox
    # counters even when its length is not a multiple of the eight columns a counter serves): with p = 0.5 every
    # pair of columns must be uncorrelated across rows.
    from fastbert.kernels.attention_dropout import dropout_keep_mask

    keep = dropout_keep_mask(8, 2, 4, 64, 40, 0.5, DEVICE).reshape(-1, 40)
    x = keep.double() * 2 - 1
    n = x.shape[0] - 1
    within = x.T @ x / (n + 1) - torch.eye(40, dtype=torch.float64, device=x.device)
    across = x[:-1].T @ x[1:] / n
    bound = 6 / n**0.5  # independent columns: |correlation| ~ 1 / sqrt(n)
    assert within.abs().max() < bound, within.abs().max()
    assert across.abs().max() < bound, across.abs().max()


def test_dropout_threshold_rounds_p_to_the_draw_width():
    from fastbert.kernels.common import dropout_threshold

    assert dropout_threshold(0.0, 16) == 0  # every 16-bit draw kept
    assert dropout_threshold(0.1, 16) == 6554  # round(0.1 * 2^16): keep 1 - 6554 / 65536, within 2^-17 of 0.9
    assert dropout_threshold(1 - 2**-20, 16) == 65535  # never "drop everything" for p < 1
    assert dropout_threshold(0.0, 32) == -(2**31)  # 32-bit: t - 2^31, compared with the top bit flipped
    assert dropout_threshold(0.5, 32) == 0
    with pytest.raises(ValueError, match="16 or 32"):
        dropout_threshold(0.1, 8)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_threshold(1.0, 16)


def test_dropout_keep_mask_lanes_are_independent():
    # One Philox evaluation gives eight 16-bit draws, to keys 8j + 2t + e (j < 4, e < 2) of a 32-key group
    # (kernels.attention_dropout._dropout_keep): each lane must keep at the requested rate, and neighbours (the two
    # halves of one 32-bit word, and across words) must agree only as often as independent draws do.
    from fastbert.kernels.attention_dropout import dropout_keep_mask

    p = 0.3
    keep = dropout_keep_mask(5, 2, 4, 64, 128, p, DEVICE).reshape(-1, 128).float()
    # [row, group, j, t, e] -> [row, group, t, (j, e)]: one evaluation's eight draws, in draw order 2j + e
    lanes = keep.reshape(keep.shape[0], 4, 4, 4, 2).permute(0, 1, 3, 2, 4).reshape(keep.shape[0], -1, 8)
    n = lanes.shape[0] * lanes.shape[1]
    for lane in range(8):
        rate = lanes[..., lane].mean().item()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, f"lane {lane} keeps {rate:.4f}"
    same = p * p + (1 - p) ** 2  # P(two independent draws agree)
    for a in range(7):
        agree = (lanes[..., a] == lanes[..., a + 1]).float().mean().item()
        assert abs(agree - same) < 5 * (same * (1 - same) / n) ** 0.5, f"lanes {a}, {a + 1} agree {agree:.4f}"


def _philox4x32_10(c, key):
    """Philox-4x32-10 (Salmon et al., 2011) of counters c [n, 4] (uint32) under a 64-bit key, in numpy."""
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    c0, c1, c2, c3 = (c[:, i].astype(np.uint64) for i in range(4))
    low = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # exact: both factors below 2^32
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & low, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & low
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & low, (k1 + np.uint64(0xBB67AE85)) & low
    return np.stack([c0, c1, c2, c3], axis=1)


def test_dropout_keep_mask_is_the_documented_philox_stream():
    # The mask, element by element, from an independent Philox in numpy and the mapping attention_dropout's
    # module docstring gives: element (row, col) is the 16-bit half col % 2 of word (col % 32) // 8 at counter
    # row * 4 * cdiv(seq_k, 32) + 4 * (col // 32) + (col % 8) // 2, the seed in the counter's upper 64 bits.
    from fastbert.kernels.attention_dropout import DROPOUT_BITS, dropout_keep_mask
    from fastbert.kernels.common import DROPOUT_KEY, dropout_threshold, philox_seed

    seed, rows, seq_k, p = 11, 6, 70, 0.4
    keep = dropout_keep_mask(seed, 1, 1, rows, seq_k, p, DEVICE)[0, 0].cpu().numpy()
    r, col = np.meshgrid(np.arange(rows), np.arange(seq_k), indexing="ij")
    counter = (r * 4 * -(-seq_k // 32) + 4 * (col // 32) + (col % 8) // 2).astype(np.uint64).ravel()
    stream = philox_seed(seed)
    c = np.stack([counter & 0xFFFFFFFF, counter >> np.uint64(32), np.full_like(counter, stream & 0xFFFFFFFF),
                  np.full_like(counter, stream >> 32)], axis=1)  # fmt: skip
    words = _philox4x32_10(c, DROPOUT_KEY.value)[np.arange(counter.size), ((col % 32) // 8).ravel()]
    draws = (words >> (16 * (col % 2)).ravel().astype(np.uint64)) & np.uint64(0xFFFF)
    expected = (draws.astype(np.int64) >= dropout_threshold(p, DROPOUT_BITS.value)).reshape(rows, seq_k)
    assert (keep == expected).all(), f"{(keep != expected).sum()} of {keep.size} elements differ"


def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, _ = make_inputs(2, 2, 9, 32, torch.float32, device="cpu")
    mask = random_mask(2, 9, lengths=[9, 4]).cpu()
    torch.testing.assert_close(attention(q, k, v, mask), reference.attention(q, k, v, mask))


@pytest.mark.parametrize(
    "case, message",
    [
        ("rank", r"\[batch, heads, seq, head_dim\]"),
        ("head_dim", "head_dim 48 is unsupported"),
        ("dtype", "one dtype"),
        ("int", "float16, bfloat16 or float32"),
        ("kv_shape", "k and v must have one shape"),
        ("batch", "must agree on batch"),
        ("mask_shape", "attention_mask must be"),
        ("mask_dtype", "bool or integer"),
        ("dropout", "dropout_p"),
        ("cu_dtype", "1-D int32"),
        ("cu_monotone", "monotone"),
        ("cu_end", "end at total_tokens"),
        ("max_seqlen", "max_seqlen"),
        ("device", "one device"),
    ],
)
def test_bad_input_raises_value_error(case, message):
    q, k, v, _ = make_inputs(2, 2, 8, 32, torch.float32)
    mask, kwargs = None, {}
    packed = q.transpose(1, 2).reshape(16, 2, 32)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32, device=DEVICE)
    varlen = case.startswith("cu") or case == "max_seqlen"
    mx = 8
    if case == "rank":
        q = q[0]
    elif case == "head_dim":
        q, k, v, _ = make_inputs(2, 2, 8, 48, torch.float32)
    elif case == "dtype":
        k = k.half()
    elif case == "int":
        q, k, v = q.long(), k.long(), v.long()
    elif case == "kv_shape":
        v = v[:, :, :4]
    elif case == "batch":
        k, v = k[:1], v[:1]
    elif case == "mask_shape":
        mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    elif case == "mask_dtype":
        mask = torch.ones(2, 8, device=DEVICE)
    elif case == "dropout":
        kwargs["dropout_p"] = 1.0
    elif case == "cu_dtype":
        cu = cu.long()
    elif case == "cu_monotone":
        cu = torch.tensor([0, 12, 8, 16], dtype=torch.int32, device=DEVICE)
    elif case == "cu_end":
        cu = torch.tensor([0, 8, 15], dtype=torch.int32, device=DEVICE)
    elif case == "max_seqlen":
        mx = 4
    elif case == "device":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA device beside the CPU")
        k = k.cpu()
    with pytest.raises(ValueError, match=message):
        if varlen:
            attention_varlen(packed, packed, packed, cu, mx, **kwargs)
        else:
            attention(q, k, v, mask, **kwargs)


def test_opcheck():
    q, k, v, _ = make_inputs(1, 2, 17, 32, torch.float32)
    q.requires_grad_()
    from fastbert.kernels.attention import key_bias

    bias = key_bias(random_mask(1, 17, lengths=[9]), 17)
    zero = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, (q, k, v, bias, None, 0, 0.2, 0.0, zero))
    five = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, (q, k, v, None, None, 0, 0.2, 0.25, five))
    # the backward's fake gives each gradient the layout the launcher does (transposed views and contiguous)
    q = q.detach()
    out, lse = torch.ops.fastbert.attention_fwd(q, k, v, bias, None, 0, 0.2, 0.0, zero)
    for qq in (q, q.transpose(1, 2).contiguous().transpose(1, 2)):
        torch.library.opcheck(torch.ops.fastbert.attention_bwd.default,
                              (torch.randn_like(out), qq, k, v, out, lse, bias, None, 0, 0.2, 0.0, zero))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("seq", [128, 512])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_bert_shapes_gpu(seq, dtype, masked):
    mask = random_mask(32, seq, seed=seq) if masked else None
    check_against_reference(*make_inputs(32, 12, seq, 64, dtype), mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128])
def test_head_dims_gpu(head_dim, dtype):
    check_against_reference(*make_inputs(4, 4, 300, head_dim, dtype), mask=random_mask(4, 300, seed=1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_long_sequence_gpu(dtype):
    check_against_reference(*make_inputs(1, 2, 8200, 64, dtype), mask=random_mask(1, 8200, lengths=[8100]))


@pytest.mark.parametrize("chunk", [1, 3])
def test_dropout_backward_in_chunks_of_heads_is_the_same(monkeypatch, chunk):
    """Past its byte budget (long sequences) the backward packs the dropout mask and runs dq and dk/dv for a
    chunk of (batch, head) pairs at a time: the same gradients, bit for bit, padded with a mask and varlen."""
    from fastbert.kernels import attention_bwd as kernels

    b, h, s, d, p = 2, 2, 45, 32, 0.3
    q, k, v, do = make_inputs(b, h, s, d, torch.float16)
    mask = random_mask(b, s, seed=5)
    lengths = [20, 45]
    cu = torch.tensor([0, 20, 65], dtype=torch.int32, device=DEVICE)
    packed = [torch.cat([t[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)]) for t in (q, k, v, do)]
    calls = [(lambda *t: attention(*t, mask, dropout_p=p), (q, k, v), do),
             (lambda *t: attention_varlen(*t, cu, 45, dropout_p=p), packed[:3], packed[3])]  # fmt: skip
    real = kernels._attention_dropout_bits_kernel

    class Spy:  # counts the mask's launches: one a chunk
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    for fn, inputs, grad in calls:
        results, counts = [], []
        for budget in (None, chunk * s * 4 * 2):  # rows x bytes a row (two 32-key groups) per chunk
            launches = []
            monkeypatch.setattr(kernels, "_attention_dropout_bits_kernel", Spy())
            if budget is not None:
                monkeypatch.setattr(kernels, "_DROPOUT_BITS_BUDGET", budget)
            torch.manual_seed(7)
            results.append(run(fn, inputs, grad))
            counts.append(len(launches))
            monkeypatch.undo()
        assert counts == [1, -(-b * h // chunk)]
        (out, grads), (out_c, grads_c) = results
        assert torch.equal(out, out_c)
        for g, gc in zip(grads, grads_c, strict=True):
            assert torch.equal(g, gc)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodropout", "dropout"])
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_more_batch_heads_than_a_grid_row_launch_in_chunks(monkeypatch, varlen, dropout_p):
    """CUDA takes at most 65535 programs along a grid's second dimension, the (batch, head) pairs of every attention
    kernel (5462 sequences x 12 heads would be more): past that the launchers run chunks of (batch, head) pairs.
    With the limit lowered to 4 here, 7 x 2 pairs take four chunks: no grid is taller than the limit, and the
    results match the reference (with the kernel's keep-mask for dropout)."""
    from fastbert.kernels import attention as fwd_kernels
    from fastbert.kernels import attention_bwd as bwd_kernels
    from fastbert.kernels.attention_dropout import dropout_keep_mask

    limit, grids = 4, []
    # (on a GPU the tiles' first-call timing would launch each kernel many more times through the spies)
    monkeypatch.setenv("FASTBERT_AUTOTUNE", "0")

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    for mod in (fwd_kernels, bwd_kernels):
        monkeypatch.setattr(mod, "MAX_GRID_Y", limit)
    monkeypatch.setattr(fwd_kernels, "_attention_fwd_kernel", Spy(fwd_kernels._attention_fwd_kernel))
    for name in ("_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
                 "_attention_dropout_bits_kernel"):  # fmt: skip
        monkeypatch.setattr(bwd_kernels, name, Spy(getattr(bwd_kernels, name)))
    b, h, s, d = 7, 2, 20, 32
    q, k, v, do = make_inputs(b, h, s, d, torch.float16)
    torch.manual_seed(5)
    seed = int(draw_seed(DEVICE).item())
    if not varlen:
        keep = dropout_keep_mask(seed, b, h, s, s, dropout_p, DEVICE) if dropout_p else None
        check_against_reference(q, k, v, do, mask=random_mask(b, s, seed=4), dropout_p=dropout_p, keep=keep,
                                seed=5 if dropout_p else None)  # fmt: skip
    else:
        lengths = [1, 20, 7, 13, 20, 2, 9]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        packed = [torch.cat([t[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)]) for t in (q, k, v, do)]
        keep = dropout_keep_mask(seed, 1, h, int(cu[-1]), s, dropout_p, DEVICE)[0] if dropout_p else None

        def ref(q, k, v):
            outs = []
            for a, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
                kb = keep[:, a:e, : e - a][None] if dropout_p else None
                one = (t[a:e].transpose(0, 1)[None] for t in (q, k, v))
                outs.append(reference.attention(*one, dropout_p=dropout_p, keep=kb)[0].transpose(0, 1))
            return torch.cat(outs)

        torch.manual_seed(5)
        out, grads = run(lambda *t: attention_varlen(*t, cu, s, dropout_p=dropout_p), packed[:3], packed[3])
        ref_out, ref_grads = run(ref, [t.double() for t in packed[:3]], packed[3].double())
        eager_out, eager_grads = run(ref, packed[:3], packed[3])
        assert_matches_reference(out, ref_out, eager_out, name="out")
        for name, g, rg, eg in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads, strict=True):
            assert_matches_reference(g, rg, eg, name=name)
    assert grids and max(grid[1] for grid in grids) <= limit
    # every kernel ran all four chunks: forward, preprocess, dk/dv and dq (and the dropout mask's packing)
    assert len(grids) == 4 * (5 if dropout_p else 4)


def test_varlen_dropout_matches_reference_with_kernel_mask():
    from fastbert.kernels.attention_dropout import dropout_keep_mask

    lengths, h, d, p = [9, 1, 30], 2, 32, 0.25
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    total, mx = bounds[-1], max(lengths)
    g = torch.Generator().manual_seed(11)
    q, k, v, do = (torch.randn(total, h, d, generator=g).to(DEVICE) for _ in range(4))
    torch.manual_seed(99)
    seed = int(draw_seed(DEVICE).item())
    # varlen row id of (head, token) is head * total + token: the padded mask of (batch 1, seq_q = total)
    keep = dropout_keep_mask(seed, 1, h, total, mx, p, DEVICE)[0]

    def ref(q, k, v):
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
            kb = keep[:, a:b, : b - a][None]
            outs.append(reference.attention(qs, ks, vs, dropout_p=p, keep=kb)[0].transpose(0, 1))
        return torch.cat(outs)

    torch.manual_seed(99)
    out, grads = run(lambda *t: attention_varlen(*t, cu, mx, dropout_p=p), (q, k, v), do)
    ref_out, ref_grads = run(ref, [t.double() for t in (q, k, v)], do.double())
    assert_matches_reference(out, ref_out, name="out")
    for name, gr, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_matches_reference(gr, rg, name=name)


def test_autocast_runs_in_autocast_dtype():
    q, k, v, _ = make_inputs(1, 2, 17, 32, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out = attention(q, k, v)
    assert out.dtype == torch.float16
    expected = reference.attention(q.half().double(), k.half().double(), v.half().double())
    assert_matches_reference(out, expected, reference.attention(q.half(), k.half(), v.half()), name="out")


def test_autocast_casts_mixed_dtypes_as_sdpa_does():
    """Under autocast q, k and v of different dtypes are all cast to autocast's (as F.scaled_dot_product_attention
    casts them); outside it they must share one."""
    q, k, v, _ = make_inputs(1, 2, 17, 32, torch.float32)
    k16 = k.half()
    with pytest.raises(ValueError, match="one dtype"):
        attention(q, k16, v)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out = attention(q, k16, v)
        flat = [t[0].transpose(0, 1) for t in (q, k16, v)]  # [seq, heads, head_dim]
        cu = torch.tensor([0, 17], dtype=torch.int32, device=DEVICE)
        out_varlen = attention_varlen(*flat, cu, 17)
    assert out.dtype == out_varlen.dtype == torch.float16
    expected = reference.attention(q.half().double(), k16.double(), v.half().double())
    eager = reference.attention(q.half(), k16, v.half())
    assert_matches_reference(out, expected, eager, name="out")
    assert_matches_reference(out_varlen, expected[0].transpose(0, 1), eager[0].transpose(0, 1), name="varlen out")


def test_arguments_of_the_wrong_type_raise_value_errors():
    """dropout_p, max_seqlen (and add_layer_norm's eps) that are no number raise ValueError naming them, not the
    TypeError of float(None); max_seqlen must be a finite integer (6.0 and a one-element tensor are)."""
    from fastbert.ops import add_layer_norm

    q = torch.randn(4, 1, 32, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dropout_p must be a real number"):
        attention(q[None], q[None], q[None], dropout_p=None)
    for bad in (None, float("inf"), 6.5, "6"):
        with pytest.raises(ValueError, match="max_seqlen must be an integer"):
            attention_varlen(q, q, q, cu, bad)
    for fine in (6.0, torch.tensor(4)):
        torch.testing.assert_close(attention_varlen(q, q, q, cu, fine), attention_varlen(q, q, q, cu, 4))
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="eps must be a real number"):
        add_layer_norm(x, x, torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE), None)


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_more_than_65535_batch_heads_gpu(varlen):
    """Past CUDA's 65535 grid rows for real: 66535 one-token sequences of one head, whose attention is exact
    (softmax over one key is 1): out = v, dv = dout, dq = dk = 0 (up to the rounding of dp - delta)."""
    n = 65535 + 1000
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(n, 1, 32, generator=g).to(DEVICE, torch.float16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if varlen:
        cu = torch.arange(n + 1, dtype=torch.int32, device=DEVICE)
        out = attention_varlen(*leaves, cu, 1)
    else:
        out = attention(*(t[:, :, None] for t in leaves))[:, :, 0]  # [n, 1 head, 1 token, 32]
    dq, dk, dv = torch.autograd.grad(out, leaves, do)
    assert torch.equal(out, v) and torch.equal(dv, do)
    zero = torch.zeros_like(q)
    torch.testing.assert_close(dq, zero, rtol=0, atol=1e-3)
    torch.testing.assert_close(dk, zero, rtol=0, atol=1e-3)
