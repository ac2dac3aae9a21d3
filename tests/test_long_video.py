"""Long video: sampling and seeking (ming.media), redundant-token dropping and the chunked pipeline
(ming.long_video), the fixed-budget KV cache with re-rotated keys (ming.kv_budget).

Random weights cannot show accuracy, so these pin the mechanics: exactness where the method promises it
(chunking, re-rotation, gather vs mask), the invariants (budget, positions, determinism), and what the
weight-independent pixel criterion must do on videos made here with PyAV (static, slideshow, moving sprite, noise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ming.kv_budget import (
    MAX_POSITIONS,
    BudgetedPrefill,
    gather_slots,
    redundancy_value_scores,
    rerotate_keys,
    select_kept,
)
from ming.layers import apply_rope, rope_cos_sin
from ming.llm import IMAGE, BailingMoeForCausalLM
from ming.long_video import LongVideoSettings, TokenDropper, encode_video
from ming.media import (
    DecodeStats,
    LONG_VIDEO_MAX_FRAMES,
    long_video_fps,
    long_video_timestamps,
    plan_long_video,
    read_frames_at,
    video_duration,
)
from ming.generation import Decoder
from ming.modeling import MingOmni
from ming.processor import MingProcessor
from ming.sampling import SamplingConfig
from ming.testing.tiny import build_tiny_checkpoint, tiny_config
from ming.testing.weights import tiny_tensor
from tests import synthetic_video

THETA = 600000.0  # the release's rope_theta
FPS = 2  # frame rate of the synthetic videos: low, so an hour encodes in a second
GOP = 20  # keyframe every 10 s, so seeking has something to skip
SIZE = (64, 48)  # width, height


# ------------------------------------------------------------------------------------------------- synthetic media

def sprite_frame(index: int, size=SIZE) -> np.ndarray:
    """A white 8x8 square on grey whose x position is the frame index modulo the free width: the frame shown at
    any time can be read back from the pixels."""
    width, height = size
    image = np.full((height, width, 3), 60, dtype=np.uint8)
    x = index % (width - 8)
    image[20:28, x:x + 8] = 255
    return image


SLIDE_SECONDS = 37.0  # cuts at 37 s, 74 s, ...
SLIDE_COLOURS = [(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40), (40, 230, 230), (230, 40, 230)]


def slide_of(seconds: float) -> int:
    return int(seconds // SLIDE_SECONDS) % len(SLIDE_COLOURS)


def slide_frame(index: int, size=SIZE) -> np.ndarray:
    return np.full((size[1], size[0], 3), SLIDE_COLOURS[slide_of(index / FPS)], dtype=np.uint8)


def static_frame(index: int, size=SIZE) -> np.ndarray:
    return synthetic_video.static_frame(index, size)


def noise_frame(index: int, size=SIZE) -> np.ndarray:
    return synthetic_video.noise_frame(index, size)


def write_video(path: Path, minutes: float, frame_of) -> Path:
    return synthetic_video.write_video(path, minutes, frame_of, FPS, GOP, SIZE, qp=10)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("long_videos")
    return {
        "sprite_60": write_video(folder / "sprite_60.mp4", 60, sprite_frame),
        "slides_10": write_video(folder / "slides_10.mp4", 10, slide_frame),
        "static_60": write_video(folder / "static_60.mp4", 60, static_frame),
        "noise_1": write_video(folder / "noise_1.mp4", 1, noise_frame),
    }


# ------------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize(("minutes", "fps"), [(1, 2.0), (10, 2.0), (60, 1.0), (120, 0.5), (600, 0.5)])
def test_long_video_rate_falls_with_length(minutes, fps):
    seconds = minutes * 60.0
    times = long_video_timestamps(seconds)
    assert long_video_fps(seconds) == fps
    assert len(times) == min(int(seconds * fps), LONG_VIDEO_MAX_FRAMES) and len(times) % 2 == 0
    assert all(0 < a < b < seconds for a, b in zip(times, times[1:]))
    assert len(long_video_timestamps(seconds, max_frames=101)) == min(100, len(times))  # capped, even


def test_seeking_reads_the_frame_on_screen_and_skips_most_of_an_hour(videos):
    path = videos["sprite_60"]
    assert video_duration(path) == pytest.approx(3600, abs=1)
    times = long_video_timestamps(3600, max_frames=120)  # one frame per 30 s
    stats = DecodeStats()
    frames = list(read_frames_at(path, times, stats=stats))
    assert len(frames) == 120 and frames[0].shape == (48, 64, 3)
    for seconds, frame in zip(times, frames):
        expected_x = int(seconds * FPS) % (SIZE[0] - 8)
        row = frame[24, :, 0].astype(int)
        assert abs(int(np.argmax(row > 160)) - expected_x) <= 1, seconds
    total = 3600 * FPS
    # Each sample costs at most one keyframe interval of decoding: under a fifth of the file here.
    assert stats.seeks >= 100 and stats.decoded <= len(times) * (GOP + 1) and stats.decoded < total // 5


def test_dense_sampling_decodes_forward_without_seeking(videos):
    times = long_video_timestamps(600, max_frames=2400)  # more samples than frames: some frames twice
    stats = DecodeStats()
    frames = list(read_frames_at(videos["slides_10"], times, stats=stats))
    assert len(frames) == 1200 and stats.seeks <= 1 and stats.decoded == 1200


def test_slideshow_cuts_land_where_they_were_made(videos):
    plan = plan_long_video(videos["slides_10"], max_frames=240)
    progress = []
    frames = read_frames_at(videos["slides_10"], plan.timestamps, (plan.height, plan.width),
                            progress=lambda f, stage: progress.append((f, stage)))
    for seconds, frame in zip(plan.timestamps, frames):
        assert frame.shape == (plan.height, plan.width, 3)
        if abs(seconds - round(seconds / SLIDE_SECONDS) * SLIDE_SECONDS) < 1.0:
            continue  # within a frame of a cut
        colour = frame[plan.height // 2, plan.width // 2].astype(int)
        assert np.abs(colour - SLIDE_COLOURS[slide_of(seconds)]).max() < 24, seconds
    assert len(progress) == 240 and progress[-1] == (1.0, "sampling")
    assert all(a[0] < b[0] for a, b in zip(progress, progress[1:]))


# ------------------------------------------------------------------------------------------------- token dropping

def in_memory(frame_of, pairs: int, size=(56 * 3, 28 * 4)) -> np.ndarray:
    """Frames [2 * pairs, H, W, 3] straight from a generator (no codec noise), at a size of whole 28-px cells."""
    return np.stack([frame_of(i, size) for i in range(2 * pairs)])


def kept_per_pair(frames: np.ndarray, tau: float, chunk_pairs: int = 4) -> np.ndarray:
    dropper = TokenDropper(tau)
    chunks = [dropper(frames[i:i + 2 * chunk_pairs]) for i in range(0, frames.shape[0], 2 * chunk_pairs)]
    return np.concatenate(chunks)


def test_static_video_keeps_exactly_the_first_pair():
    keep = kept_per_pair(in_memory(static_frame, 20), tau=0.01)
    assert keep[0].all() and not keep[1:].any()


def test_noise_keeps_every_token():
    assert kept_per_pair(in_memory(noise_frame, 12), tau=0.05).all()


def test_threshold_zero_keeps_everything():
    assert kept_per_pair(in_memory(static_frame, 6), tau=0.0).all()


def test_kept_set_shrinks_as_the_threshold_grows():
    frames = np.concatenate([in_memory(sprite_frame, 10), in_memory(noise_frame, 3), in_memory(slide_frame, 5)])
    frames = frames.copy()
    frames[10:20] //= 2  # a fade: moderate changes everywhere
    previous = None
    for tau in (0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 0.6, 1.0):
        keep = kept_per_pair(frames, tau)
        if previous is not None:
            assert not (keep & ~previous).any() and keep.sum() <= previous.sum()
        previous = keep
    assert previous[0].all() and previous[1:].sum() == 0  # only the first pair survives tau = 1


def test_a_single_inserted_needle_pair_is_always_kept():
    frames = in_memory(static_frame, 30)
    needle = 17
    frames[2 * needle:2 * needle + 2, 28:56, 56:84] = 255  # one changed cell in one pair
    for tau in (0.01, 0.1, 0.3):
        keep = kept_per_pair(frames, tau)
        assert keep[needle, 1, 2] and keep[needle].sum() == 1
        assert keep[0].all()
        # The pair after the needle changed too (back to the scene); nothing else did.
        assert keep[needle + 1, 1, 2] and keep[needle + 1].sum() == 1
        others = np.delete(np.arange(30), [0, needle, needle + 1])
        assert not keep[others].any()


def test_dropping_does_not_depend_on_chunking():
    frames = np.concatenate([in_memory(sprite_frame, 9), in_memory(static_frame, 9)])
    whole = kept_per_pair(frames, 0.02, chunk_pairs=18)
    for chunk_pairs in (1, 3, 5):
        assert np.array_equal(kept_per_pair(frames, 0.02, chunk_pairs=chunk_pairs), whole)


# ------------------------------------------------------------------------------------------------- KV mechanics

def test_rerotation_is_exact():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 4, 300, 128, generator=g)
    old = torch.randint(0, MAX_POSITIONS, (2, 300), generator=g)
    new = torch.randint(0, MAX_POSITIONS, (2, 300), generator=g)
    rotated_old = apply_rope(keys, *rope_cos_sin(old, 128, THETA))
    rotated_new = apply_rope(keys, *rope_cos_sin(new, 128, THETA))
    moved = rerotate_keys(rotated_old, old[:, None], new[:, None], THETA)
    assert (moved - rotated_new).abs().max() <= 1e-6 * rotated_new.abs().max()
    # Per-head positions (each KV head keeps its own tokens) broadcast the same way.
    per_head_old = torch.randint(0, MAX_POSITIONS, (4, 300), generator=g)
    moved = rerotate_keys(apply_rope(keys[:1].transpose(0, 1), *rope_cos_sin(per_head_old, 128, THETA)),
                          per_head_old[:, None], new[:1].expand(4, 1, -1), THETA).transpose(0, 1)
    want = apply_rope(keys[:1], *rope_cos_sin(new[:1], 128, THETA))
    assert (moved - want).abs().max() <= 1e-6 * want.abs().max()


def test_gathered_cache_equals_full_cache_with_evicted_entries_masked():
    g = torch.Generator().manual_seed(1)
    layers, kv_heads, heads, n, dim, keep = 3, 2, 4, 64, 16, 23
    keys = torch.randn(layers, 1, kv_heads, n, dim, generator=g)
    values = torch.randn(layers, 1, kv_heads, n, dim, generator=g)
    for layer in range(layers):
        kept = select_kept(torch.randn(kv_heads, n, generator=g), keep)  # each head its own tokens
        query = torch.randn(1, heads, 5, dim, generator=g)
        gathered = F.scaled_dot_product_attention(
            query, gather_slots(keys[layer], kept), gather_slots(values[layer], kept), enable_gqa=True)
        mask = torch.zeros(kv_heads, n, dtype=torch.bool)
        mask[torch.arange(kv_heads)[:, None], kept] = True
        mask = mask.repeat_interleave(heads // kv_heads, dim=0)[None, :, None, :].expand(1, heads, 5, n)
        masked = F.scaled_dot_product_attention(query, keys[layer], values[layer], attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(gathered, masked, rtol=1e-6, atol=1e-6)


def test_scores_find_repeated_cells_and_are_deterministic():
    g = torch.Generator().manual_seed(2)
    kv_heads, cells, pairs, dim = 2, 6, 4, 32
    plain = torch.randn(kv_heads, cells, dim, generator=g)
    # Pair 2 repeats pair 1 exactly (same plain keys); each token is stored rotated at its own position.
    content = torch.stack([plain + shift for shift in (0.0, 0.7, 0.7, 1.9)], dim=1)
    content = content.reshape(kv_heads, pairs * cells, dim)
    positions = torch.arange(100, 100 + pairs * cells)
    keys = apply_rope(content[None], *rope_cos_sin(positions[None], dim, THETA))[0]
    values = torch.ones(kv_heads, pairs * cells, dim)
    pair = torch.arange(pairs).repeat_interleave(cells).expand(kv_heads, -1)
    cell = torch.arange(cells).repeat(pairs).expand(kv_heads, -1)
    scores = redundancy_value_scores(keys, values, pair, cell, positions, THETA)
    by_pair = scores.view(kv_heads, pairs, cells)
    assert torch.allclose(by_pair[:, 0], by_pair[:, 0].new_full((), dim ** 0.5))  # no predecessor: novelty 1
    assert by_pair[:, 2].max() < 1e-5  # an exact repeat scores zero
    kept = select_kept(scores, cells * 3)
    assert not ((kept >= 2 * cells) & (kept < 3 * cells)).any()  # the repeated pair goes first
    assert torch.equal(kept, select_kept(scores.clone(), cells * 3))
    ties = torch.zeros(2, 10)
    assert select_kept(ties, 4).tolist() == [[0, 1, 2, 3]] * 2  # ties go to the earlier slot


# ------------------------------------------------------------------------------------------------- budgeted prefill

@pytest.fixture(scope="module")
def tiny_llm() -> BailingMoeForCausalLM:
    llm = BailingMoeForCausalLM(tiny_config().llm_config)
    llm.load_state_dict({k: tiny_tensor(k, tuple(v.shape)) for k, v in llm.state_dict().items()})
    return llm.eval()


def stream_visual(llm, budget, chunks, chunk_len, head=5, cells=16, seed=0, watch=None, room=0):
    """Prefill `head` text tokens, then `chunks` chunks of random visual embeddings, then 2 text tokens, into a
    budgeted cache with `room` slots to spare."""
    g = torch.Generator().manual_seed(seed)
    hidden = llm.config.hidden_size
    state = BudgetedPrefill(llm, head + budget + 2 + room, budget)
    state.append(llm.model.word_embeddings(torch.arange(1000, 1000 + head)[None]))
    for c in range(chunks):
        first = c * chunk_len
        ids = torch.arange(first, first + chunk_len)
        embeds = F.normalize(torch.randn(1, chunk_len, hidden, generator=g), dim=-1)
        state.append(embeds, torch.full((1, chunk_len), IMAGE), (ids // cells, ids % cells))
        if watch is not None:
            watch(state)
    state.append(llm.model.word_embeddings(torch.tensor([[126350, 2000]])))
    return state


def test_chunked_prefill_equals_one_shot_when_nothing_is_evicted(tiny_llm):
    g = torch.Generator().manual_seed(3)
    hidden = tiny_llm.config.hidden_size
    embeds = torch.randn(1, 57, hidden, generator=g)
    router = torch.tensor([[0] * 7 + [1] * 40 + [0] * 10])
    one_shot = tiny_llm.model(embeds, torch.arange(57)[None], None, router)
    state = BudgetedPrefill(tiny_llm, 57, budget=None)
    pieces = [state.append(embeds[:, :7], router[:, :7])]
    for start in range(7, 47, 12):
        end = min(start + 12, 47)
        ids = torch.arange(start, end)
        pieces.append(state.append(embeds[:, start:end], router[:, start:end], (ids, ids)))
    pieces.append(state.append(embeds[:, 47:], router[:, 47:]))
    chunked = torch.cat(pieces, dim=1)
    torch.testing.assert_close(chunked, one_shot, rtol=1e-5, atol=1e-5)
    assert state.evicted == 0 and state.prefix().length == 57


def test_cache_stays_within_budget_and_positions_within_range(tiny_llm):
    budget, seen = 1536, []
    original = tiny_llm.model.forward

    def watch_positions(*args, **kwargs):
        seen.append(int(args[1].max()))
        return original(*args, **kwargs)

    def check(state):
        assert state.visual_count <= budget and state.filled <= state.capacity <= MAX_POSITIONS

    tiny_llm.model.forward = watch_positions
    try:
        state = stream_visual(tiny_llm, budget, chunks=33, chunk_len=1024, watch=check)  # 33,792 visual tokens
    finally:
        del tiny_llm.model.forward
    prefix = state.prefix()
    assert max(seen) <= MAX_POSITIONS - 1 and max(seen) < state.capacity
    assert prefix.length == 5 + budget + 2 == prefix.next_position
    assert state.visual_start == 5 and state.visual_kept == budget and state.evicted == 33 * 1024 - budget
    assert state.peak <= state.capacity
    # The newest chunk is never evicted: all of it is still there, in every layer and head.
    last = torch.arange(32 * 1024, 33 * 1024)
    ids = state.sources.pair[..., : prefix.length] * 16 + state.sources.cell[..., : prefix.length]
    for row in ids.flatten(0, 1):
        assert torch.isin(last, row).all()


def test_eviction_is_deterministic_and_per_head(tiny_llm):
    a = stream_visual(tiny_llm, 96, chunks=6, chunk_len=48, seed=4)
    b = stream_visual(tiny_llm, 96, chunks=6, chunk_len=48, seed=4)
    for x, y in zip(a.prefix().keys + a.prefix().values, b.prefix().keys + b.prefix().values):
        assert torch.equal(x, y)
    assert torch.equal(a.sources.pair, b.sources.pair) and torch.equal(a.sources.cell, b.sources.cell)
    ids = a.sources.pair * 16 + a.sources.cell  # [layers, kv_heads, slots]
    visual = ids[..., 5:5 + 96]
    assert (visual >= 0).all() and (visual.diff(dim=-1) > 0).all()  # time order kept in every head
    assert not all(torch.equal(visual[0, 0], visual[i, j]) for i in range(visual.shape[0])
                   for j in range(visual.shape[1]))  # heads and layers choose for themselves


def test_evicted_cache_holds_the_kept_keys_rerotated(tiny_llm):
    g = torch.Generator().manual_seed(5)
    hidden = tiny_llm.config.hidden_size
    state = BudgetedPrefill(tiny_llm, 3 + 60, budget=60)  # both chunks fit: nothing evicted until evict_
    state.append(torch.randn(1, 3, hidden, generator=g))
    for c in range(2):
        ids = torch.arange(c * 30, c * 30 + 30)
        state.append(torch.randn(1, 30, hidden, generator=g), torch.full((1, 30), IMAGE), (ids // 10, ids % 10))
    before_k = [k.clone() for k in state.cache.keys]
    before_v = [v.clone() for v in state.cache.values]
    sources = (state.sources.pair[..., 3:].clone(), state.sources.cell[..., 3:].clone())
    state.evict_(12)
    for layer, (k, v) in enumerate(zip(state.cache.keys, state.cache.values)):
        scores = redundancy_value_scores(before_k[layer][0, :, 3:], before_v[layer][0, :, 3:], sources[0][layer],
                                         sources[1][layer], torch.arange(3, 63), tiny_llm.config.rope_theta)
        kept = select_kept(scores, 12)
        torch.testing.assert_close(v[:, :, 3:15], gather_slots(before_v[layer][:, :, 3:], kept), rtol=0, atol=0)
        moved = rerotate_keys(k[:, :, 3:15], torch.arange(3, 15), 3 + kept, tiny_llm.config.rope_theta)
        torch.testing.assert_close(moved, gather_slots(before_k[layer][:, :, 3:], kept), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k[:, :, :3], before_k[layer][:, :, :3], rtol=0, atol=0)  # text untouched
        assert torch.equal(state.sources.pair[layer, :, 3:15], sources[0][layer].gather(-1, kept))
    assert state.filled == 15 and not state.cache.valid[0, 15:].any() and state.cache.valid[0, :15].all()


def greedy_after(llm, prefix, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """First-token logits and greedy tokens of a continuation prefilled from `prefix` by the generation code."""
    embeds = llm.model.word_embeddings(ids)
    decoder = Decoder(llm, {}, embeds, torch.zeros_like(ids), ids, None, SamplingConfig(max_new_tokens=steps),
                      prefix)
    logits = decoder.logits.clone()
    tokens = []
    while not decoder.done:
        tokens += [t for t in decoder.step() if t is not None]
    return logits, tokens


def test_prefix_moves_to_host_and_a_follow_up_prefills_only_itself(tiny_llm):
    state = stream_visual(tiny_llm, 64, chunks=4, chunk_len=32, seed=6, room=8)
    prefix = state.prefix()
    assert prefix.length == prefix.next_position == 5 + 64 + 2
    question = torch.tensor([[3000, 3001, 3002]])
    # The same continuation straight on the prefill state (one token at a time after the question) ...
    hidden = state.append(tiny_llm.model.word_embeddings(question))
    direct_logits, direct_tokens = tiny_llm.logits(hidden[:, -1]), []
    for _ in range(4):
        token = int(direct_logits.argmax(-1)) if not direct_tokens else int(logits.argmax(-1))
        direct_tokens.append(token)
        logits = tiny_llm.logits(state.append(tiny_llm.model.word_embeddings(torch.tensor([[token]])))[:, -1])
    # ... equals generation from the prefix after a round trip through host memory.
    logits, tokens = greedy_after(tiny_llm, prefix.to("cpu"), question, 4)
    torch.testing.assert_close(logits, direct_logits, rtol=1e-6, atol=1e-6)
    assert tokens == direct_tokens


# ------------------------------------------------------------------------------------------------- whole pipeline

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), with_speech=False)
    return MingOmni.from_pretrained(folder, dtype=torch.float32), MingProcessor.from_pretrained(folder)


def ask(video, question: str = "What happens?") -> list[dict]:
    return [{"role": "HUMAN", "content": [{"type": "video", "video": str(video)}, {"type": "text", "text": question}]}]


def test_video_prompt_pieces_are_the_processor_prompt(tiny):
    model, processor = tiny
    fixture = Path(__file__).parent / "fixtures" / "processor" / "video.mp4"
    messages = ask(fixture) + [{"role": "ASSISTANT", "content": "A fox."}, {"role": "HUMAN", "content": "Sure?"}]
    inputs = processor(messages, system_prompt="Be brief.")
    prompt = processor.video_prompt(messages, system_prompt="Be brief.")
    patches = int((inputs["input_ids"] == 126346).sum())
    rebuilt = torch.cat([prompt.head_ids, torch.full((1, patches), 126346), prompt.tail_ids, prompt.continuation_ids],
                        dim=1)
    assert torch.equal(rebuilt, inputs["input_ids"])
    first_turn = processor.video_prompt(ask(fixture), system_prompt="Be brief.")
    assert torch.equal(first_turn.head_ids, prompt.head_ids)  # a follow-up reuses the same cached prefix
    with pytest.raises(ValueError, match="one video and text only"):
        processor.video_prompt(ask(fixture) + [{"role": "HUMAN", "content": [{"type": "video", "video": "x"}]}])


def test_short_clip_through_the_pipeline_equals_one_shot_prompt(tiny, tmp_path):
    model, processor = tiny
    clip = write_video(tmp_path / "clip.mp4", 10 / 60, sprite_frame)  # 10 s: the short path, 20 frames
    messages = ask(clip)
    prompt = processor.video_prompt(messages)
    stages = []
    settings = LongVideoSettings(visual_budget=None, drop_threshold=0.0, chunk_pairs=4)
    video = encode_video(model, processor, prompt, settings, progress=lambda f, stage: stages.append((f, stage)))
    inputs = processor(messages)
    stats = video.stats
    assert stats.path == "short" and stats.frames == 20 and stats.after_drop == stats.visual_tokens == stats.kept
    assert video.prefix.length == prompt.head_ids.shape[1] + stats.visual_tokens + 1
    assert stages[-1] == (1.0, "prefill") and {s for _, s in stages} == {"sampling", "encoding", "prefill"}
    assert all(a[0] <= b[0] for a, b in zip(stages, stages[1:]))

    one_shot = model(**inputs).logits[:, -1]
    embeds, router_ids = model.embed(prompt.continuation_ids)
    decoder = Decoder(model.model, {}, embeds, router_ids, prompt.continuation_ids, None,
                      SamplingConfig(max_new_tokens=1), video.prefix)
    torch.testing.assert_close(decoder.logits, one_shot, rtol=1e-5, atol=1e-5)
    want = model.generate(**inputs, max_new_tokens=6).tolist()[0]
    got = list(model.generate_stream(prompt.continuation_ids, prefix=video.prefix, max_new_tokens=6))
    assert got == want[: len(got)] and len(got) == len([t for t in want if t != 126081])


def test_chunked_vit_equals_one_shot(tiny):
    model, processor = tiny
    frames = in_memory(sprite_frame, 5, size=(56 * 2, 28 * 3))
    patches, grid = processor.frames_to_patches(frames)
    whole = model.encode_images(patches, torch.tensor([grid]))
    per_pair = grid[1] * grid[2]
    pieces = [model.encode_images(patches[i * per_pair:(i + 2) * per_pair], torch.tensor([(min(2, 5 - i), *grid[1:])]))
              for i in range(0, 5, 2)]
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["slides_10", "static_60", "noise_1"])
def test_long_videos_through_the_pipeline(tiny, videos, name):
    model, processor = tiny
    budget = 1200
    frames = {"slides_10": 400, "static_60": 96, "noise_1": 120}[name]  # a sample per 1.5 s, 37.5 s, 0.5 s
    settings = LongVideoSettings(visual_budget=budget, drop_threshold=0.02, chunk_pairs=8, max_frames=frames)
    prompt = processor.video_prompt(ask(videos[name]))
    stages = []
    video = encode_video(model, processor, prompt, settings, progress=lambda f, stage: stages.append(f))
    stats = video.stats
    head = prompt.head_ids.shape[1]
    assert stats.path == "long"  # all longer than the short-clip limit (32 s)
    assert stats.kept <= budget and video.prefix.length == head + stats.kept + 1 <= MAX_POSITIONS
    assert stats.peak_slots <= head + budget + 1 and stages[-1] == 1.0
    if name == "static_60":
        assert stats.after_drop == stats.tokens_per_pair  # the first pair only
        assert stats.decoded_frames < 3600 * FPS // 5  # seeking: most of the hour is never decoded
    if name == "slides_10":
        assert stats.tokens_per_pair < stats.after_drop < stats.visual_tokens // 2  # the cuts and little else
    if name == "noise_1":
        assert stats.after_drop == stats.visual_tokens and stats.evicted == stats.visual_tokens - budget
    tokens = list(model.generate_stream(prompt.continuation_ids, prefix=video.prefix, max_new_tokens=3))
    follow_up = processor.video_prompt(ask(videos[name]) + [{"role": "ASSISTANT", "content": "x"},
                                                            {"role": "HUMAN", "content": "And then?"}])
    assert torch.equal(follow_up.head_ids, prompt.head_ids)
    assert len(list(model.generate_stream(follow_up.continuation_ids, prefix=video.prefix, max_new_tokens=3))) \
        == len(tokens) == 3
