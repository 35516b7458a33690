"""Helpers shared by the Triton kernels: interpreter detection, block heuristics, in-kernel dropout, and the
record type the GPU compile gate uses (see fastbert.kernels.gate)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU with its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


AUTOTUNE_ENV = "FASTBERT_AUTOTUNE"


def autotune_pinned() -> bool:
    """True when the kernels that choose their config by timing (attention's tiles, linear_gelu's autotuners and
    its Hopper kernel) must keep their default instead: under FASTBERT_AUTOTUNE=0, or while
    torch.use_deterministic_algorithms(True) is on. Configs sum in different orders, so a choice made by timing
    can change a result's last bits from one process to the next; pinned, a run repeats bit for bit."""
    import torch

    return os.environ.get(AUTOTUNE_ENV) == "0" or torch.are_deterministic_algorithms_enabled()


def launch_untimed(autotuned, grid, config, *args, **kwargs) -> None:
    """Launch a ``triton.autotune`` kernel with ``config``, past its Autotuner: nothing is timed. For tuning
    pinned (autotune_pinned: the default config), where Triton 3.6's Autotuner still times a list pruned to one
    config (3.9 skips that), and for a CUDA graph being captured, where timing cannot run (it synchronises) and an
    untuned key would start it (a config already loaded). The launch is the Autotuner's own: the config's
    pre_hook, then its kwargs."""
    if config.pre_hook is not None:
        config.pre_hook(dict(zip(autotuned.arg_names, args, strict=False)) | kwargs | config.all_kwargs())
    autotuned.fn[grid](*args, **kwargs, **config.all_kwargs())


@functools.cache
def _poison() -> bool:
    return os.environ.get("FASTBERT_POISON") == "1"


def empty(shape, *, device, dtype):
    """torch.empty for kernel outputs. Under FASTBERT_POISON=1 (set by the test suite before fastbert is
    imported; read once) float outputs are filled with NaN first, and uint8 ones (attention's packed dropout
    mask) with alternating bits, so an element a kernel forgets to write fails the tests instead of passing by
    luck."""
    import torch

    out = torch.empty(shape, device=device, dtype=dtype)
    if _poison() and out.is_floating_point():
        out.fill_(float("nan"))
    elif _poison() and dtype == torch.uint8:
        out.fill_(0xA5)
    return out


# Every launch and every compile-gate compilation passes enable_fp_fusion=FP_FUSION (the compiler may contract a
# multiply and an add into one fma). The kernels were written, tested and register-counted with it on, Triton's
# default up to 3.9; Triton 3.10 turns the default off (3.9 warns when a launch leaves it unset). Off, their
# rounding and code would change under them: add_layer_norm's backward, for one, decides where an fma may round
# (see its kernel). tests/test_launch_spec.py checks that every launch pins it.
FP_FUSION = True


# Host-side integer helpers for launchers: triton.cdiv and triton.next_power_of_2 are constexpr functions, whose
# call from Python code unwraps its arguments (~10% of an op's host time when launchers called them).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free)."""
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_for(device, per_sm: int = 4, interpreter: int = 4) -> int:
    """How many persistent programs to launch for a reduction over rows."""
    if device.type == "cuda":
        return per_sm * sm_count(device.index if device.index is not None else 0)
    return interpreter


def aligned_base(t):
    """t itself when its base is 16-byte aligned (fresh allocations always are), else a copy (which is). Triton
    specialises pointer arguments on 16-byte alignment; the launchers pass only aligned ones, so every launch
    compiles the variant the compile gate checks."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def pointer_args(signature: dict[str, str]) -> tuple[str, ...]:
    """The pointer arguments of a gate signature: what GateCase.divisible lists when every pointer is aligned."""
    return tuple(name for name, kind in signature.items() if kind.startswith("*"))


def dropout_threshold(p: float, bits: int) -> int:
    """The threshold of a dropout keep-mask whose draws are ``bits`` (16 or 32) wide: an element is kept iff its
    draw u (uniform on 0 .. 2^bits - 1) satisfies u >= t, with t = round(p · 2^bits) (at most 2^bits - 1), so
    the keep probability is 1 - t / 2^bits, within 2^-(bits + 1) of 1 - p (FlashAttention-2 draws 8 bits).
    Kernels scale the kept values by 1 / (1 - p), as PyTorch does. The 32-bit threshold is passed as t - 2^31
    (dropout_keep compares in int32 with the top bit flipped): it always fits an int32, so every p launches the
    same compiled kernel (a Python int of 2^31 or more would make Triton compile an int64 variant)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if bits not in (16, 32):
        raise ValueError(f"dropout draws are 16 or 32 bits wide, got {bits}")
    t = min(round(p * 2.0**bits), 2**bits - 1)
    return t - 2**31 if bits == 32 else t


_PLACEHOLDERS: dict = {}


def placeholder(device, dtype):
    """A one-element tensor for a pointer argument a kernel will not read (no mask, not varlen, no dropout), made
    once per device and dtype: allocating and filling one per call cost extra launches each time."""
    import torch

    key = (device, dtype)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros(1, dtype=dtype, device=device)
    return _PLACEHOLDERS[key]


def seed_arg(seed, device):
    """The seed_ptr argument of a kernel with dropout: ``seed``, the op's int64 [1] tensor on the kernel's device
    holding the dropout seed (fastbert.ops draws it there, in [2^62, 2^63): see philox_seed), which the kernel
    loads. Read on the device rather than passed by value, so that a CUDA graph replays with the seed the
    captured draw writes afresh on each replay. Without dropout (seed None) a placeholder, never read."""
    import torch

    if seed is None:
        return placeholder(device, torch.int64)
    assert seed.dtype == torch.int64 and seed.numel() == 1 and seed.device == device, (seed, device)
    return seed


