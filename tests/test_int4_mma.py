"""The tensor-core int4 GEMV (models/kernels/int4_mma.py) against the plain dequantize-then-matmul reference
over many shapes, tiles and splits of K (a GPU with compute capability 8.0+; skipped cleanly elsewhere)."""

import pytest
import torch

from models.kernels import int4, int4_mma

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
