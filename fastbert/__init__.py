"""fastbert: Triton kernels for BERT-family encoders in PyTorch.

    import fastbert
    model = fastbert.optimize(model)        # a HuggingFace BERT / RoBERTa / XLM-R model, in place

    from fastbert import ops
    y = ops.add_layer_norm(x, residual, weight, bias, eps=1e-12, dropout_p=0.1)

Importing fastbert does no work: no CUDA queries, no Triton or transformers import until they are needed.
"""

from fastbert import modules, ops, reference
from fastbert.hf import optimize, restore, summary
from fastbert.ops import *  # noqa: F403 - the public ops, re-exported

__version__ = "0.1.0"
__all__ = ["modules", "ops", "optimize", "reference", "restore", "summary", *ops.__all__]
