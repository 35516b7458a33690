"""Test harness: picks the device and makes Triton's kernels runnable on a machine without a GPU.

With CUDA the real kernels run on the GPU. Without it TRITON_INTERPRET=1 is set here, before any test module
imports fastbert's kernels (fastbert itself imports Triton lazily), so the same Triton code runs on CPU tensors
through Triton's interpreter. Tests marked `gpu` need CUDA and are skipped, with that reason, elsewhere.
"""

import json
import os
import subprocess
import sys
import tempfile

# The tests use fastbert as installed. `python -m pytest` in the checkout puts its root first on sys.path, where the
# folder kernels/ would answer `import kernels` in place of HuggingFace's hub-kernels, which transformers (>= 5.25)
# imports with its models (fastbert/_shadow.py): the root goes, before anything imports transformers.
_ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path[:] = [p for p in sys.path if not (isinstance(p, str) and os.path.realpath(p or os.curdir) == _ROOT)]

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    # One intra-op thread, here and in the subprocesses tests start: the compile gate's subprocess compiles beside
    # the suite on every core, and a second thread only spun against it (on 2 cores the CPU fine-tune test took
    # 94 s in the suite, 12 s alone); the same count whether or not the gate runs, so a rerun sums alike.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Kernel outputs start as NaN (fastbert.kernels.common.empty): an element a kernel forgets to write fails.
os.environ["FASTBERT_POISON"] = "1"

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def interpreter_breaks_on_numpy() -> bool:
    """Triton 3.6's interpreter turns a loop bound into an int with int(array of shape (1,)), which numpy 2.4
    rejects (2.3 warns; checked with 2.3.5 and 2.4.6; 3.7's interpreter squeezes first): every kernel with a
    runtime loop bound fails there (the H100 image has both).
    Tests that start a fresh process in the interpreter on a GPU machine skip there."""
    import inspect

    import numpy
    import triton.runtime.interpreter as interpreter

    new_numpy = numpy.lib.NumpyVersion(numpy.__version__) >= "2.4.0"
    return new_numpy and "int(self.handle.data))" in inspect.getsource(interpreter)


def run_benchmark_script(name: str, *args: str) -> str:
    """stdout of benchmarks/<name> run in a fresh process without TRITON_INTERPRET (the tools that compile for a
    GPU or use Triton's compiled launch path; this session's interpreter would replace them). Fails on a non-zero
    exit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", name)
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=600,
                          check=True).stdout  # fmt: skip


def graph_replays(monkeypatch, ops_module, step, replays: int = 2):
    """step() (an op's forward and backward with dropout) captured in a CUDA graph after one warm-up call on a side
    stream (Triton compiles there), replayed ``replays`` times. ops_module's draw_seed is wrapped to remember the
    seed tensors it draws (inside the graph: buffers each replay rewrites). Yields, after each replay, (step's
    outputs, the value of the last seed drawn), for checks against the reference with that seed's keep-mask."""
    seeds = []
    real_draw = ops_module.draw_seed
    monkeypatch.setattr(ops_module, "draw_seed", lambda device: seeds.append(real_draw(device)) or seeds[-1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        yield outputs, int(seeds[-1].item())


@pytest.fixture
def device() -> torch.device:
    return DEVICE


# trylast: after pytest's own -k / -m / --deselect filtering (a conftest hook otherwise runs before it), so that a
# run that deselects the compile gate does not start it
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # The compile gate (tests/test_compile.py) compiles in a subprocess started now, overlapping the other tests
    # (which run in this process, mostly on one core); its tests go last and wait for the results.
    # Under pytest-xdist every worker collects every test: none starts the gate here (one that runs a gate test
    # starts it then, gate_results), where each would start its own on every core.
    gate_items = [i for i in items if i.path.name == "test_compile.py"]
    if gate_items:
        items[:] = [i for i in items if i.path.name != "test_compile.py"] + gate_items
        if "PYTEST_XDIST_WORKER" not in os.environ:
            _start_gate(jobs=os.cpu_count() or 1)


_GATE: dict = {}


def _start_gate(jobs: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tempfile.NamedTemporaryFile(prefix="fastbert-gate-", suffix=".json", delete=False)
    out.close()
    _GATE["out"] = out.name
    _GATE["proc"] = subprocess.Popen(
        [sys.executable, "-m", "fastbert.kernels.gate", "--jobs", str(jobs), "--out", out.name],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def gate_results() -> list[dict]:
    """Wait for the compile gate's subprocess and return its results (one dict per kernel case and arch)."""
    if "results" not in _GATE:
        if "proc" not in _GATE:
            # (an xdist worker's share of the cores: each worker that runs a gate test compiles its own)
            _start_gate(jobs=max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
        log, _ = _GATE["proc"].communicate()
        if _GATE["proc"].returncode != 0:
            raise RuntimeError(f"the compile gate failed to run:\n{log[-6000:]}")
        with open(_GATE["out"]) as f:
            _GATE["results"] = json.load(f)
        os.unlink(_GATE["out"])
    return _GATE["results"]


def pytest_unconfigure(config):
    proc = _GATE.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
