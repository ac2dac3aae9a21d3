"""Unit tests of the Ling MoE LLM blocks (ming/llm.py) and of the static KV cache."""

import json
from unittest import mock

import torch
import torch.nn.functional as F

from ming.configs import RELEASE_CONFIG, MingConfig
from ming.layers import RMSNorm, apply_rope, cache_mask, decode_mask, prompt_mask, rope_cos_sin
from ming.llm import AUDIO, IMAGE, TEXT, BailingMoeForCausalLM, SparseMoeBlock, modality_rows
from ming.sampling import NgramGuard, SamplingConfig, select_next_token
from ming.testing.tiny import tiny_config
from ming.testing.weights import tiny_tensor


def tiny_llm() -> BailingMoeForCausalLM:
    config = tiny_config().llm_config
    llm = BailingMoeForCausalLM(config)
    state = {k: tiny_tensor(k, tuple(v.shape)) for k, v in llm.state_dict().items()}
    llm.load_state_dict(state)
    return llm.eval()


def full_logits(llm: BailingMoeForCausalLM, ids: torch.Tensor, router_ids=None) -> torch.Tensor:
    embeds = llm.model.word_embeddings(ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    hidden = llm.model(embeds, positions, prompt_mask(valid), router_ids)
    return llm.logits(hidden)


def test_state_dict_uses_per_expert_release_keys():
    llm = BailingMoeForCausalLM(tiny_config().llm_config)
    keys = set(llm.state_dict())
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.1.mlp.image_gate.weight" in keys
    assert "model.layers.0.attention.query_key_value.weight" in keys
    assert not any(k.endswith("experts.gate_proj") for k in keys)
    assert tuple(llm.state_dict()["model.layers.0.mlp.experts.3.gate_proj.weight"].shape) == (32, 64)


def test_stacked_experts_equal_per_expert_swiglu():
    llm = tiny_llm()
    block: SparseMoeBlock = llm.model.layers[0].mlp
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    idx, w = block.route(block.router_logits(x, None))
    got = block.experts(x, idx, w)
    state = llm.state_dict()
    want = torch.zeros_like(x)
    for t in range(5):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            p = f"model.layers.0.mlp.experts.{e}."
            h = F.silu(x[t] @ state[p + "gate_proj.weight"].T) * (x[t] @ state[p + "up_proj.weight"].T)
            want[t] += w[t, j] * (h @ state[p + "down_proj.weight"].T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))


def test_each_token_uses_its_modality_gate():
    llm = tiny_llm()
    block: SparseMoeBlock = llm.model.layers[0].mlp
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    router_ids = torch.tensor([TEXT, IMAGE, IMAGE, AUDIO, TEXT, AUDIO])
    idx, _ = block.route(block.router_logits(x, modality_rows(router_ids)))
    assert modality_rows(torch.full((2, 3), TEXT)) is None  # all text: the text gate alone, no per-token split
    for t, gate in enumerate([block.gate, block.image_gate, block.image_gate, block.audio_gate, block.gate, block.audio_gate]):
        scores = gate.logits(x[t : t + 1]).softmax(-1)
        assert set(scores.topk(3).indices[0].tolist()) == set(idx[t].tolist())


def test_rmsnorm_and_rope_are_what_they_claim():
    norm = RMSNorm(8, 1e-6)
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x).pow(2).mean(-1), torch.ones(3), rtol=1e-4, atol=1e-4)
    q = torch.randn(1, 2, 4, 16)
    pos = torch.arange(4)[None]
    cos, sin = rope_cos_sin(pos, 16, 600000.0)
    rotated = apply_rope(q, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))  # a rotation keeps lengths
    torch.testing.assert_close(rotated[:, :, 0], q[:, :, 0])  # position 0 is the identity


# Hand-computed RoPE angles of the release (head_dim 128, rope_theta 600000): angle = p * 600000 ** (-2j / 128) for
# frequency j, at position p; the cos/sin below were computed in float64 outside torch. (With theta 10000 the
# first row would be cos 0.648, not 0.688.)
RELEASE_HEAD_DIM = 128
RELEASE_ROPE = [  # (position p, frequency j, cos, sin)
    (1, 1, 0.6878308405106964, 0.7258710180482127),
    (7, 1, 0.826977376475092, -0.5622351988255219),
    (1000, 10, 0.8305957446029479, -0.5568758470677954),
    (5, 63, 0.9999999999473771, 1.0258937104047048e-05),
]


