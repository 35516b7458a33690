"""The `fastbert` command.

fastbert check      run every fused op (forward and backward) against its float64 reference on this machine's
                    device — the GPU, or Triton's interpreter on CPU — and print a table of errors; then the
                    same for a BERT model after fastbert.optimize (with transformers installed)
fastbert bench      time BERT inference and training: eager, SDPA, torch.compile and fastbert side by side on
                    this machine's GPU, checked before timing; results as JSON / Markdown / PNG
                    (`fastbert bench --help`; `--dry-run` exercises it on CPU with a tiny model)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

HALF_ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _grads(fn: Callable, inputs: list[torch.Tensor], dy_seed: int = 1) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


def compare(name: str, fast: Callable, ref: Callable, inputs: list[torch.Tensor], labels: list[str]) -> list[dict]:
    """Rows of the error table: each output / gradient of `fast` vs `ref` in float64, and eager (`ref` in the
    inputs' dtype) vs float64; ok when the kernel's error <= 2x eager's + one ulp (fp32: 1e-5, relative)."""
    got = _grads(fast, inputs)
    want = _grads(ref, [t.double() if t.is_floating_point() else t for t in inputs])
    eager = _grads(ref, inputs)
    return [_judge(name, label, a, w, e) for label, a, w, e in zip(["out", *labels], got, want, eager, strict=True)]


def _judge(op: str, label: str, got: torch.Tensor, want: torch.Tensor, eager: torch.Tensor) -> dict:
    """One row of the table: `got` (fastbert) and `eager` (PyTorch in the same dtype) against `want` (float64)."""
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err, eager_err = _err(got, want), _err(eager, want)
    slack = HALF_ULP.get(got.dtype, 1e-5) * scale
    ok = bool(torch.isfinite(got).all()) and err <= 2 * eager_err + slack
    return {"op": op, "tensor": label, "err": err, "eager_err": eager_err, "ok": ok}


def check_add_layer_norm(device: torch.device, dtype: torch.dtype, big: bool) -> list[dict]:
    from fastbert import ops, reference

    M, N = (16384, 768) if big else (64, 96)
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(M, N, generator=g).to(device, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(device, dtype)
    b = (0.1 * torch.randn(N, generator=g)).to(device, dtype)
    rows = compare("add_layer_norm", ops.add_layer_norm, reference.add_layer_norm, [x, r, w, b],
                   ["dx", "dresidual", "dweight", "dbias"])  # fmt: skip
    return [row | {"shape": f"{M}x{N}"} for row in rows]


def check_linear_gelu(device: torch.device, dtype: torch.dtype, big: bool) -> list[dict]:
    from fastbert import ops, reference

    M, K, N = (16384, 768, 3072) if big else (64, 48, 96)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    b = (0.1 * torch.randn(N, generator=g)).to(device, dtype)
    rows = []
    for approximate in ("none", "tanh"):
        fast = lambda *t, a=approximate: ops.linear_gelu(*t, approximate=a)  # noqa: E731
        ref = lambda *t, a=approximate: reference.linear_gelu(*t, approximate=a)  # noqa: E731
        rows += [row | {"shape": f"{M}x{K}->{N}", "op": f"linear_gelu/{approximate}"}
                 for row in compare("linear_gelu", fast, ref, [x, w, b], ["dx", "dweight", "dbias"])]  # fmt: skip
    return rows


def check_attention(device: torch.device, dtype: torch.dtype, big: bool) -> list[dict]:
    from fastbert import ops, reference

    B, H, S, D = (32, 12, 512, 64) if big else (2, 2, 40, 32)
    g = torch.Generator().manual_seed(0)
    # [B, S, H, D] transposed to [B, H, S, D]: the strided views transformers hands over
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3))
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S)[None, :] < lengths[:, None]).to(device)
    fast = lambda q, k, v: ops.attention(q, k, v, mask)  # noqa: E731
    ref = lambda q, k, v: reference.attention(q, k, v, mask)  # noqa: E731
    rows = compare("attention", fast, ref, [q, k, v], ["dq", "dk", "dv"])
    return [row | {"shape": f"{B}x{H}x{S}x{D}"} for row in rows]


