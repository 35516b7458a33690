"""fastbert's source folder kernels/ found as the top-level module `kernels` (HuggingFace's hub-kernels package).

In a source checkout the folder kernels/ is installed as ``fastbert.kernels`` only. But Python started in the
checkout's root puts that directory first on sys.path (``python -c``, ``python -m``, a REPL, a notebook), and then
``import kernels`` finds the folder itself. transformers >= 5.25 depends on hub-kernels and imports it with its
models, so there ``from transformers import BertModel`` raises ImportError naming fastbert's kernels/__init__.py.

``check()`` runs at ``import fastbert``: it costs a spec lookup and does nothing unless that folder really shadows
an installed hub-kernels distribution. Then, when fastbert itself is the program (``python -m fastbert ...``: the
command reads nothing from the working directory), it takes the checkout's root off sys.path; imported as a
library it warns, naming the fix, and leaves the user's sys.path alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import warnings


class ShadowedHubKernelsWarning(UserWarning):
    """fastbert's kernels/ folder hides HuggingFace's hub-kernels package from `import kernels`."""


def _ours() -> str | None:
    """The file fastbert.kernels is loaded from (its __init__.py), or None."""
    spec = importlib.util.find_spec("fastbert.kernels")
    return os.path.realpath(spec.origin) if spec is not None and spec.origin else None


def _shadowing_entries(ours: str) -> list[str]:
    """The sys.path entries under which `kernels/__init__.py` is fastbert's own (`''` is the working directory)."""
    hits = []
    for entry in sys.path:
        if isinstance(entry, str):
            candidate = os.path.join(entry or os.getcwd(), "kernels", "__init__.py")
            if os.path.isfile(candidate) and os.path.realpath(candidate) == ours:
                hits.append(entry)
    return hits


def shadowed() -> tuple[list[str], str] | None:
    """(the sys.path entries that shadow, the hub-kernels version) when `import kernels` would load fastbert's
    folder although a hub-kernels distribution is installed; None otherwise."""
    ours = _ours()
    if ours is None:
        return None
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
    else:
        try:
            spec = importlib.util.find_spec("kernels")
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    if not origin or os.path.realpath(origin) != ours:
        return None
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None  # no hub-kernels: transformers finds no version for the folder and leaves it alone
    return _shadowing_entries(ours), version


def running_fastbert_as_main() -> bool:
    """True while `python -m fastbert[.x]` imports fastbert (sys.argv[0] is "-m" until the main module is found)."""
    if sys.argv[:1] != ["-m"]:
        return False
    orig = list(getattr(sys, "orig_argv", []))
    module = orig[orig.index("-m") + 1] if "-m" in orig[:-1] else ""
    return module == "fastbert" or module.startswith("fastbert.")


def check(as_program: bool) -> None:
    found = shadowed()
    if found is None:
        return
    entries, version = found
    if as_program:
        sys.path[:] = [p for p in sys.path if p not in entries]
        sys.modules.pop("kernels", None)  # (loaded only if it is the folder: shadowed() checked its file)
        return
    where = ", ".join(repr(e) for e in entries) or "an entry"
    warnings.warn(
        f"`import kernels` finds fastbert's source folder {os.path.dirname(_ours() or '')} (sys.path holds the "
        f"checkout's root: {where}; Python was started there), not HuggingFace's hub-kernels package (kernels "
        f"{version}, installed), which transformers imports with its models: `from transformers import BertModel` "
        "will raise ImportError. Start Python outside the fastbert checkout, or set PYTHONSAFEPATH=1 (Python >= "
        "3.11) so that the working directory is not put on sys.path. The `fastbert` command is not affected.",
        ShadowedHubKernelsWarning,
        stacklevel=2,
    )
