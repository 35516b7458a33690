"""fastbert.kernels: Triton kernels and their launchers (installed from the top-level folder kernels/).

Deliberately empty: no imports and no side effects. This folder is installed as ``fastbert.kernels`` only (see
pyproject.toml), and every import of it is absolute, ``fastbert.kernels.<op>``.
"""