@triton.jit
def load_seed(seed_ptr, HAS_DROPOUT: tl.constexpr):
    """A kernel's dropout seed, read from the device (seed_arg); 0 (unused) without dropout."""
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    else:
        seed = 0
    return seed


def philox_seed(seed: int) -> int:
    """The value the kernels get for a dropout seed (dropout_keep's stream): seed mod 2^62, plus 2^62. Always in
    [2^62, 2^63), so Triton types it int64 on every launch (a small seed would otherwise compile an int32 variant
    of the kernel, one the compile gate does not check)."""
    return seed % 2**62 + 2**62


# The Philox key of every dropout mask: masks differ by their seed, which dropout_keep puts in the counters' upper
# 64 bits (distinct seeds: disjoint counter ranges, independent draws).
DROPOUT_KEY = tl.constexpr(0x2B7E151628AED2A6)


@triton.jit
def philox_words(seed, counters):
    """The four 32-bit words of Philox-4x32-10 at each of the int64 ``counters`` in the stream of ``seed``: key
    DROPOUT_KEY, the counter in the lower 64 bits and the seed in the upper 64. The key is a constant, so the
    Philox key schedule stays immediate operands; a key read from device memory (kernels with seed_ptr) would be
    held in registers across the loops: +35 registers in the attention forward under dropout (compile gate)."""
    c0 = counters.to(tl.uint32)
    c1 = (counters >> 32).to(tl.uint32)
    stream = seed.to(tl.int64)
    c2 = c0 * 0 + stream.to(tl.uint32)
    c3 = c0 * 0 + (stream >> 32).to(tl.uint32)
    return tl.philox(DROPOUT_KEY, c0, c1, c2, c3)


@triton.jit
def dropout_keep(seed, row_ids, row_length, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep-mask of a [BLOCK_M, BLOCK_N] tile of a [rows, row_length] mask with 32-bit draws (add_layer_norm's;
    attention draws 16-bit ones in its own order, kernels.attention_dropout._dropout_keep), from Philox-4x32-10 (key
    DROPOUT_KEY, counter (seed, element counter)); kept iff the element's draw is >= ``threshold``
    (dropout_threshold(p, 32)).

    One Philox evaluation gives four 32-bit words, to four neighbouring columns: row ``row`` uses the counters
    ``row · cdiv(row_length, 4) + col // 4`` (64-bit) and element (row, col) takes word ``col % 4``. So the mask is
    the same whatever the tiling, as long as ``col_start`` is a multiple of 4, and forward and backward regenerate
    it instead of storing it.
    """
    # (the tensor first: in the interpreter an int column start // a constexpr is a constexpr, which does not add
    # a tensor to itself)
    cols = tl.arange(0, BLOCK_N // 4) + col_start // 4
    r0, r1, r2, r3 = philox_words(seed, row_ids.to(tl.int64)[:, None] * tl.cdiv(row_length, 4) + cols[None, :])
    # words[c, j, i] = r_(2j + i): word w = 2j + i of counter c, column 4c + w; unsigned order as signed order by
    # flipping the top bit
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    keep = (words ^ 0x80000000).to(tl.int32, bitcast=True) >= threshold
    return tl.reshape(keep, (BLOCK_M, BLOCK_N))


# An H100's SM has 228 KiB of shared memory and reserves 1 KiB of it for each resident block: two blocks fit when
# each uses at most 113 KiB.
SM90_SHARED_TWO_BLOCKS = 113 * 1024


@dataclasses.dataclass(frozen=True)
class GateCase:
    """One kernel compilation the launchers may ask for: what the compile gate builds for sm_80 and sm_90."""

    name: str
    fn: Any  # a triton.JITFunction
    signature: dict[str, str]  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 1
    # Only compile for these compute capabilities (None: all the gate covers).
    archs: tuple[int, ...] | None = None
    # On sm_90, require warp-group MMA (wgmma) in the TTGIR: tensor-core kernels must not fall back.
    expect_wgmma_sm90: bool = False
    # Arguments compiled as divisible by 16 (pointers 16-byte aligned, integers multiples of 16), as Triton's
    # launcher specialises them at run time: the gate must compile the variant that actually runs. Which
    # arguments qualify is the kernel module's promise (its launchers ensure it; tests/test_launch_spec.py
    # checks real launches against it).
    divisible: tuple[str, ...] = ()
    # Require that no global load moves a lone 16-bit element (ld.global.b16 in the PTX): the 16-bit tiles of
    # this kernel must load vectors (cp.async or ld.global.v*), not element by element.
    vector_loads: bool = False
    # On sm_90, at most this many registers a thread: the occupancy a config was chosen for (two blocks of 8 warps
    # share an SM's 64K registers at 128 or fewer). Crossing it compiles and runs, only slower, so the gate says so.
    max_registers_sm90: int | None = None
    # On sm_90, at most this many bytes of shared memory a block: the occupancy a config was chosen for (two blocks
    # an SM need at most SM90_SHARED_TWO_BLOCKS each). Crossing it also compiles and runs, only slower.
    max_shared_sm90: int | None = None
    # ptxas's register cap (triton.Config's maxnreg), when the config sets one: the gate compiles with it too.
    maxnreg: int | None = None


TORCH_TO_TRITON = {
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.float32": "fp32",
}
