"""The tensor-core int4 GEMV (models/kernels/int4_mma.py) against the plain dequantize-then-matmul reference
over many shapes, tiles and splits of K (a GPU with compute capability 8.0+; skipped cleanly elsewhere)."""

import pytest
import torch

from models.kernels import gemv_tiles, int4, int4_mma, nvrtc
from tests.cuda_compile import nvrtc_13_installed, registers_and_stack

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and int4_mma.available(torch.device("cuda"))),
                         reason="needs a CUDA GPU of compute capability 8.0+ and torch's NVRTC compiler")

# (N, K): N a multiple of 4 (what the kernel takes), not always of a warp's 32 rows; K in and out of whole groups.
SHAPES = [(4, 128), (36, 200), (100, 1000), (256, 64), (260, 2048), (1028, 4096), (4096, 14336), (6144, 4096),
          (92, 3584), (512, 300), (37888, 3584)]


def _case(n, k, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, s, o = int4.quantize(w)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ int4.dequantize_reference(q, s, o, k, torch.float32).T
    return x, q, s, o, ref


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", SHAPES)
def test_mma_gemv_matches_the_reference_over_tiles_and_splits(n, k):
    x, q, s, o, ref = _case(n, k)
    workspace = int4.new_workspace(n, x.device)
    groups = s.shape[0]
    for warps in (2, 4, 8):
        for stages in (2, 3):
            for split in sorted({1, 3, 8} & set(range(1, groups + 1))):
                if split * n > workspace[0].numel():
                    continue
                y = int4_mma.gemv(x, q, s, o, k, workspace, warps, stages, split)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                # bf16 output rounding is 2**-9 of the largest value; the kernel's fp32 sums add far less
                assert err < 6e-3, (n, k, warps, stages, split, err)
                assert int(workspace[1].abs().sum()) == 0  # counters left at zero for the next call
                if 2 <= split <= 8 and torch.cuda.get_device_capability() >= (9, 0):
                    y = int4_mma.gemv(x, q, s, o, k, workspace, warps, stages, split, cluster=True)
                    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    assert err < 6e-3, (n, k, warps, stages, split, "cluster", err)


def test_tiled_words_sit_where_the_kernel_reads_them():
    """tile_words' layout against the kernel's TILED addressing: uint4 ((tile * G + g) * 16 + i) * 8 + r holds
    int4.py's words (g * 16 + i, columns 32 tile + 4 r .. + 3)."""
    groups, n = 3, 96
    words = torch.arange(groups * 16 * n, dtype=torch.int32).view(groups * 16, n)
    tiled = int4_mma.tile_words(words).reshape(-1, 4)  # as uint4
    for tile in range(n // 32):
        for g in range(groups):
            for i in range(16):
                for r in range(8):
                    columns = slice(32 * tile + 4 * r, 32 * tile + 4 * r + 4)
                    assert torch.equal(tiled[((tile * groups + g) * 16 + i) * 8 + r], words[g * 16 + i, columns])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(96, 1000), (6144, 4096), (4096, 14336)])
def test_tiled_words_give_the_same_rows(n, k):
    x, q, s, o, ref = _case(n, k)
    workspace = int4.new_workspace(n, x.device)
    tiled = int4_mma.tile_words(q)
    for stages in (2, 4):
        for split in (1, 4):
            plain = int4_mma.gemv(x, q, s, o, k, workspace, 4, stages, split)
            assert torch.equal(int4_mma.gemv(x, tiled, s, o, k, workspace, 4, stages, split, tiled=True), plain)


@gpu
@pytest.mark.gpu
def test_mma_gemv_handles_large_activations_and_replays_in_a_graph():
    n, k = 1024, 4096
    x, q, s, o, ref = _case(n, k, seed=1)
    x = x * 3000  # a residual stream's size: x / 64 stays within fp16
    ref = ref * 3000
    workspace = int4.new_workspace(n, x.device)
    y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    int4_mma.gemv(x, q, s, o, k, workspace, 4, 2, 4, out=y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        int4_mma.gemv(x, q, s, o, k, workspace, 4, 2, 4, out=y)
    for _ in range(3):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 6e-3


@gpu
@pytest.mark.gpu
def test_mma_gemv_refuses_what_it_cannot_do():
    x, q, s, o, _ = _case(36, 256)
    workspace = int4.new_workspace(36, x.device)
    with pytest.raises(ValueError, match="N % 4"):
        int4_mma.gemv(x, q[:, :34].contiguous(), s[:, :34].contiguous(), o[:, :34].contiguous(), 256, workspace)
    with pytest.raises(ValueError, match="workspace"):
        int4_mma.gemv(x, q, s, o, 256, (workspace[0][:36], workspace[1]), split=2)


def test_mma_gemv_is_not_offered_without_a_gpu():
    assert not int4_mma.available(torch.device("cpu"))


@pytest.mark.skipif(not nvrtc_13_installed(), reason="NVRTC 13 is not installed (scripts/setup.sh --dev installs it)")
@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0)])
def test_the_cuda_source_compiles_for_ampere_ada_and_hopper_without_spills(capability):
    """Every tile's kernel builds for the consumer cards (sm_86, sm_89) it was never run on, and for the A100 and
    H100/H200, with no register spills (a spill would put the words in flight on the stack)."""
    variants = [(*tile, False, False) for tile in int4_mma.TILES] + [(4, 4, 1, False, True, False)]
    if capability >= (9, 0):  # early launches (griddepcontrol) are Hopper's
        variants += [(*tile, False, True) for tile in int4_mma.TILES]
    for warps, stages, split, cluster, tiled, dependent in variants:
        if cluster and capability < (9, 0):
            continue
        source = int4_mma.source_for(warps, stages, split if cluster else 1, tiled, dependent)
        registers, stack = registers_and_stack(source, "int4_mma_gemv", capability)
        assert stack == 0 and registers <= 128, (capability, warps, stages, split, cluster, tiled, dependent, registers)


@pytest.mark.skipif(not nvrtc_13_installed(), reason="NVRTC 13 is not installed (scripts/setup.sh --dev installs it)")
def test_a_compile_error_says_what_nvrtc_said():
    with pytest.raises(RuntimeError, match="undefined_thing"):
        nvrtc.compile_cubin('extern "C" __global__ void k() { undefined_thing(); }', "k", (9, 0), (), 13)


def test_the_chooser_takes_a_tensor_core_tile_only_when_clearly_faster():
    from models.kernels import int4_triton

    first = len(int4_triton._GEMV_CONFIGS)
    assert gemv_tiles.fastest({0: 10.0, 1: 9.0, first: 8.9}) == 1  # 1 % faster: within the margin, Triton's
    assert gemv_tiles.fastest({0: 10.0, 1: 9.0, first: 8.0, first + 1: 8.5}) == first  # 11 % faster: taken
    assert gemv_tiles.fastest({0: 10.0, 1: 9.0}) == 1
    assert gemv_tiles.fastest({first: 8.0}) == first  # nothing of Triton's to compare with


def test_no_tensor_core_tile_is_offered_without_a_gpu_or_when_turned_off(monkeypatch):
    cpu = torch.device("cpu")
    assert not any(int4_mma.tile_fits(t, 4096, cpu) for t in int4_mma.TILES)
    assert gemv_tiles.candidate_tiles(4096, cpu) == gemv_tiles.candidate_tiles(4096)
    monkeypatch.setenv(int4_mma.ENV, "0")
    assert not int4_mma.offered(torch.device("cuda", 0))
