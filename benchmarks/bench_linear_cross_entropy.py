"""Benchmark: the masked-LM decoder + loss (fastbert's ops.linear_cross_entropy) vs eager (F.linear then
F.cross_entropy, as transformers' masked-LM heads) vs torch.compile of the same vs bare F.linear (the decoder GEMM
alone, as eager runs it), forward and forward+backward, with each provider's peak memory, on one GPU.

As BERT pretraining runs it: under bf16 (or fp16) autocast with fp32 parameters and an fp32 input (the head's
LayerNorm output), BERT's vocabulary of 30522 words (XLM-R's 250002 with --xlmr), every token labelled (as
`fastbert bench` and the audit label them) and 15% labelled (real masked-LM batches).

FLOPs (the softmax is negligible beside the GEMMs):
  forward           x @ weightᵀ                                           2·M·H·V
  forward+backward  forward + dx = dlogits @ weight + dweight = dlogitsᵀ x  6·M·H·V
TFLOP/s = FLOPs / time. peak_mem_bytes: the most memory allocated during one call beyond its inputs.

    python benchmarks/bench_linear_cross_entropy.py [--quick] [--xlmr] [--out DIR] [--no-compile] [--check]

Without CUDA it says so in one line and exits 0 (--check: benchmarks/harness.py). fastbert's loss and its gradients
are checked against float64 first.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402


def eager(x, w, b, labels):
    logits = F.linear(x, w, b)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def bare_linear(x, w, b, labels):
    return F.linear(x, w, b)


def peak_bytes(fn) -> int:
    """Memory allocated at the peak of one call of fn, beyond what was allocated before it (0 under --check)."""
    if harness.CHECK:
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16384 tokens x 768 -> 30522, bf16 autocast only")
    parser.add_argument("--xlmr", action="store_true", help="also XLM-R's vocabulary (250002) at 4096 tokens")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<gpu>/)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    harness.add_check_flag(parser)
    args = parser.parse_args()
    dev = harness.start("bench_linear_cross_entropy", args)
    from fastbert.ops import linear_cross_entropy

    def fastbert_loss(x, w, b, labels):
        return linear_cross_entropy(x, w, b, labels)[1]

    check = harness.CHECK  # (no torch.compile; fp16 autocast only: the interpreter holds bf16 as raw bits)
    compiled = None if args.no_compile or check else torch.compile(eager, mode="max-autotune-no-cudagraphs")
    shapes = [(16384, 768, 30522)] if args.quick else [(m, h, 30522) for m in (4096, 16384) for h in (768, 1024)]
    if args.xlmr:
        shapes.append((4096, 768, 250002))
    shapes = [(64, 32, 500)] if check else shapes  # (a vocabulary the op pads)
    amps = [torch.float16] if check else [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16]
    rows = []
    for amp in amps:
        for M, H, V in shapes:
            for labelled in (1.0, 0.15):
                g = torch.Generator(device=dev).manual_seed(0)
                x = torch.randn(M, H, device=dev, generator=g)
                w = 2 * torch.randn(V, H, device=dev, generator=g) / H**0.5
                b = 0.5 * torch.randn(V, device=dev, generator=g)
                labels = torch.randint(0, V, (M,), device=dev, generator=g)
                labels[torch.rand(M, device=dev, generator=g) >= labelled] = -100
                inputs = (x, w, b, labels)

                def autocast(fn, amp=amp):
                    def run(*args):
                        with torch.autocast(dev, dtype=amp):
                            return fn(*args)

                    return run

                tag = f"loss {M}x{H}->{V}"
                with torch.no_grad():
                    ref = eager(x.double(), w.double(), b.double(), labels)
                    ok, err, eager_err = harness.check_close(autocast(fastbert_loss)(*inputs), ref,
                                                             autocast(eager)(*inputs), tag)  # fmt: skip
                training = harness.TrainingReference(autocast(eager), inputs, torch.ones((), device=dev), ref64=eager)
                grads_ok = training.check(autocast(fastbert_loss), tag)
                providers = {"fastbert": fastbert_loss, "eager": eager, "F.linear": bare_linear}
                if compiled is not None:
                    providers["torch.compile"] = compiled
                for mode, flops in (("fwd", 2 * M * H * V), ("fwd+bwd", 6 * M * H * V)):
                    for name, fn in providers.items():
                        if mode == "fwd+bwd" and name == "F.linear":
                            continue  # its backward needs an incoming gradient of [M, V]: not the same work
                        leaves = [t.detach().requires_grad_(mode == "fwd+bwd") for t in inputs[:3]]

                        def call(fn=fn, leaves=leaves, mode=mode, amp=amp, labels=labels):
                            with torch.autocast(dev, dtype=amp), torch.set_grad_enabled(mode == "fwd+bwd"):
                                out = fn(*leaves, labels)
                            if mode == "fwd+bwd":
                                out.backward()

                        t = harness.time_ms(call, grad_to_none=leaves if mode == "fwd+bwd" else None)
                        for leaf in leaves:  # the peak of one call from no gradients, as in a training step
                            leaf.grad = None
                        peak = peak_bytes(call)
                        tflops = flops / t["median_ms"] / 1e9
                        row = {"op": "linear_cross_entropy", "provider": name,
                               "dtype": f"{str(amp).removeprefix('torch.')}-autocast", "rows": M, "hidden": H,
                               "vocab": V, "labelled": labelled, "mode": mode, **t, "tflops": tflops,
                               "peak_mem_bytes": peak}  # fmt: skip
                        checked = ""
                        if name == "fastbert":
                            row |= {"check_ok": ok, "err": err, "eager_err": eager_err}
                            checked = "  check " + ("ok" if ok else "FAILED")
                            if mode == "fwd+bwd":
                                row["grad_check_ok"] = grads_ok
                                checked += ", gradients " + ("ok" if grads_ok else "FAILED")
                        rows.append(row)
                        print(f"{row['dtype']:16s} {M:6d}x{H:<5d}->{V:<6d} lab {labelled:4.2f} {mode:8s} "
                              f"{name:14s} {t['median_ms']:8.4f} ms {tflops:7.1f} TFLOP/s "
                              f"peak {peak / 2**30:6.2f} GiB{checked}")  # fmt: skip
    cols = ["dtype", "rows", "hidden", "vocab", "labelled", "mode", "provider", "median_ms", "tflops",
            "peak_mem_bytes", "check_ok", "grad_check_ok"]  # fmt: skip
    harness.write_results("linear_cross_entropy", rows, args.out, cols)
    for r in (r for r in rows if r["provider"] == "fastbert"):
        key = (r["dtype"], r["rows"], r["hidden"], r["vocab"], r["labelled"], r["mode"])
        for other in ("eager", "torch.compile"):
            o = next((q for q in rows if q["provider"] == other and (q["dtype"], q["rows"], q["hidden"], q["vocab"],
                      q["labelled"], q["mode"]) == key), None)  # fmt: skip
            if o is not None:
                print(
                    f"{' '.join(map(str, key))}: {o['median_ms'] / r['median_ms']:.2f}x {other}'s speed, "
                    f"{r['peak_mem_bytes'] / max(1, o['peak_mem_bytes']):.2f}x its peak memory"
                )
    return harness.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
