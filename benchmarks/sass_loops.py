"""Instruction mix of each loop in the SASS of the compile gate's cases: static evidence about a kernel's inner
loop on a machine without a GPU (a diagnostic, not a benchmark).

Compiles the gate cases whose name matches a regular expression for sm_90 (or --arch) exactly as the gate does
(same signature, constexprs and launch-time divisibility), disassembles the cubin with the cuobjdump that ships
with Triton, and prints, for every backward branch (a loop) of at least --min instructions, its length and most
frequent opcodes. An inner loop that spends more issue slots on integer and predicate bookkeeping (LOP3, ISETP,
P2R, PLOP3) than on its float work and MMAs is the thing to look for; so is a count that grows after a change.

    python benchmarks/sass_loops.py 'attention_fwd-fp16-d64-drop0'
    python benchmarks/sass_loops.py 'linear_gelu' --arch 80 --top 20
"""

from __future__ import annotations

import argparse
import collections
import os
import re

_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x)([0-9a-f]+)")


def sass_of(case, arch: int) -> str:
    from fastbert.kernels import gate

    return gate.cuobjdump(gate.compile_for(case, arch).asm["cubin"], "-sass")


def loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """(first address, branch address, opcode counts) of each backward branch's body."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]
    found = []
    for addr, ins in code:
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) < addr:
            top = int(m.group(1), 16)
            body = [i for a, i in code if top <= a <= addr]
            # opcode without predicate guard and modifiers: "@!P0 LDGSTS.E.BYPASS.128 ..." -> LDGSTS
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in body)
            found.append((top, addr, ops))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pattern", help="regular expression over gate case names")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--min", type=int, default=30, help="smallest loop reported (instructions)")
    parser.add_argument("--top", type=int, default=14, help="opcodes listed per loop")
    ns = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    from fastbert.kernels import gate

    cases = [c for c in gate.all_cases() if re.search(ns.pattern, c.name) and (c.archs is None or ns.arch in c.archs)]
    if not cases:
        raise SystemExit(f"no gate case matches {ns.pattern!r} for sm_{ns.arch}")
    for case in cases:
        for top, addr, ops in loops(sass_of(case, ns.arch)):
            n = sum(ops.values())
            if n >= ns.min:
                mix = " ".join(f"{k}:{v}" for k, v in ops.most_common(ns.top))
                print(f"sm_{ns.arch} {case.name} loop {top:#x}-{addr:#x}: {n} instructions | {mix}", flush=True)


if __name__ == "__main__":
    main()
