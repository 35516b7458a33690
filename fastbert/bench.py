"""``fastbert bench``: BERT inference and training speed (and memory) of fastbert side by side with transformers'
eager and SDPA attention and torch.compile, on this machine's GPU.

    fastbert bench --quick                      # BERT-base fp16, a few shapes: about two minutes on an H100
    fastbert bench --suite infer --model base,large --dtype fp16,bf16
    fastbert bench --suite train                # BertForPreTraining step under bf16 autocast
    fastbert bench --suite ops                  # the per-op benchmark scripts of a source checkout
    fastbert bench --dry-run                    # the whole pipeline on a tiny model on CPU (Triton interpreter)

Providers (one run, side by side): ``eager`` and ``sdpa`` (transformers' attention implementations),
``torch.compile`` (of the SDPA model, mode max-autotune-no-cudagraphs), ``fastbert`` (fastbert.optimize of the
SDPA model), ``fastbert+cudagraph`` (the optimized model captured in a CUDA graph) and its peer
``torch.compile(reduce-overhead)``. The training step runs ``sdpa`` and ``fastbert``, and each again with the whole
step (forward, backward, AdamW) captured in a CUDA graph (``sdpa+cudagraph``, ``fastbert+cudagraph``; see
_graphed_train_step). Models are random-initialised from BertConfig (no downloads).

Before timing, each provider's output is checked against an fp32 reference with the test suite's rule (error at
most 2x the eager model's in that dtype, plus an atol); a provider that fails is reported as failed, not timed.
Timing: CUDA events (triton.testing.do_bench), warm-up, medians with p20/p80, inputs rotated among three batches.
Throughput counts real (unpadded) tokens. Results: JSON rows + Markdown table (+ PNG if matplotlib is there) in
benchmarks/results/<gpu>/ of a source checkout (see fastbert.benchtools), or --out.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable

INFER_PROVIDERS = ("eager", "sdpa", "torch.compile", "fastbert", "fastbert+cudagraph",
                   "torch.compile(reduce-overhead)")  # fmt: skip
TRAIN_PROVIDERS = ("sdpa", "fastbert", "sdpa+cudagraph", "fastbert+cudagraph")
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# The H100 targets, printed beside the results (never asserted by a test).
TARGETS = (
    ("infer", "base", "float16", 32, 512, "full", "fastbert", "torch.compile", 1.15),
    ("infer", "base", "float16", 32, 512, "full", "fastbert", "eager", 2.0),
    ("infer", "base", "float16", 32, 512, "varlen", "fastbert", "torch.compile", 1.8),
    ("train", "base", "bf16-autocast", 32, 512, "full", "fastbert", "sdpa", 1.25),
    # the same target for the step captured in a CUDA graph (which removes the host time that bounds it)
    ("train", "base", "bf16-autocast", 32, 512, "full", "fastbert+cudagraph", "sdpa", 1.25),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="infer,train", help="comma list of infer, train, ops (default infer,train)")
    p.add_argument("--model", default="base", help="comma list of base, large (default base)")
    p.add_argument("--dtype", default="fp16,bf16", help="inference dtypes: comma list of fp16, bf16")
    p.add_argument("--batch", default="1,8,32", help="inference batch sizes (training uses 32)")
    p.add_argument("--seq", default="128,512", help="sequence lengths")
    p.add_argument("--lengths", default="full,varlen", help="full: every sequence full; varlen: uniform seq/4..seq")
    p.add_argument("--providers", default=None,
                   help=f"comma list (default all); inference: {', '.join(INFER_PROVIDERS)}; training: "
                   f"{', '.join(TRAIN_PROVIDERS)} (each suite runs the ones it has)")  # fmt: skip
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile provider's mode")
    p.add_argument("--quick", action="store_true",
                   help="BERT-base fp16: batch 32 x seq 512, and batch 1 x seq 128 without torch.compile")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU (Triton interpreter): no timing value")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>/)")


def quick_batch1_args(args: argparse.Namespace) -> argparse.Namespace:
    """--quick's second inference run: batch 1 x seq 128, all full, for the CUDA-graph target. It leaves out the
    torch.compile (max-autotune) provider: recompiling and autotuning it for this shape took 64 of --quick's
    ~170 s on the H100 (2026-11-25), and no --quick target compares with it here (the graph target's peer is
    torch.compile(reduce-overhead)). The full suite times it at every shape."""
    providers = _csv(args.providers) if args.providers else list(INFER_PROVIDERS)
    changes = {"batch": "1", "seq": "128", "lengths": "full",
               "providers": ",".join(p for p in providers if p != "torch.compile")}  # fmt: skip
    return argparse.Namespace(**{**vars(args), **changes})


def suite_providers(args: argparse.Namespace, known: tuple[str, ...]) -> list[str]:
    """The providers a suite runs: those of --providers that it has (main refuses names no suite has), else all."""
    return [p for p in _csv(args.providers) if p in known] if args.providers else list(known)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# ----------------------------------------------------------------------------------------------- setup
def _config(name: str, dry: bool):
    from transformers import BertConfig

    if dry:
        return BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    if name == "large":
        return BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    return BertConfig()


def _batches(B: int, S: int, lengths: str, vocab: int, device: str, n: int = 3):
    """n batches (ids, mask) with the same lengths (so they cost the same) and different tokens."""
    import torch

    g = torch.Generator().manual_seed(1000 * B + S)
    if lengths == "varlen":
        lens = torch.randint(max(1, S // 4), S + 1, (B,), generator=g)
    else:
        lens = torch.full((B,), S)
    mask = (torch.arange(S)[None, :] < lens[:, None]).long()
    out = [((torch.randint(1000 if vocab > 2000 else 5, vocab, (B, S), generator=g) * mask).to(device),
            mask.to(device)) for _ in range(n)]  # fmt: skip
    return out, int(lens.sum())


def _timer(dry: bool) -> Callable:
    if dry:

        def wall(fn) -> dict:
            fn()
            t = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t) * 1e3
            return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}

        return wall
    from fastbert import benchtools

    return lambda fn: benchtools.time_ms(fn, warmup=25, rep=200)


def _check(out, ref, eager, valid) -> tuple[bool, float, float]:
    """The test suite's rule on the real tokens: err <= 2x eager's err + 5e-3 (fp32: 1e-4 relative to scale)."""
    import torch

    a, r, e = out[valid].double(), ref[valid].double(), eager[valid].double()
    err, eager_err = (a - r).abs().max().item(), (e - r).abs().max().item()
    atol = 5e-3 if out.dtype != torch.float32 else 1e-4
    return bool(torch.isfinite(a).all()) and err <= 2 * eager_err + atol, err, eager_err


# ----------------------------------------------------------------------------------------------- inference
def _graphed(model, ids, mask):
    """model(ids, mask) captured in a CUDA graph; returns replay() -> last_hidden_state (static buffers)."""
    import torch

    static_ids, static_mask = ids.clone(), mask.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(input_ids=static_ids, attention_mask=static_mask)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(input_ids=static_ids, attention_mask=static_mask).last_hidden_state

    def replay(new_ids=None):
        if new_ids is not None:
            static_ids.copy_(new_ids)
        graph.replay()
        return out

    return replay


def bench_infer(args, model_name: str, dtype_name: str, rows: list, emit: Callable) -> None:
    import torch
    from transformers import BertModel

    import fastbert

    dev = "cpu" if args.dry_run else "cuda"
    dtype = getattr(torch, DTYPES[dtype_name])
    cfg = _config(model_name, args.dry_run)
    torch.manual_seed(0)
    ref32 = BertModel(cfg, add_pooling_layer=False).to(dev).eval()
    wanted = suite_providers(args, INFER_PROVIDERS)
    if args.dry_run:
        wanted = [p for p in wanted if p in ("eager", "sdpa", "fastbert")]
    models = {}
    for impl in ("eager", "sdpa"):
        m = copy.deepcopy(ref32).to(dtype)
        m.set_attn_implementation(impl)
        models[impl] = m
    fast = fastbert.optimize(copy.deepcopy(models["sdpa"]))
    timer = _timer(args.dry_run)
    shapes = [(b, s) for b in map(int, _csv(args.batch)) for s in map(int, _csv(args.seq))]
    for B, S in shapes:
        compiled = {}
        for lengths in _csv(args.lengths):
            batches, real = _batches(B, S, lengths, cfg.vocab_size, dev)
            ids, mask = batches[0]
            valid = mask.bool()
            with torch.no_grad():
                ref = ref32(input_ids=ids, attention_mask=mask).last_hidden_state
                eager_out = models["eager"](input_ids=ids, attention_mask=mask).last_hidden_state
            for prov in wanted:
                base = {"suite": "infer", "model": model_name, "provider": prov, "dtype": str(dtype)[6:],
                        "batch": B, "seq": S, "lengths": lengths, "mode": "infer", "real_tokens": real}  # fmt: skip
                try:
                    fn = _infer_fn(prov, models, fast, compiled, args, ids, mask, batches)
                    with torch.no_grad():
                        ok, err, eager_err = _check(fn(ids, mask), ref, eager_out, valid)
                    if not ok:
                        emit(rows, base | {"status": "failed check", "err": err, "eager_err": eager_err})
                        continue
                    state = {"i": 0}

                    def call(fn=fn, state=state, batches=batches):
                        state["i"] += 1
                        i, m = batches[state["i"] % len(batches)]
                        return fn(i, m)

                    with torch.no_grad():
                        t = timer(call)
                    emit(rows, base | t | {"status": "ok", "err": err, "eager_err": eager_err,
                                           "tokens_per_s": real / t["median_ms"] * 1e3})  # fmt: skip
                except Exception as e:  # noqa: BLE001 - a provider that cannot run is a result, not a crash
                    emit(rows, base | {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})


def _infer_fn(prov, models, fast, compiled, args, ids, mask, batches):
    import torch

    if prov in ("eager", "sdpa"):
        m = models[prov]
        return lambda i, a: m(input_ids=i, attention_mask=a).last_hidden_state
    if prov == "fastbert":
        return lambda i, a: fast(input_ids=i, attention_mask=a).last_hidden_state
    if prov == "torch.compile":
        if "max" not in compiled:
            compiled["max"] = torch.compile(copy.deepcopy(models["sdpa"]), mode=args.compile_mode, dynamic=False)
        m = compiled["max"]
        return lambda i, a: m(input_ids=i, attention_mask=a).last_hidden_state
    if prov == "torch.compile(reduce-overhead)":
        if "ro" not in compiled:
            compiled["ro"] = torch.compile(copy.deepcopy(models["sdpa"]), mode="reduce-overhead", dynamic=False)
        m = compiled["ro"]
        return lambda i, a: m(input_ids=i, attention_mask=a).last_hidden_state.clone()
    if prov == "fastbert+cudagraph":
        with torch.no_grad():
            replay = _graphed(fast, ids, mask)
        return lambda i, a: replay(i)
    raise ValueError(f"unknown provider {prov!r}; known: {', '.join(INFER_PROVIDERS)}")


# ----------------------------------------------------------------------------------------------- training
def _graphed_train_step(body: Callable, opt, batch) -> tuple[Callable, float]:
    """One training step, ``body(ids, mask)`` (forward, backward, optimizer step; returns the loss), captured in a
    CUDA graph over static input buffers, as PyTorch's whole-network capture does it: a few eager steps on a
    side stream first (Triton compiles, autotunes and the optimizer makes its state there), gradients set to
    None before the capture so that the captured backward allocates them in the graph's pool and each replay
    overwrites them. fastbert's dropout draws its seeds on the device, so every replay drops afresh. Padded
    batches run the padded-mask path in the graph (packing the tokens needs their count on the host). Returns
    (replay(ids, mask) -> loss, the first eager step's loss)."""
    import torch

    static_ids, static_mask = (t.clone() for t in batch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            loss = body(static_ids, static_mask)
            if i == 0:
                first_loss = loss.item()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = body(static_ids, static_mask)

    def replay(ids, mask):
        static_ids.copy_(ids)
        static_mask.copy_(mask)
        graph.replay()
        return static_loss

    return replay, first_loss


def bench_train(args, model_name: str, rows: list, emit: Callable) -> None:
    import torch
    from transformers import BertForPreTraining

    import fastbert

    dev = "cpu" if args.dry_run else "cuda"
    cfg = _config(model_name, args.dry_run)
    B = 2 if args.dry_run else 32
    timer = _timer(args.dry_run)
    providers = suite_providers(args, TRAIN_PROVIDERS)
    if args.dry_run:  # no CUDA graphs on the CPU
        providers = [p for p in providers if not p.endswith("+cudagraph")]
    # The dry run trains under fp16 autocast: Triton's interpreter keeps bf16 as raw bits, so a kernel's bf16
    # arithmetic there is garbage (inf / NaN losses), while fp16 runs right.
    amp_dtype, amp_name = (torch.float16, "fp16-autocast") if args.dry_run else (torch.bfloat16, "bf16-autocast")
    for S in (32,) if args.dry_run else map(int, _csv(args.seq)):
        for lengths in _csv(args.lengths):
            batches, real = _batches(B, S, lengths, cfg.vocab_size, dev)
            losses = {}
            for prov in providers:
                base = {"suite": "train", "model": model_name, "provider": prov, "dtype": amp_name,
                        "batch": B, "seq": S, "lengths": lengths, "mode": "train", "real_tokens": real}  # fmt: skip
                try:
                    torch.manual_seed(0)
                    m = BertForPreTraining(cfg).to(dev).train()
                    m.set_attn_implementation("sdpa")
                    if prov.startswith("fastbert"):
                        fastbert.optimize(m)
                    graphed = prov.endswith("+cudagraph")
                    # capturable: a captured step keeps the optimizer's step count on the device
                    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=dev == "cuda", capturable=graphed)
                    state = {"i": 0}

                    def body(ids, mask, m=m, opt=opt):
                        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
                        with torch.autocast(dev, dtype=amp_dtype):
                            loss = m(input_ids=ids, attention_mask=mask, labels=labels,
                                     next_sentence_label=torch.zeros(B, dtype=torch.long, device=dev)).loss  # fmt: skip
                        loss.backward()
                        opt.step()
                        return loss

                    replay = None
                    if graphed:
                        replay, first_loss = _graphed_train_step(body, opt, batches[0])

                        def step(replay=replay, state=state, batches=batches):
                            ids, mask = batches[state["i"] % len(batches)]
                            state["i"] += 1
                            return replay(ids, mask)
                    else:

                        def step(body=body, opt=opt, state=state, batches=batches):
                            ids, mask = batches[state["i"] % len(batches)]
                            state["i"] += 1
                            loss = body(ids, mask)
                            opt.zero_grad(set_to_none=True)
                            return loss

                        first_loss = step().item()
                    losses[prov] = first_loss
                    # dropout differs between providers: the first losses agree only statistically
                    first = next(iter(losses.values()))
                    ok = math.isfinite(losses[prov]) and abs(losses[prov] - first) < 0.05 * abs(first)
                    if not ok:
                        emit(rows, base | {"status": "failed check", "first_loss": losses[prov]})
                        continue
                    if dev == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t = timer(step)
                    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
                    emit(rows, base | t | {"status": "ok", "first_loss": losses[prov], "peak_mem_bytes": peak,
                                           "tokens_per_s": real / t["median_ms"] * 1e3})  # fmt: skip
                    # (a captured graph holds its memory pool until the step closure holding it goes)
                    del m, opt, body, step, replay
                    if dev == "cuda":
                        torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001
                    emit(rows, base | {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})


# ----------------------------------------------------------------------------------------------- ops, output
def bench_ops(args) -> int:
    """Run the per-op benchmark scripts of the source checkout fastbert is installed from."""
    import pathlib
    import subprocess
    import sys

    folder = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = sorted(folder.glob("bench_*.py"))
    if not scripts:
        print("fastbert bench --suite ops: the per-op scripts live in a source checkout's benchmarks/ (not found)")
        return 0
    rc = 0
    for script in scripts:
        cmd = [sys.executable, str(script), *(["--quick"] if args.quick else []), *(["--out", args.out] if args.out
               else [])]  # fmt: skip
        print(f"== {script.name}", flush=True)
        rc |= subprocess.run(cmd).returncode
    return rc


_START = time.perf_counter()


def _emit(rows: list, row: dict) -> None:
    """Record a measurement and print it as a table row, prefixed with its number and the elapsed time (the
    progress display: a full run takes a while)."""
    rows.append(row)
    progress = f"[{len(rows):3d} {time.perf_counter() - _START:5.0f}s]"
    if row.get("status") == "ok":
        tail = f"{row['median_ms']:9.3f} ms  {row['tokens_per_s'] / 1e3:9.1f} k tok/s"
        if "peak_mem_bytes" in row:
            tail += f"  peak {row['peak_mem_bytes'] / 2**30:5.2f} GiB"
    else:
        tail = row["status"]
    print(f"{progress} {row['suite']:5s} {row['model']:5s} {row['dtype']:13s} B{row['batch']:<3d} S{row['seq']:<4d} "
          f"{row['lengths']:6s} {row['provider']:30s} {tail}", flush=True)  # fmt: skip


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for suite, model, dtype, B, S, lengths, prov, other, goal in TARGETS:
        key = {"suite": suite, "model": model, "dtype": dtype, "batch": B, "seq": S, "lengths": lengths}

        def ms(p, key=key):
            r = next((r for r in rows if r.get("status") == "ok" and r["provider"] == p and all(
                r.get(k) == v for k, v in key.items())), None)  # fmt: skip
            return r and r["median_ms"]

        a, b = ms(prov), ms(other)
        if a and b:
            ratio = b / a
            lines.append(f"target {suite} {model} {dtype} B{B} S{S} {lengths}: {prov} vs {other} >= {goal}x: "
                         f"{ratio:.2f}x ({'met' if ratio >= goal else 'MISSED'})")  # fmt: skip
    g = next((r for r in rows if r.get("status") == "ok" and r["provider"] == "fastbert+cudagraph"
              and r["batch"] == 1 and r["seq"] == 128 and r["model"] == "base"), None)  # fmt: skip
    if g:
        lines.append(f"target infer base B1 S128 fastbert+cudagraph <= 0.5 ms: {g['median_ms']:.3f} ms "
                     f"({'met' if g['median_ms'] <= 0.5 else 'MISSED'})")  # fmt: skip
    return lines


def _plot(rows: list[dict], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if r.get("status") == "ok"]
    groups = list(dict.fromkeys((r["suite"], r["model"], r["dtype"], r["batch"], r["seq"], r["lengths"]) for r in ok))
    provs = list(dict.fromkeys(r["provider"] for r in ok))
    if not groups:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    w = 0.8 / max(1, len(provs))
    for j, p in enumerate(provs):
        vals = [next((r["tokens_per_s"] for r in ok if r["provider"] == p and (r["suite"], r["model"], r["dtype"],
                r["batch"], r["seq"], r["lengths"]) == g), 0) / 1e3 for g in groups]  # fmt: skip
        ax.bar([i + j * w for i in range(len(groups))], vals, w, label=p)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{g[0]} {g[1]}\n{g[2][:4]} B{g[3]} S{g[4]}\n{g[5]}" for g in groups], fontsize=7)
    ax.set_ylabel("k tokens/s (real tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> int:
    unknown = [p for p in _csv(args.providers or "") if p not in (*INFER_PROVIDERS, *TRAIN_PROVIDERS)]
    if unknown:
        print(f"fastbert bench: unknown provider(s) {', '.join(unknown)}; inference: {', '.join(INFER_PROVIDERS)}; "
              f"training: {', '.join(TRAIN_PROVIDERS)}")  # fmt: skip
        return 2
    if args.dry_run:
        from fastbert.ops._common import interpreting

        if not interpreting() and any(name.startswith("fastbert.kernels.") for name in sys.modules):
            # Triton picks compiled or interpreted kernels when their module is imported: too late here.
            msg = "the kernels were already imported for the GPU in this process; the dry run needs Triton's"
            print(f"fastbert bench --dry-run: {msg} interpreter (a fresh process, or TRITON_INTERPRET=1 set first)")
            return 1
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("fastbert bench: no CUDA device here; timing needs a GPU (try --dry-run to exercise the pipeline).")
        return 0
    suites = _csv(args.suite)
    if args.quick:
        args.model, args.dtype, args.batch, args.seq = "base", "fp16", "32", "512"
    if args.dry_run:
        args.model, args.batch, args.seq = "base", "2", "32"
    rc = bench_ops(args) if "ops" in suites and not args.dry_run else 0
    from fastbert import benchtools

    extra = {}
    if not args.dry_run:
        extra = {"copy_gbps": benchtools.copy_bandwidth_gbps(), "bf16_matmul_tflops": _matmul_tflops()}
        print(f"ceilings: copy {extra['copy_gbps']:.0f} GB/s, bf16 matmul {extra['bf16_matmul_tflops']:.0f} TFLOP/s")
    rows: list[dict] = []
    for model_name in _csv(args.model):
        if "infer" in suites:
            for dtype_name in ["fp16"] if args.dry_run else _csv(args.dtype):
                bench_infer(args, model_name, dtype_name, rows, _emit)
                if args.quick and not args.dry_run:  # batch-1 latency, the CUDA-graph target
                    bench_infer(quick_batch1_args(args), model_name, dtype_name, rows, _emit)
        if "train" in suites:
            bench_train(args, model_name, rows, _emit)
    if rows:
        cols = ["suite", "model", "dtype", "batch", "seq", "lengths", "provider", "median_ms", "tokens_per_s",
                "peak_mem_bytes", "status"]  # fmt: skip
        settings = {k: v for k, v in vars(args).items() if not callable(v)}  # `fastbert bench` adds its handler
        from fastbert.kernels.attention import tuned_tiles  # (what attention's timing chose: README "Tuned configs")

        extra |= {"args": settings, "attention_tiles": tuned_tiles()}
        path = benchtools.write_results("bert", rows, args.out, cols, extra=extra)
        _plot(rows, path.with_suffix(".png"))
        for line in targets(rows):
            print(line)
    failed = [r for r in rows if r.get("status") != "ok"]
    return 1 if (args.dry_run and failed) else rc


def _matmul_tflops() -> float:
    import torch

    from fastbert import benchtools

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / benchtools.time_ms(lambda: a @ b)["median_ms"] / 1e9


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="fastbert bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