def test_rope_uses_the_released_theta():
    with open(RELEASE_CONFIG) as f:
        assert json.load(f)["llm_config"]["rope_theta"] == 600000  # the released config.json
    config = MingConfig.from_file(RELEASE_CONFIG).llm_config
    assert config.rope_theta == 600000.0
    assert config.attention_head_dim == RELEASE_HEAD_DIM
    assert tiny_config().llm_config.rope_theta == 600000.0  # the tiny checkpoint keeps it

    # The decoder passes its config's theta and head size to the tables (not a default of its own).
    calls = []

    def recording(position_ids, head_dim, theta):
        calls.append((head_dim, theta))
        return rope_cos_sin(position_ids, head_dim, theta)

    llm = tiny_llm()
    with mock.patch("ming.llm.rope_cos_sin", recording):
        full_logits(llm, torch.tensor([[1, 2, 3]]))
    assert calls == [(16, 600000.0)]


def test_rope_tables_match_hand_computed_angles():
    positions = torch.tensor([[p for p, _, _, _ in RELEASE_ROPE]])
    cos, sin = rope_cos_sin(positions, RELEASE_HEAD_DIM, MingConfig.from_file(RELEASE_CONFIG).llm_config.rope_theta)
    assert cos.shape == sin.shape == (1, len(RELEASE_ROPE), RELEASE_HEAD_DIM)
    half = RELEASE_HEAD_DIM // 2
    for row, (_, j, want_cos, want_sin) in enumerate(RELEASE_ROPE):
        for dim in (j, j + half):  # NeoX layout: frequency j drives dims j and j + head_dim / 2
            assert abs(cos[0, row, dim].item() - want_cos) < 2e-5, (row, dim)
            assert abs(sin[0, row, dim].item() - want_sin) < 2e-5, (row, dim)


def test_rope_rotates_dim_j_with_dim_j_plus_half():
    """NeoX rotation (the reference's rotate_half): x_j' = x_j cos - x_(j+D/2) sin, x_(j+D/2)' = x_(j+D/2) cos + x_j sin.
    An interleaved (GPT-J) rotation, which pairs dims 2j and 2j+1, fails this."""
    dim, half = RELEASE_HEAD_DIM, RELEASE_HEAD_DIM // 2
    p, j, c, s = RELEASE_ROPE[0]
    cos, sin = rope_cos_sin(torch.tensor([[p]]), dim, 600000.0)
    basis = torch.eye(dim)[None, :, None, :]  # [1, heads = dim, 1, dim]: head h holds the unit vector e_h
    rotated = apply_rope(basis, cos, sin)[0, :, 0]  # row h: the image of e_h
    want_j = torch.zeros(dim)
    want_j[j], want_j[j + half] = c, s
    want_j_half = torch.zeros(dim)
    want_j_half[j], want_j_half[j + half] = -s, c
    torch.testing.assert_close(rotated[j], want_j, rtol=0, atol=1e-6)
    torch.testing.assert_close(rotated[j + half], want_j_half, rtol=0, atol=1e-6)


def test_kv_cache_decode_equals_full_recompute():
    llm = tiny_llm()
    ids = torch.randint(0, 126464, (1, 9), generator=torch.Generator().manual_seed(2))
    want = full_logits(llm, ids)
    prompt = 5
    cache = llm.new_cache(1, 12, torch.float32, "cpu")
    valid = cache.valid
    valid[:, :prompt] = True
    hidden = llm.model(
        llm.model.word_embeddings(ids[:, :prompt]),
        torch.arange(prompt)[None],
        prompt_mask(valid[:, :prompt]),
        None,
        cache,
        torch.arange(prompt),
    )
    torch.testing.assert_close(llm.logits(hidden), want[:, :prompt], rtol=1e-4, atol=1e-5)
    for i in range(prompt, 9):
        valid[:, i] = True
        hidden = llm.model(
            llm.model.word_embeddings(ids[:, i : i + 1]),
            torch.tensor([[i]]),
            decode_mask(valid),
            None,
            cache,
            torch.tensor([i]),
        )
        torch.testing.assert_close(llm.logits(hidden)[:, 0], want[:, i], rtol=1e-4, atol=1e-5)


def test_norm_head_normalises_columns_once():
    llm = tiny_llm()
    raw = llm.lm_head.weight.detach().clone()
    llm.normalize_head_()
    llm.normalize_head_()
    torch.testing.assert_close(llm.lm_head.weight, raw / (raw.norm(dim=0, keepdim=True) + 1e-7))


