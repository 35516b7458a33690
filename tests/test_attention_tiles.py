"""Attention's tile choice (fastbert.kernels.attention._Tiles): on a GPU, the default tile and its alternates are
timed on the first call of each (sequence bucket, batch x heads bucket) and the fastest kept. The timer is
replaced here (on a GPU too, so that nothing depends on which tile wins): the choice's rules are checked with fake
times, and each kernel's alternate runs against the float64 reference (in the interpreter without CUDA, with the
GPU's alternate tiles)."""

from __future__ import annotations

import types

import pytest
import torch
from test_attention import check_against_reference, make_inputs, random_mask
from triton.runtime.errors import OutOfResources

from conftest import DEVICE, HAS_CUDA
from fastbert.kernels import attention as at

TILES = (at._FWD_TILES, at._DKDV_TILES, at._DQ_TILES)


@pytest.fixture
def fake_gpu(monkeypatch):
    """GPU tiles and tuning on CPU tensors; the timer returns times[(BLOCK_M, BLOCK_N, num_warps)] (default 1.0)
    and records what it timed. Every kernel's tunings start empty."""
    timed, times = [], {}

    def fake_time(launch, meta):
        timed.append(meta)
        tile = (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"])
        if isinstance(times.get(tile), Exception):
            raise times[tile]
        return times.get(tile, 1.0)

    monkeypatch.setattr(at, "interpreting", lambda: False)
    monkeypatch.setattr(at, "_on_gpu", lambda q: True)
    monkeypatch.setattr(at, "_capturing", lambda: False)
    monkeypatch.setattr(at, "_time", fake_time)
    monkeypatch.delenv("FASTBERT_AUTOTUNE", raising=False)
    for tiles in TILES:
        monkeypatch.setattr(tiles, "chosen", {})
    return types.SimpleNamespace(timed=timed, times=times)


def _lay(batch=2, heads=12, block_d=64):
    return types.SimpleNamespace(batch=batch, heads=heads, block_d=block_d)


_Q16 = torch.empty(1, dtype=torch.float16)
# fp16 head_dim 64 forward without dropout: the default and its alternate
DEFAULT, ALTERNATE = (at._as_meta(e) for e in at._applicable(at._FWD_CONFIGS, "fp16", 64, False))


def _pick(seq=128, lay=None, q=_Q16, dropout=False):
    return at._FWD_TILES.pick(lay or _lay(), q, dropout, seq, launch=None)


def test_an_alternate_must_beat_the_default_by_the_margin(fake_gpu):
    fake_gpu.times[(64, 64, 4)] = 0.98  # 2% faster: noise, the default stays
    assert _pick(seq=128) == DEFAULT
    fake_gpu.times[(64, 64, 4)] = 0.9
    assert _pick(seq=256) == ALTERNATE
    assert fake_gpu.timed == [DEFAULT, ALTERNATE] * 2


def test_a_choice_is_kept_per_sequence_and_batch_heads_bucket(fake_gpu):
    fake_gpu.times[(64, 64, 4)] = 0.5
    for seq in (300, 257, 512):  # one bucket
        assert _pick(seq=seq) == ALTERNATE
    assert len(fake_gpu.timed) == 2
    _pick(seq=513)  # the next bucket
    _pick(seq=512, lay=_lay(batch=3))  # 36 heads in all: the next batch x heads bucket
    _pick(seq=512, lay=_lay(block_d=32))  # another head-dim block
    _pick(seq=512, dropout=True)  # dropout has its own tiles
    assert len(fake_gpu.timed) == 10
    _pick(seq=20000)  # past the largest bucket: as long as the largest, timed once
    _pick(seq=9000)
    assert len(fake_gpu.timed) == 12


def test_tuned_tiles_lists_each_kernels_choices(fake_gpu):
    fake_gpu.times[(64, 64, 4)] = 0.5
    _pick(seq=128)
    _pick(seq=512, lay=_lay(batch=32))
    fake_gpu.times[(64, 64, 4)] = 2.0
    _pick(seq=1000, lay=_lay(batch=32))
    rows = at.tuned_tiles()
    common = {"kernel": "fwd", "dtype": "fp16", "block_d": 64, "dropout": False}
    device = {"device": None}  # (a CPU tensor here; a GPU's index on one)
    assert rows == [
        common | {"seq_bucket": 128, "bh_bucket": 32} | device | ALTERNATE | {"default": False},
        common | {"seq_bucket": 512, "bh_bucket": 512} | device | ALTERNATE | {"default": False},
        common | {"seq_bucket": 1024, "bh_bucket": 512} | device | DEFAULT | {"default": True},
    ]


def test_an_alternate_that_does_not_fit_is_passed_over_with_a_warning(fake_gpu):
    fake_gpu.times[(64, 64, 4)] = OutOfResources(300000, 232448, "shared memory")
    with pytest.warns(UserWarning, match="does not fit this GPU"):
        assert _pick() == DEFAULT


@pytest.mark.parametrize("tile", [(128, 64, 8), (64, 64, 4)], ids=["default", "alternate"])
def test_any_other_failure_propagates(fake_gpu, tile):
    fake_gpu.times[tile] = RuntimeError("illegal instruction")
    with pytest.raises(RuntimeError, match="illegal instruction"):
        _pick()


def test_no_memory_for_the_timing_runs_the_default_and_times_later(fake_gpu):
    fake_gpu.times[(128, 64, 8)] = torch.cuda.OutOfMemoryError("256 MB for the L2 flush")
    assert _pick() == DEFAULT
    assert at._FWD_TILES.chosen == {}
    fake_gpu.times[(128, 64, 8)], fake_gpu.times[(64, 64, 4)] = 1.0, 0.5
    assert _pick() == ALTERNATE


@pytest.mark.parametrize("how", ["env", "deterministic"])
def test_pinned_runs_the_default_untimed(fake_gpu, monkeypatch, how):
    fake_gpu.times[(64, 64, 4)] = 0.5
    if how == "env":
        with monkeypatch.context() as m:
            m.setenv("FASTBERT_AUTOTUNE", "0")
            assert _pick() == DEFAULT
    else:
        was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert _pick() == DEFAULT
        finally:
            torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    assert fake_gpu.timed == []
    assert _pick() == ALTERNATE  # the bucket was not spent: timed at its first call with tuning on


def test_capture_runs_the_default_and_times_the_bucket_later(fake_gpu, monkeypatch):
    fake_gpu.times[(64, 64, 4)] = 0.5
    monkeypatch.setattr(at, "_capturing", lambda: True)
    assert _pick() == DEFAULT
    assert fake_gpu.timed == []
    monkeypatch.setattr(at, "_capturing", lambda: False)
    assert _pick() == ALTERNATE
    monkeypatch.setattr(at, "_capturing", lambda: True)  # a tuned bucket keeps its tile in a graph
    assert _pick() == ALTERNATE


def test_no_alternates_no_timing(fake_gpu):
    assert _pick(q=torch.empty(1)) == at._as_meta(at._applicable(at._FWD_CONFIGS, "fp32", 64, False)[0])
    assert fake_gpu.timed == []


def test_off_the_gpu_and_in_the_interpreter_nothing_is_timed(fake_gpu, monkeypatch):
    monkeypatch.setattr(at, "_on_gpu", lambda q: False)
    assert _pick() == DEFAULT
    monkeypatch.setattr(at, "interpreting", lambda: True)
    assert _pick() == at._INTERPRETER_META
    assert fake_gpu.timed == []


# bf16 on a GPU only: the interpreter holds bf16 as raw bits
DTYPES = [torch.float16, *([torch.bfloat16] if HAS_CUDA else [])]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize(
    "b, h, s, d, masked, dropout_p, chosen",
    [(2, 2, 70, 64, False, 0.0, 1), (2, 2, 70, 64, True, 0.0, 1), (2, 2, 70, 64, True, 0.0, 2),
     (2, 1, 70, 32, True, 0.0, 1), (1, 2, 70, 64, True, 0.2, 1)],
    ids=["d64", "d64-mask", "d64-mask-second", "d32-mask", "d64-mask-dropout"],
)  # fmt: skip
def test_alternate_tiles_match_the_reference(fake_gpu, monkeypatch, b, h, s, d, masked, dropout_p, chosen, dtype):
    """Each kernel launched with an alternate tile (timed as fastest; in the interpreter without CUDA): the launch
    closures give the chosen tile its own grid (query blocks for the forward and dq, key blocks for dk/dv). A
    kernel with no entry `chosen` keeps its default."""
    monkeypatch.setattr(at, "_time", alternates_faster(chosen=chosen))
    _check_tiles(b, h, s, d, masked, dropout_p, dtype, chosen=chosen)


def alternates_faster(run: bool = False, chosen: int = 1):
    """A timer under which each kernel's alternate `chosen` (its chosen-th tile timed; _fastest times the default
    first, then the alternates in table order) is the fastest; with run, it also calls launch(meta), as the real
    timer does. Its .timed lists the launch closures timed (kept alive: no two share an id)."""
    timed = []

    def fake_time(launch, meta):
        if run:
            launch(meta)
        nth = sum(launch is seen for seen in timed)
        timed.append(launch)
        return 0.5 if nth == chosen else 1.0

    fake_time.timed = timed
    return fake_time


def timed_tiles(dtype: torch.dtype, head_dim: int, dropout: bool) -> int:
    """How many tiles a call's first timing runs: every applicable entry of the three kernels' tables."""
    name = at._dtype_name(torch.empty(0, dtype=dtype))
    return sum(len(at._applicable(tiles.table, name, head_dim, dropout)) for tiles in TILES)


def _check_tiles(b, h, s, d, masked, dropout_p, dtype, chosen):
    """fwd + bwd against the float64 reference; every kernel must have run its entry `chosen` (0: the default), or
    its default where it has no such entry."""
    from fastbert.kernels.attention_dropout import dropout_keep_mask
    from fastbert.ops._common import draw_seed

    keep = None
    if dropout_p:
        torch.manual_seed(99)
        keep = dropout_keep_mask(int(draw_seed(DEVICE).item()), b, h, s, s, dropout_p, DEVICE)
    mask = random_mask(b, s, seed=3) if masked else None
    check_against_reference(*make_inputs(b, h, s, d, dtype), mask=mask, dropout_p=dropout_p, keep=keep,
                            seed=99 if dropout_p else None)  # fmt: skip
    for name, tiles in zip(("fwd", "dkdv", "dq"), TILES, strict=True):
        entries = at._applicable(tiles.table, at._dtype_name(torch.empty(0, dtype=dtype)), d, dropout_p > 0)
        assert list(tiles.chosen.values()) == [at._as_meta(entries[chosen if chosen < len(entries) else 0])], name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("seq", [128, 512])
@pytest.mark.parametrize("chosen", [0, 1, 2], ids=["default", "alternate", "second-alternate"])
def test_bert_shapes_with_each_tile_gpu(fake_gpu, monkeypatch, chosen, seq, dtype):
    """BERT-base's heads (32 x 12 x 64), masked, with each kernel's default and then each alternate (dq has two):
    which one the real timer picks depends on the GPU and on what else runs on it, so each is forced here."""
    monkeypatch.setattr(at, "_time", alternates_faster(chosen=chosen) if chosen else (lambda launch, meta: 1.0))
    _check_tiles(32, 12, seq, 64, True, 0.0, dtype, chosen=chosen)


@pytest.mark.gpu
def test_the_real_timer_chooses_and_records_gpu(monkeypatch):
    """The path the fakes stand in for: do_bench times both tiles of each kernel once per bucket."""
    monkeypatch.delenv("FASTBERT_AUTOTUNE", raising=False)
    for tiles in TILES:
        monkeypatch.setattr(tiles, "chosen", {})
    timed = []
    real = at._time
    monkeypatch.setattr(at, "_time", lambda launch, meta: (timed.append(meta), real(launch, meta))[1])
    check_against_reference(*make_inputs(1, 12, 128, 64, torch.float16), mask=random_mask(1, 128, seed=1))
    assert len(timed) == timed_tiles(torch.float16, 64, False)  # default and alternates of each kernel
    rows = at.tuned_tiles()
    assert [r["kernel"] for r in rows] == ["fwd", "dkdv", "dq"]
    index = torch.empty(0, device=DEVICE).device.index  # (DEVICE is torch.device("cuda"): its own index is None)
    assert all(r["seq_bucket"] == 128 and r["bh_bucket"] == 16 and r["device"] == index for r in rows)
    check_against_reference(*make_inputs(1, 12, 100, 64, torch.float16))  # the same bucket: not timed again
    assert len(timed) == timed_tiles(torch.float16, 64, False)
