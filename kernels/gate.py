"""The GPU compile gate's registry: every kernel module of fastbert, and how to compile one case for a GPU
target on a machine without one.

A kernel module joins the gate by being listed in KERNEL_MODULES and defining ``gate_cases() -> list[GateCase]``
that enumerates every compilation its launchers may request (block sizes, dtypes, flags, warps, stages).
tests/test_compile.py compiles each case for sm_80 and sm_90 with ``triton.compile(ASTSource, GPUTarget)``
(ptxas runs on the CPU) and fails on a compile error, shared memory above the target's limit, a spill or
warp-group MMAs that ptxas serialises.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import tempfile

KERNEL_MODULES = (
    "fastbert.kernels.add_layer_norm",
    "fastbert.kernels.linear_gelu",
    "fastbert.kernels.linear_gelu_sm90",
    "fastbert.kernels.attention",
    "fastbert.kernels.attention_bwd",
    "fastbert.kernels.linear_cross_entropy",
)

# Shared memory a block may use after opting in (cudaFuncAttributeMaxDynamicSharedMemorySize), in bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
# At most this many tl.constexpr globals a kernel: each costs ~0.35 us of host time a launch on the development
# machine (Triton's check that it did not change since the compile), where a fused op's whole host path is
# ~40 us. A named constant or two is cheap; linear_gelu's erfc fit as 13 globals cost it ~20% (literals since).
MAX_LAUNCH_GLOBALS = 2


@dataclasses.dataclass
class GateResult:
    name: str
    arch: int
    shared: int
    registers: int
    spill_stores: int  # STL instructions in the SASS: register spills to local memory
    wgmma: bool
    narrow_loads: int  # 2-byte global loads in the PTX (see narrow_loads)
    wgmma_serialized: str = ""  # ptxas's note when it serialises the warp-group MMAs (see wgmma_serialized)
    # The module globals (tl.constexpr) the kernel and its callees read: Triton compares each with its compiled
    # value on every launch, host time a launch (see MAX_LAUNCH_GLOBALS).
    launch_globals: list[str] = dataclasses.field(default_factory=list)


def all_cases(modules=KERNEL_MODULES):
    for mod_name in modules:
        yield from importlib.import_module(mod_name).gate_cases()


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """What the cuobjdump that ships with Triton prints for a cubin with these flags (-sass: the disassembly)."""
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spill stores) of a cubin: registers from cuobjdump's resource usage, spills as the
    local-memory stores (STL) in the SASS."""
    usage = cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump resource usage:\n{usage}")
    return int(m.group(1)), len(re.findall(r"\bSTL(?:\.\w+)*\s", cuobjdump(cubin, "-sass")))


def compile_for(case, arch: int):
    """The Triton compilation of one GateCase for sm_<arch> (no GPU needed), with the launch-time divisibility."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=divisibility_attrs(case))
    from fastbert.kernels.common import FP_FUSION

    options = {"num_warps": case.num_warps, "num_stages": case.num_stages, "enable_fp_fusion": FP_FUSION}
    if case.maxnreg is not None:
        options["maxnreg"] = case.maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def compile_case(case, arch: int) -> GateResult:
    """Compile one GateCase for sm_<arch> and report its resources."""
    compiled = compile_for(case, arch)
    regs, spills = _resource_usage(compiled.asm["cubin"])
    wgmma = "warp_group_dot" in compiled.asm["ttgir"] or "wgmma" in compiled.asm["ttgir"]
    ptx = compiled.asm["ptx"]
    serialized = wgmma_serialized(ptx, arch) if wgmma else ""
    launch_globals = sorted({name for name, _ in getattr(case.fn, "used_global_vals", {})})  # set by the compile
    return GateResult(case.name, arch, compiled.metadata.shared, regs, spills, wgmma, narrow_loads(ptx), serialized,
                      launch_globals)  # fmt: skip


def wgmma_serialized(ptx: str, arch: int) -> str:
    """ptxas's "Potential Performance Loss: wgmma.mma_async instructions are serialized" note for a PTX listing,
    or "" without one. When ptxas cannot prove a warp-group MMA's accumulator untouched between issue and wait
    (for example a loop inside an if/else), it waits after every wgmma: the MMAs no longer overlap each other or
    the other work, a large slowdown that compiles without error or spill. ptxas only says so in its verbose
    log, which Triton discards (and a cached compilation never runs ptxas), so the PTX is assembled once more
    here (~0.1 s)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:
            ptxas = get_ptxas(arch)
        except TypeError:  # (Triton 3.4's get_ptxas takes no architecture)
            ptxas = get_ptxas()
        cmd = [ptxas.path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return "\n".join(line.split(": ", 1)[-1] for line in log.splitlines() if "are serialized" in line)


def divisibility_attrs(case) -> dict[tuple[int, ...], list]:
    """ASTSource attrs marking case.divisible as divisible by 16 (what Triton's launcher passes for a pointer
    that is 16-byte aligned or an integer that is a multiple of 16)."""
    names = case.fn.arg_names
    unknown = set(case.divisible) - set(names)
    if unknown:
        raise ValueError(f"{case.name}: divisible names unknown arguments {sorted(unknown)}")
    return {(names.index(n),): [["tt.divisibility", 16]] for n in case.divisible}


def narrow_loads(ptx: str) -> int:
    """Global loads of a single 2-byte element in a PTX listing: the sign of a 16-bit tile loaded element by
    element (no cp.async, no vector loads) instead of up to 16 bytes a thread. (cp.async copies of 4 or 8 bytes
    are not counted: a tile with fewer elements than 8 a thread, or an fp32 row vector, legitimately uses them.)"""
    return len(re.findall(r"\bld\.global(?:\.[a-z0-9_:]+)*\.[bfu]16\s", ptx))


def _compile_one(args: tuple[tuple[str, ...], int, int]) -> dict:
    modules, index, arch = args
    case = list(all_cases(modules))[index]
    try:
        return dataclasses.asdict(compile_case(case, arch)) | {"error": None}
    except Exception as e:  # noqa: BLE001 - a compile failure is the gate's finding, reported per case
        return {"name": case.name, "arch": arch, "error": f"{type(e).__name__}: {e}"[-4000:]}


def run_gate(jobs: int | None = None, modules: tuple[str, ...] = KERNEL_MODULES) -> list[dict]:
    """Compile every case for every arch in worker processes; one dict per (case, arch)."""
    import concurrent.futures
    import multiprocessing

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile gate needs real @triton.jit functions: unset TRITON_INTERPRET")
    cases = list(all_cases(modules))
    work = [
        (modules, i, arch) for i, case in enumerate(cases) for arch in ARCHS if case.archs is None or arch in case.archs
    ]
    jobs = jobs or os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(_compile_one, work, chunksize=4))


if __name__ == "__main__":
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description="Compile every fastbert kernel for sm_80 and sm_90 on this CPU.")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument(
        "--module",
        action="append",
        help="only this kernel module (repeatable; attention is fastbert.kernels.attention and _bwd)",
    )
    ns = parser.parse_args()
    t0 = time.time()
    results = run_gate(ns.jobs, tuple(ns.module) if ns.module else KERNEL_MODULES)
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(results, f, indent=1)
    for r in results:
        state = (
            r["error"].splitlines()[0][:100]
            if r["error"]
            else f"shared={r['shared']} regs={r['registers']} spills={r['spill_stores']} narrow={r['narrow_loads']}"
        )
        print(f"sm_{r['arch']} {r['name']:48s} {state}")
    print(f"{len(results)} compilations in {time.time() - t0:.1f}s")
