"""Packaging: kernels/ is installed only as fastbert.kernels, never as a top-level `kernels` (HuggingFace's
hub-kernels package owns that name and transformers probes for it), and importing fastbert does no work."""

import ast
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    # Without PYTHONSAFEPATH, so that `python -c` puts its working directory first on sys.path, as a user's does.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_no_top_level_kernels_module_installed(tmp_path):
    # fastbert's installed files and its editable finder expose no top-level `kernels`; what `import kernels` finds
    # outside the checkout is HuggingFace's hub-kernels (transformers >= 5.25 depends on it) or nothing.
    code = (
        "import importlib.util, fastbert.kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec is not None else None)\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = proc.stdout.strip()
    if _hub_kernels_installed():
        hub = pathlib.Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
        assert pathlib.Path(origin).resolve() == hub, (origin, hub)
    else:
        assert origin == "None"
    dist = importlib.metadata.distribution("fastbert")
    tops = {pathlib.PurePath(str(f)).parts[0] for f in dist.files or []}
    assert "kernels" not in tops, sorted(tops)
    assert "kernels" not in (dist.read_text("top_level.txt") or "").split()
    for f in dist.files or []:
        if f.name.startswith("__editable__") and f.name.endswith("_finder.py"):
            tree = ast.parse(pathlib.Path(dist.locate_file(f)).read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.AnnAssign | ast.Assign) and isinstance(node.value, ast.Dict):
                    keys = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
                    assert not {k for k in keys if k == "kernels" or str(k).startswith("kernels.")}, keys


def test_fastbert_and_transformers_from_repo_root():
    # Python started in the checkout's root (`python -c`): the folder kernels/ answers `import kernels`. With
    # HuggingFace's hub-kernels installed that breaks transformers' model imports, and `import fastbert` must say so
    # (fastbert/_shadow.py); without it transformers finds no version for the folder and must leave it alone.
    code = (
        "import json, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastbert\n"
        "    from fastbert import ops\n"
        "names = [type(w.message).__name__ for w in caught]\n"
        "text = [str(w.message) for w in caught]\n"
        "try:\n"
        "    from transformers import BertModel\n"
        "    imported = True\n"
        "except ImportError:\n"
        "    imported = False\n"
        "print(json.dumps({'warnings': names, 'text': text, 'bert': imported}))\n"
    )
    proc = _run(code, ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if _hub_kernels_installed():
        assert got["warnings"] == ["ShadowedHubKernelsWarning"], got
        assert "PYTHONSAFEPATH=1" in got["text"][0] and str(ROOT / "kernels") in got["text"][0], got
    else:
        assert got["warnings"] == [] and got["bert"], got


def test_python_m_fastbert_from_repo_root_drops_the_root():
    # `python -m fastbert ...` in the checkout's root: fastbert is the program, so while its package imports
    # (sys.argv[0] is "-m") it takes the root off sys.path and transformers' models import. The -m start is
    # simulated here (sys.orig_argv, sys.argv) to import transformers' BERT cheaply in the same process.
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "sys.orig_argv, sys.argv = [sys.executable, '-m', 'fastbert', 'bench'], ['-m']\n"
        "import fastbert\n"
        "sys.argv = ['fastbert']\n"
        "from transformers import BertModel\n"
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print('ok', spec.origin if spec is not None else None)\n"
    )
    proc = _run(code, ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert out[0] == "ok", proc.stdout
    if _hub_kernels_installed():
        assert pathlib.Path(out[1]).resolve() != ROOT / "kernels" / "__init__.py", out


def test_kernels_init_has_no_imports_or_statements():
    tree = ast.parse((ROOT / "kernels" / "__init__.py").read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert body == [], "kernels/__init__.py must hold nothing but its docstring"


def test_no_relative_imports_in_package():
    for path in [*(ROOT / "fastbert").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.relative_to(ROOT)}: relative import"
                assert not (node.module or "").startswith("kernels"), f"{path.relative_to(ROOT)}: top-level kernels"
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "kernels" for a in node.names), str(path)


def test_import_fastbert_does_not_import_triton_or_touch_cuda(tmp_path):
    code = (
        "import sys, torch\n"
        "import fastbert\n"
        "assert 'triton' not in sys.modules, 'import fastbert imported triton'\n"
        "assert not torch.cuda.is_initialized(), 'import fastbert initialised CUDA'\n"
        "print('ok')\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
