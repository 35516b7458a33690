"""fastbert: Triton kernels for BERT-family encoders in PyTorch.

    import fastbert
    model = fastbert.optimize(model)        # a HuggingFace BERT / RoBERTa / XLM-R model, in place

    from fastbert import ops
    y = ops.add_layer_norm(x, residual, weight, bias, eps=1e-12, dropout_p=0.1)

Importing fastbert does no work: no CUDA queries, no Triton or transformers import until they are needed.
"""

from fastbert import _shadow, modules, ops, reference
from fastbert.hf import optimize, restore, summary
from fastbert.ops import *  # noqa: F403 - the public ops, re-exported

# Started in a source checkout's root, `import kernels` finds the folder kernels/, not HuggingFace's hub-kernels:
# `python -m fastbert` takes that root off sys.path, a library import warns (fastbert/_shadow.py).
_shadow.check(as_program=_shadow.running_fastbert_as_main())

__version__ = "0.1.0"
__all__ = ["modules", "ops", "optimize", "reference", "restore", "summary", *ops.__all__]
