"""The decode kernels of ming/kernels.py on the CPU, through Triton's interpreter, in float32 (its bf16 is broken):

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_interpret.py

Skipped unless TRITON_INTERPRET=1 and triton imports. Small shapes keep it under a minute; tests/test_cuda.py runs
the same kernels in bf16 on a GPU at the model's shapes."""

import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter", allow_module_level=True)
pytest.importorskip("triton")

from ming import kernels  # noqa: E402


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("pieces", [2, 0])
def test_one_row_moe_matches_the_loop_and_moe_sorted(pieces):
    """moe_one_row against a float64 loop over the chosen experts (plus the shared expert, plus the residual) and
    against moe_sorted, with sizes no block divides, the first and last experts, and one expert chosen twice."""
    E, I, H, top_k = 16, 48, 96, 6
    gen = torch.Generator().manual_seed(pieces)
    w_gate, w_up = torch.randn(2, E, I, H, generator=gen) / H**0.5
    w_down = torch.randn(E, H, I, generator=gen) / I**0.5
    shared = tuple(torch.randn(shape, generator=gen) / shape[1] ** 0.5
                   for shape in ((pieces * I, H), (pieces * I, H), (H, pieces * I))) if pieces else None
    x = torch.randn(1, H, generator=gen)
    weight = torch.rand(1, top_k, generator=gen).softmax(-1)
    for idx in (torch.randperm(E, generator=gen)[:top_k], torch.tensor([15, 0, 3, 3, 14, 1])):
        idx = idx[None]
        for residual in (None, torch.randn(1, H, generator=gen)):
            got = kernels.moe_one_row(x, idx, weight, w_gate, w_up, w_down, shared, residual)
            want = sum(weight[0, j].double() * swiglu(x, w_gate[e], w_up[e], w_down[e]).double()
                       for j, e in enumerate(idx[0].tolist()))
            if shared is not None:
                want = want + swiglu(x, *shared).double()
            if residual is not None:
                want = want + residual.double()
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got, kernels.moe_sorted(x, idx, weight, w_gate, w_up, w_down, shared, residual),
                                       rtol=1e-5, atol=1e-5)
