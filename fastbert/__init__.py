"""fastbert: Triton kernels for BERT-family encoders in PyTorch.

    from fastbert import ops
    y = ops.add_layer_norm(x, residual, weight, bias, eps=1e-12, dropout_p=0.1)

Importing fastbert does no work: no CUDA queries and no Triton import until a kernel first runs.
"""

from fastbert import ops, reference
from fastbert.ops import *  # noqa: F403 - the public ops, re-exported

__version__ = "0.1.0"
__all__ = ["ops", "reference", *ops.__all__]
