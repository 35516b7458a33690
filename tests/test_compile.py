"""GPU compile gate: every Triton kernel of fastbert, in every configuration its launchers may pick, compiled for
sm_80 and sm_90 on this machine (no GPU needed: ptxas runs on the CPU). Fails on a compile error, on shared
memory above the target's limit, on a register spill, on a 16-bit GEMM that does not use warp-group MMA on
sm_90, on warp-group MMAs that ptxas serialises (one wait after each: no overlap), on 16-bit tiles loaded
element by element where a case promises 16-byte loads, and on more registers a thread than a case's sm_90
budget (the occupancy its config was chosen for), and on more tl.constexpr globals than
MAX_LAUNCH_GLOBALS (host time on every launch). Each case compiles with the divisibility Triton's
launcher specialises at run time (tests/test_launch_spec.py checks that real launches match), so what the gate
checks is what runs.

Kernels join by listing their module in fastbert.kernels.gate.KERNEL_MODULES with a gate_cases() function. The
compilations run in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit functions),
started by conftest.py when the session begins so it overlaps the interpreter tests; these tests run last and
read its results.
"""

import json

import pytest
import triton

from conftest import gate_results
from fastbert.kernels import gate
from gate_findings import RECORDED, known_finding

CASES = list(gate.all_cases())


def _param(case, arch):
    test_id = f"sm{arch}-{case.name}"
    known = known_finding(test_id, triton.__version__)
    marks = () if known is None else pytest.mark.xfail(reason=known[0], strict=known[1])
    return pytest.param(case, arch, id=test_id, marks=marks)


@pytest.fixture(scope="session")
def results():
    by_key = {}
    for r in gate_results():
        by_key[(r["name"], r["arch"])] = r
    return by_key


def test_every_kernel_module_has_cases():
    import importlib

    for module in gate.KERNEL_MODULES:
        assert importlib.import_module(module).gate_cases(), f"{module} registers no compile cases"
    assert len({c.name for c in CASES}) == len(CASES), "gate case names must be unique"


@pytest.mark.parametrize(
    "case, arch",
    [_param(c, a) for c in CASES for a in gate.ARCHS if c.archs is None or a in c.archs],
)
def test_compiles_for_gpu(results, case, arch):
    r = results.get((case.name, arch))
    assert r is not None, f"the gate did not report {case.name} on sm_{arch}"
    assert r["error"] is None, r["error"]
    assert r["shared"] <= gate.SHARED_LIMIT[arch], f"shared memory {r['shared']} B > sm_{arch}'s limit"
    assert r["spill_stores"] == 0, f"{r['spill_stores']} register spill stores ({r['registers']} registers)"
    if arch == 90 and case.expect_wgmma_sm90:
        assert r["wgmma"], "expected warp-group MMA (wgmma) in the sm_90 TTGIR"
    assert not r["wgmma_serialized"], f"ptxas serialises the warp-group MMAs: {r['wgmma_serialized']}"
    if arch == 90 and case.max_registers_sm90 is not None:
        assert r["registers"] <= case.max_registers_sm90, (
            f"{r['registers']} registers a thread, above the {case.max_registers_sm90} this config's occupancy needs"
        )
    if arch == 90 and case.max_shared_sm90 is not None:
        assert r["shared"] <= case.max_shared_sm90, (
            f"{r['shared']} B of shared memory a block, above the {case.max_shared_sm90} this config's occupancy needs"
        )
    assert len(r["launch_globals"]) <= gate.MAX_LAUNCH_GLOBALS, (
        f"reads {len(r['launch_globals'])} tl.constexpr globals, each checked on every launch: {r['launch_globals']}"
    )
    if case.vector_loads:
        assert r["narrow_loads"] == 0, f"{r['narrow_loads']} 2-byte loads / small cp.async copies in the PTX"


def test_recorded_findings_name_gate_cases():
    """Every finding gate_findings lists for another Triton names a case and arch this gate compiles (a renamed
    or removed case must leave the list too)."""
    ids = {f"sm{a}-{c.name}" for c in CASES for a in gate.ARCHS if c.archs is None or a in c.archs}
    for minor, (release, findings) in RECORDED.items():
        assert release.startswith(f"{minor[0]}.{minor[1]}."), (minor, release)
        stale = sorted(set(findings) - ids)
        assert not stale, f"gate_findings lists cases the gate no longer has for Triton {release}: {stale}"


def test_known_finding_strict_only_for_the_recorded_release():
    test_id = "sm90-attention_dq-fp16-d64-drop0-m128n64w8s3"
    assert known_finding(test_id, "3.6.0")[1] is True
    assert known_finding(test_id, "3.6.1")[1] is False
    assert known_finding(test_id, "3.9.0") is None
    assert known_finding("sm80-not-a-case", "3.6.0") is None
    assert known_finding(test_id, "unknown") is None


def test_results_are_json_serialisable(results):
    json.dumps(list(results.values()))