def check_linear_cross_entropy(device: torch.device, dtype: torch.dtype, big: bool) -> list[dict]:
    """The masked-LM decoder + loss: its logits, and the loss with the gradients of x, weight and bias."""
    from fastbert import ops, reference

    M, K, V = (4096, 768, 30522) if big else (64, 48, 300)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (2 * torch.randn(V, K, generator=g) / K**0.5).to(device, dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(device, dtype)
    labels = torch.randint(0, V, (M,), generator=g)
    labels[torch.rand(M, generator=g) < 0.5] = -100
    labels = labels.to(device)
    shape = f"{M}x{K}->{V}"
    with torch.no_grad():
        logits = [f(*t, labels)[0] for f, t in ((ops.linear_cross_entropy, (x, w, b)),
                  (reference.linear_cross_entropy, (x.double(), w.double(), b.double())),
                  (reference.linear_cross_entropy, (x, w, b)))]  # fmt: skip
    rows = [_judge("linear_cross_entropy", "logits", *logits) | {"shape": shape}]
    fast = lambda x, w, b: ops.linear_cross_entropy(x, w, b, labels)[1]  # noqa: E731
    ref = lambda x, w, b: reference.linear_cross_entropy(x, w, b, labels)[1]  # noqa: E731
    rows += [row | {"shape": shape, "tensor": "loss" if row["tensor"] == "out" else row["tensor"]}
             for row in compare("linear_cross_entropy", fast, ref, [x, w, b], ["dx", "dweight", "dbias"])]  # fmt: skip
    return rows


def check_model(device: torch.device, dtype: torch.dtype, big: bool) -> list[dict]:
    """fastbert.optimize on a random-initialised BertModel (BERT-base on GPU, a tiny one in the interpreter) and a
    padded batch of mixed lengths: the optimized model, and transformers' eager model in the same dtype, against
    the eager model in float64. Inference: hidden states of the real tokens, pooler output. Training (train mode,
    dropout probabilities 0 so the runs compare): the gradients of a fixed projection of the real tokens' hidden
    states for the parameters each fused path touches."""
    import copy

    try:
        import transformers
    except ImportError:
        print("(model check skipped: transformers is not installed; pip install 'fastbert[test]')")
        return []
    import fastbert

    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if big:
        cfg, B, S = transformers.BertConfig(**no_dropout), 8, 512
    else:
        cfg = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128, max_position_embeddings=64, **no_dropout)  # fmt: skip
        B, S = 3, 24
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (B, S), generator=g).to(device)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0], lengths[-1] = S, 1
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long().to(device)
    proj = torch.randn(cfg.hidden_size, generator=g).to(device)
    torch.manual_seed(0)
    ref = transformers.BertModel(cfg).eval()
    ref.set_attn_implementation("eager")
    eager = copy.deepcopy(ref).to(device, dtype)
    fast = fastbert.optimize(copy.deepcopy(eager))
    ref = ref.to(device, torch.float64)
    models = (fast, ref, eager)
    with torch.no_grad():
        outs = [m(input_ids=ids, attention_mask=mask) for m in models]
    real = mask.bool()
    shape = f"{B}x{S} {cfg.num_hidden_layers}L h{cfg.hidden_size}"
    rows = [_judge("bert_model", label, *t) | {"shape": shape}
            for label, t in (("hidden", [o.last_hidden_state[real] for o in outs]),
                             ("pooler", [o.pooler_output for o in outs]))]  # fmt: skip
    last = cfg.num_hidden_layers - 1
    params = {"d_qkv": "encoder.layer.0.attention.self.query.weight",
              "d_ffn_in": "encoder.layer.0.intermediate.dense.weight",
              "d_ffn_out": "encoder.layer.0.output.dense.weight",
              "d_ln": f"encoder.layer.{last}.output.LayerNorm.weight",
              "d_embed": "embeddings.word_embeddings.weight"}  # fmt: skip
    grads = []
    for m in models:
        m.train()
        hidden = m(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        (hidden * proj.to(hidden.dtype)).sum().backward()
        named = dict(m.named_parameters())
        grads.append([named[name].grad for name in params.values()])
        m.eval()
    rows += [_judge("bert_model train", label, *(gs[i] for gs in grads)) | {"shape": shape}
             for i, label in enumerate(params)]  # fmt: skip
    return rows


CHECKS: dict[str, Callable[[torch.device, torch.dtype, bool], list[dict]]] = {
    "add_layer_norm": check_add_layer_norm,
    "linear_gelu": check_linear_gelu,
    "attention": check_attention,
    "linear_cross_entropy": check_linear_cross_entropy,
    "model": check_model,
}


def _versions() -> str:
    """torch's and Triton's versions, as a report of a failed check needs them (the README's "Versions" says what
    the compile gate found under each Triton)."""
    import importlib.metadata

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    return f"torch {torch.__version__}, Triton {triton_version}"


def cmd_check(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    if not cuda:
        # Before any kernel module is imported: @triton.jit reads this when it decorates.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if cuda else "cpu")
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter (no CUDA device)"
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.float32, torch.float16]
    print(f"fastbert check on {where} ({_versions()})")
    header = f"{'op':20s} {'dtype':9s} {'shape':16s} {'tensor':10s} {'max err':>10s} {'eager err':>10s}  ok"
    print(header)
    print("-" * len(header))
    failures = 0
    for name, check in CHECKS.items():
        if args.op and name not in args.op:
            continue
        for dtype in dtypes:
            for row in check(device, dtype, cuda):
                failures += not row["ok"]
                print(f"{row['op']:20s} {str(dtype).removeprefix('torch.'):9s} {row['shape']:16s} {row['tensor']:10s} "
                      f"{row['err']:10.3g} {row['eager_err']:10.3g}  {'yes' if row['ok'] else 'NO'}")  # fmt: skip
    print(
        f"{'all checks passed' if not failures else f'{failures} check(s) failed'} "
        "(ok: error <= 2x eager PyTorch's in the same dtype + one ulp, against float64)"
    )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastbert", description="fastbert: Triton kernels for BERT encoders")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="run every fused op against its float64 reference and print the errors")
    p.add_argument("--op", action="append", choices=sorted(CHECKS), help="only this op (repeatable)")
    p.set_defaults(func=cmd_check)
    from fastbert import bench

    p = sub.add_parser("bench", help="time BERT inference / training against eager, SDPA and torch.compile")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
