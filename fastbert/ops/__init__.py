"""fastbert's public fused ops. Each validates its inputs (ValueError naming the problem), runs the Triton kernel
on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1, through Triton's interpreter), falls back to the
eager definition in fastbert.reference on other CPU tensors, and is a torch.library custom op with its autograd
formula, so torch.compile sees one op rather than a graph break.
"""

from fastbert.ops._add_layer_norm import add_layer_norm
from fastbert.ops._attention import attention, attention_varlen, pad, unpad
from fastbert.ops._linear_cross_entropy import linear_cross_entropy
from fastbert.ops._linear_gelu import linear_gelu

__all__ = ["add_layer_norm", "attention", "attention_varlen", "linear_cross_entropy", "linear_gelu", "pad", "unpad"]
