"""What the compile gate finds under the Tritons that PyTorch's CUDA wheels pin, where CI's Triton (3.9) compiles
clean: torch 2.10 and 2.11 pin Triton 3.6.0, 2.12 and 2.13 pin 3.7.1, 2.14 pins 3.8.x. A GPU user's install
runs the tests under that Triton, and its ptxas (shipped inside the Triton wheel) decides the registers.

tests/test_compile.py marks exactly these (case, arch) pairs xfail with their reason, so that such an install
passes while the output still names every finding; any other failure stays a failure. The lists were recorded
with `python -m fastbert.kernels.gate` under each release named in RECORDED (2026-12-08, the kernels at that
day's main). Under that exact release the xfail is strict: a listed case that compiles clean fails the suite
(the list is stale and must shrink); under another patch release of the same minor version it is not.

None of these is a wrong answer: a spill or a register count over a tile's budget costs speed, not results.
"""

from __future__ import annotations

_LAYER_NORM_UNALIGNED = (
    "add_layer_norm backward, unaligned variant (hidden size or a row stride not a multiple of 16, no BERT "
    "width): this Triton's ptxas spills 1-4 registers on sm_90"
)
_DQ_D64_REGISTERS = (
    "attention dq at head_dim 64 without dropout, default 128 x 64 tile: 147 registers on sm_90 (one 8-warp "
    "block an SM, its budget is two); on a GPU the tile timer also weighs the 128 x 32 alternate (114 registers) "
    "and 64 x 64, and keeps the fastest"
)
_ATTENTION_FP32_DKDV_D32 = (
    "attention dk/dv in fp32 (IEEE, not a training dtype) at head_dim 32 without dropout: 1 spill store at 80 "
    "registers on sm_90"
)
_GELU_128X256_SM80 = (
    "linear_gelu 128 x 256 autotune candidate, exact-erf epilogue: 2 spill stores at 255 registers on sm_80; the "
    "autotuner times it against four spill-free configs"
)

_DQ_D64 = dict.fromkeys(
    ["sm90-attention_dq-fp16-d64-drop0-m128n64w8s3", "sm90-attention_dq-bf16-d64-drop0-m128n64w8s3"], _DQ_D64_REGISTERS
)

# Triton (major, minor) -> (the release the list was recorded with, {test id: reason}); test ids as in
# test_compile.py: sm<arch>-<case name>.
RECORDED: dict[tuple[int, int], tuple[str, dict[str, str]]] = {
    (3, 6): (
        "3.6.0",
        {
            **dict.fromkeys(
                [
                    "sm90-add_layer_norm_bwd-n512-bf16-bf16-fp32-drop1-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-fp32-fp32-fp32-drop0-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-bf16-bf16-bf16-drop0-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-bf16-fp32-fp32-drop0-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-bf16-fp32-fp32-drop0-sum-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-bf16-bf16-fp32-drop0-unaligned",
                ],
                _LAYER_NORM_UNALIGNED,
            ),
            **_DQ_D64,
        },
    ),
    (3, 7): (
        "3.7.1",
        {
            **dict.fromkeys(
                [
                    "sm90-add_layer_norm_bwd-n1024-fp32-fp32-fp32-drop0-unaligned",
                    "sm90-add_layer_norm_bwd-n1024-bf16-fp32-fp32-drop0-unaligned",
                    "sm90-add_layer_norm_bwd-n1024-bf16-fp32-fp32-drop0-sum-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-fp32-fp32-fp32-drop0-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-bf16-bf16-bf16-drop0-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-bf16-fp32-fp32-drop0-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-bf16-fp32-fp32-drop0-sum-unaligned",
                    "sm90-add_layer_norm_bwd-n2048-bf16-bf16-fp32-drop0-unaligned",
                ],
                _LAYER_NORM_UNALIGNED,
            ),
            **dict.fromkeys(
                [
                    "sm80-linear_gelu_fwd-m128n256k64w8s3-fp16-none-preact0",
                    "sm80-linear_gelu_fwd-m128n256k64w8s3-fp16-none-preact1",
                    "sm80-linear_gelu_fwd-m128n256k64w8s3-bf16-none-preact0",
                    "sm80-linear_gelu_fwd-m128n256k64w8s3-bf16-none-preact1",
                ],
                _GELU_128X256_SM80,
            ),
            **_DQ_D64,
        },
    ),
    (3, 8): (
        "3.8.0",
        {
            "sm90-add_layer_norm_bwd-n1024-bf16-fp32-fp32-drop1-unaligned": _LAYER_NORM_UNALIGNED,
            "sm90-attention_dkdv-fp32-d32-drop0-m16n32w8s1": _ATTENTION_FP32_DKDV_D32,
        },
    ),
}


def known_finding(test_id: str, version: str) -> tuple[str, bool] | None:
    """(reason, strict) when the gate's finding for test_id is recorded for Triton `version` ("3.7.1"), else
    None. strict: `version` is the very release the list was recorded with."""
    try:
        minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:  # (a version whose first two fields are not numbers: nothing is recorded for it)
        return None
    recorded = RECORDED.get(minor)
    if recorded is None or test_id not in recorded[1]:
        return None
    release, findings = recorded
    return findings[test_id], version.split("+")[0] == release
