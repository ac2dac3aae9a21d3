"""The decode kernels of ming/kernels.py on the CPU, through Triton's interpreter, in float32 (its bf16 is broken):

    TRITON_INTERPRET=1 PYTHONPATH=.venv/triton-interpreter python -m pytest -q tests/test_kernels_interpret.py

(scripts/test.sh runs it so, after the rest of the suite; scripts/setup.sh --dev puts Triton in that folder.)

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


@pytest.mark.parametrize("chunk", [64, 16])
def test_decode_attention_rotates_writes_the_cache_and_attends(chunk):
    """decode_attention (RoPE, the new key and value written at each row's slot, flash decoding over the row's
    keys) against rotating, writing and attending in PyTorch: rows at different slots, a hole in one row; chunks
    of 16 give each split several chunks."""
    import dataclasses

    from ming.layers import apply_rope, rope_cos_sin

    B, heads, kv_heads, D, S = 2, 8, 2, 32, 256
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, 1, heads + 2 * kv_heads, D, generator=gen)
    k_cache, v_cache = torch.randn(2, B, kv_heads, S, D, generator=gen)
    slots = torch.tensor([70, 200])
    cos, sin = rope_cos_sin(slots[:, None] + 3, D, 10000.0)
    valid = torch.arange(S)[None] <= slots[:, None]
    valid[1, 5:9] = False
    want_k, want_v = k_cache.clone(), v_cache.clone()
    rows = torch.arange(B)
    want_k[rows, :, slots] = apply_rope(qkv[:, :, heads:heads + kv_heads].transpose(1, 2), cos, sin)[:, :, 0]
    want_v[rows, :, slots] = qkv[:, 0, heads + kv_heads:]
    tuning = dataclasses.replace(kernels.DEFAULT_TUNING, decode_attention_chunk=chunk)
    got = kernels.decode_attention(qkv, cos, sin, k_cache, v_cache, valid, slots, heads, tuning)
    torch.testing.assert_close(k_cache, want_k)
    torch.testing.assert_close(v_cache, want_v)
    q = apply_rope(qkv[:, :, :heads].transpose(1, 2), cos, sin)  # [B, heads, 1, D]
    groups = heads // kv_heads
    keys, values = want_k.repeat_interleave(groups, 1), want_v.repeat_interleave(groups, 1)
    scores = (q @ keys.transpose(-1, -2) / D**0.5).masked_fill(~valid[:, None, None], float("-inf"))
    want = (scores.softmax(-1) @ values)[:, :, 0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_routing_picks_the_top_k_in_order_with_ties_to_the_lower_expert():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    logits[0, 9] = logits[0, 40] = logits[0].max() + 1  # a tie for first place
    for renormalize in (True, False):
        idx, weight = kernels.route_topk(logits, 6, renormalize)
        want_weight, want_idx = logits.softmax(-1).topk(6)
        assert idx[0, :2].tolist() == [9, 40]
        assert torch.equal(idx, want_idx)
        if renormalize:
            want_weight = want_weight / want_weight.sum(-1, keepdim=True)
        torch.testing.assert_close(weight, want_weight)


def test_argmax_rows_takes_the_first_of_equal_maxima():
    """argmax_rows splits each row over programs of ARGMAX_BLOCK logits and the last one picks: ties inside one
    part and across parts go to the lower column, as torch.argmax, and so does an all -inf row."""
    block = kernels.ARGMAX_BLOCK
    V = 3 * block + 100  # the last part is partial
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(2))
    logits[1, 77] = logits[1, 2 * block + 5] = 50.0  # a tie across parts
    logits[2] = float("-inf")
    logits[2, V - 1] = 0.0  # the last column, in the partial part
    logits[3, block + 9] = logits[3, block + 10] = 60.0  # a tie inside one part
    logits[4] = float("-inf")
    logits[5, block] = 40.0  # the first column of a part
    for _ in range(2):  # the tickets are left at zero for the next launch
        assert kernels.argmax_rows(logits).tolist() == [int(logits[0].argmax()), 77, V - 1, block + 9, 0, block]


@pytest.mark.parametrize("rows", [1, 3])
def test_add_norm_route_with_the_shared_expert_at_one_row(rows):
    """add_norm_route (residual add, RMSNorm, gate, softmax/top-k) against PyTorch; at one row also with the shared
    expert's SwiGLU computed in the same launch, which moe_one_row then takes instead of computing it itself."""
    E, I, H, top_k, pieces = 16, 48, 96, 4, 2
    gen = torch.Generator().manual_seed(rows)
    x, delta = torch.randn(2, rows, H, generator=gen)
    norm_weight = torch.rand(H, generator=gen) + 0.5
    router = torch.randn(E, H, generator=gen) / H**0.5
    w_gate, w_up = torch.randn(2, E, I, H, generator=gen) / H**0.5
    w_down = torch.randn(E, H, I, generator=gen) / I**0.5
    shared = tuple(torch.randn(shape, generator=gen) / shape[1] ** 0.5
                   for shape in ((pieces * I, H), (pieces * I, H), (H, pieces * I)))
    total = x + delta
    normed = norm_weight * total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6)
    want_weight, want_idx = (normed @ router.T).softmax(-1).topk(top_k)
    want_weight = want_weight / want_weight.sum(-1, keepdim=True)
    for shared_gate_up in (None, shared[:2]) if rows == 1 else (None,):
        got_total, got_normed, idx, weight, swiglu = kernels.add_norm_route(
            x, delta, norm_weight, 1e-6, router, top_k, True, shared_gate_up, I)
        torch.testing.assert_close(got_total, total)
        torch.testing.assert_close(got_normed, normed, rtol=1e-5, atol=1e-5)
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(weight, want_weight)
        assert not kernels._tickets(x).any()
        if shared_gate_up is None:
            assert swiglu is None
            continue
        assert swiglu.shape == (top_k + pieces, I)
        want_shared = F.silu(normed @ shared[0].T) * (normed @ shared[1].T)
        torch.testing.assert_close(swiglu[top_k:].reshape(1, -1), want_shared, rtol=1e-5, atol=1e-5)
        got = kernels.moe_one_row(got_normed, idx, weight, w_gate, w_up, w_down, shared, got_total, swiglu=swiglu)
        torch.testing.assert_close(got, kernels.moe_one_row(got_normed, idx, weight, w_gate, w_up, w_down, shared,
                                                            got_total), rtol=1e-5, atol=1e-5)
    if rows > 1:
        with pytest.raises(ValueError, match="one row"):
            kernels.add_norm_route(x, delta, norm_weight, 1e-6, router, top_k, True, shared[:2], I)