def test_sampling_rules():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    greedy = SamplingConfig(do_sample=False)
    assert select_next_token(logits, greedy, None, None).item() == 1
    top1 = SamplingConfig(do_sample=True, top_k=1)
    assert all(select_next_token(logits, top1, None, torch.Generator().manual_seed(s)).item() == 1 for s in range(5))
    nucleus = SamplingConfig(do_sample=True, top_p=0.5)
    assert all(select_next_token(logits, nucleus, None, torch.Generator().manual_seed(s)).item() == 1 for s in range(5))
    wide = SamplingConfig(do_sample=True, top_p=0.99)
    picks = {select_next_token(logits, wide, None, torch.Generator().manual_seed(s)).item() for s in range(40)}
    assert picks == {1, 2}
    # The draws follow the nucleus renormalised, row by row, in vocabulary order (rows sorted differently).
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.2, 0.05], [0.5, 0.02, 0.03, 0.05, 0.4]])
    nucleus = SamplingConfig(do_sample=True, top_p=0.85)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([select_next_token(probs.log(), nucleus, None, generator) for _ in range(4000)])
    for row, kept in ((0, {1: 0.4, 2: 0.3, 3: 0.2}), (1, {0: 0.5, 4: 0.4})):
        counts = torch.bincount(draws[:, row], minlength=5).float() / len(draws)
        for token in range(5):
            want = kept.get(token, 0.0) / sum(kept.values())
            assert abs(counts[token].item() - want) < 0.03, (row, token, counts.tolist())
    # no_repeat_ngram_size=2: after "... 7 1" the bigram (1, x) seen before bans x.
    assert NgramGuard(2, [1, 2, 7, 1]).banned() == [2]
    guard = NgramGuard(3, [5, 6, 9, 5])
    assert guard.banned() == []
    guard.append(6)  # "5 6" was followed by 9 before
    assert guard.banned() == [9]
    guarded = SamplingConfig(no_repeat_ngram_size=2)
    assert select_next_token(logits, guarded, [NgramGuard(2, [1, 1])], None).item() == 2


def test_left_padded_row_equals_its_unpadded_run():
    llm = tiny_llm()
    ids = torch.randint(0, 126464, (1, 6), generator=torch.Generator().manual_seed(3))
    want = full_logits(llm, ids)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    batch = torch.cat([padded, torch.randint(0, 126464, (1, 8), generator=torch.Generator().manual_seed(4))])
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :2] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    hidden = llm.model(llm.model.word_embeddings(batch), positions, prompt_mask(valid), None)
    torch.testing.assert_close(llm.logits(hidden)[0, 2:], want[0], rtol=1e-4, atol=1e-5)


def test_ngram_guard_equals_the_brute_force_rule():
    rng = torch.Generator().manual_seed(5)
    for n in (2, 3, 4):
        seq = torch.randint(0, 4, (60,), generator=rng).tolist()
        guard = NgramGuard(n, seq[:10])
        for t in range(10, 60):
            history = seq[:t]
            prefix = tuple(history[t - n + 1 :])
            want = sorted({history[i + n - 1] for i in range(t - n + 1) if tuple(history[i : i + n - 1]) == prefix})
            assert guard.banned() == want
            guard.append(seq[t])


def test_chunks_prefilled_after_earlier_ones_equal_one_prompt():
    """A prompt prefilled in three chunks at growing cache offsets (each attending over the cache) gives the
    logits of the whole prompt at once: what chunked prefill and cache prefixes rely on."""
    llm = tiny_llm()
    ids = torch.randint(0, 126464, (1, 11), generator=torch.Generator().manual_seed(5))
    want = full_logits(llm, ids)
    cache = llm.new_cache(1, 16, torch.float32, "cpu")
    got = []
    for start, end in ((0, 4), (4, 9), (9, 11)):
        slots = torch.arange(start, end)
        cache.valid[:, start:end] = True
        hidden = llm.model(llm.model.word_embeddings(ids[:, start:end]), slots[None], cache_mask(cache.valid, slots),
                           None, cache, slots)
        got.append(llm.logits(hidden))
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-4, atol=1e-5)
    # The mask really is causal inside a chunk: query slot 5 sees slots 0..5 and nothing later.
    assert cache_mask(cache.valid, torch.arange(4, 9))[0, 0, 1].tolist() == [True] * 6 + [False] * 10
