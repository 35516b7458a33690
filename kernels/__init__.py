"""fastbert.kernels: Triton kernels and their launchers (installed from the top-level folder kernels/).

Deliberately empty: no imports and no side effects. This folder is installed as ``fastbert.kernels`` only (see
pyproject.toml), and every import of it is absolute, ``fastbert.kernels.<op>``.

An ImportError naming this file as ``kernels`` (``cannot import name 'CUDAProperties' from 'kernels'``, from
transformers) means Python was started in fastbert's source checkout: its root is on sys.path, and this folder hides
HuggingFace's hub-kernels package. Start Python elsewhere or set PYTHONSAFEPATH=1 (see fastbert/_shadow.py).
"""
