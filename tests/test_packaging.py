"""Packaging: kernels/ is installed only as fastbert.kernels, never as a top-level `kernels` (HuggingFace's
hub-kernels package owns that name and transformers probes for it), and importing fastbert does no work."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_transformers_and_fastbert_import_together_from_repo_root():
    # From the repository root the folder kernels/ is importable as `kernels`: transformers must not trip on it.
    code = (
        "from transformers import BertModel\n"
        "import fastbert\n"
        "from fastbert import ops\n"
        "import transformers.utils.import_utils as iu\n"
        "assert not iu.is_kernels_available(), 'transformers took fastbert/kernels for hub kernels'\n"
        "print('ok')\n"
    )
    proc = _run(code, ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_no_top_level_kernels_module_installed(tmp_path):
    code = "import importlib.util, fastbert.kernels\nprint(importlib.util.find_spec('kernels'))"
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "None"


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
