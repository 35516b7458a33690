"""Where a BERT-base forward / training step spends its time on a GPU, fastbert against SDPA: host time per call
and its top functions (cProfile) for batch-1 inference, and the kernels of one training step (torch.profiler,
device time per kernel name). A diagnostic, not a benchmark result.

    python benchmarks/profile_bert.py [--skip-train]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pathlib
import pstats
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402


def _host_profile(model, ids, mask, label: str) -> None:
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            model(input_ids=ids, attention_mask=mask)
        host = (time.perf_counter() - t) / 20 * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 20 * 1e3
        print(f"{label}: host {host:.3f} ms/forward, wall {wall:.3f} ms/forward", flush=True)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(10):
            model(input_ids=ids, attention_mask=mask)
        pr.disable()
        torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print("\n".join(s.getvalue().splitlines()[4:36]), flush=True)


def _kernel_table(step, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"--- {label}: one training step", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    harness.no_cuda_exit("profile_bert")
    print(harness.header())
    from transformers import BertConfig, BertForPreTraining, BertModel

    import fastbert

    cfg = BertConfig()
    torch.manual_seed(0)
    base = BertModel(cfg).to("cuda", torch.float16).eval()
    base.set_attn_implementation("sdpa")
    fast = fastbert.optimize(copy.deepcopy(base))
    ids = torch.randint(1000, cfg.vocab_size, (1, 128), device="cuda")
    mask = torch.ones_like(ids)
    _host_profile(base, ids, mask, "sdpa B1 S128")
    _host_profile(fast, ids, mask, "fastbert B1 S128")
    if args.skip_train:
        return
    B, S = 32, 512
    ids = torch.randint(1000, cfg.vocab_size, (B, S), device="cuda")
    mask = torch.ones_like(ids)
    labels = ids.clone()
    nsp = torch.zeros(B, dtype=torch.long, device="cuda")
    for prov in ("sdpa", "fastbert"):
        torch.manual_seed(0)
        m = BertForPreTraining(cfg).to("cuda").train()
        m.set_attn_implementation("sdpa")
        if prov == "fastbert":
            fastbert.optimize(m)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

        def step(m=m, opt=opt):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=nsp).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        _kernel_table(step, prov)
        del m, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
