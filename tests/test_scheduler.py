"""Continuous batching: per-row cache slots (ming/generation.py, ming/layers.py) and the scheduler
(serving/scheduler.py) on the tiny checkpoint, on the CPU; and the app with eight visitors at once.

The plain PyTorch path is the reference: every request served next to others must get exactly what it gets alone
through `model.generate_stream`."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch

from ming.generation import DecodeStep
from ming.layers import cache_mask
from ming.modeling import MingOmni
from ming.testing.tiny import build_tiny_checkpoint

from tests.test_llm import tiny_llm


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 120000, (1, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- per-row cache slots
def prefill_row(llm, cache, row: int, ids: torch.Tensor) -> torch.Tensor:
    """Prefill one prompt into one row of a shared cache; its last logits."""
    view = cache.rows(slice(row, row + 1))
    slots = torch.arange(ids.shape[1])
    view.valid[:, : ids.shape[1]] = True
    hidden = llm.model(llm.model.word_embeddings(ids), slots[None], cache_mask(view.valid, slots), None, view, slots)
    return llm.logits(hidden[:, -1])


def greedy_alone(llm, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    cache = llm.new_cache(1, 64, torch.float32, "cpu")
    logits = prefill_row(llm, cache, 0, ids)
    step = DecodeStep(llm, 1, 64, torch.float32, torch.device("cpu"), capture=False, cache=cache)
    tokens, all_logits = [], [logits]
    for i in range(steps):
        token = logits.argmax(-1)
        tokens.append(int(token))
        logits = step(token, torch.tensor([ids.shape[1] + i]), ids.shape[1] + i)
        all_logits.append(logits)
    return tokens, all_logits


@torch.no_grad()
def test_rows_at_their_own_slots_decode_as_each_row_alone():
    """Three prompts of different lengths in rows of one cache, decoded together, each row at its own slot and
    position: every row's logits and greedy tokens equal that prompt decoded alone."""
    llm = tiny_llm()
    prompts = [prompt(n, seed) for n, seed in ((5, 1), (11, 2), (8, 3))]
    want = [greedy_alone(llm, ids, 6) for ids in prompts]
    cache = llm.new_cache(4, 64, torch.float32, "cpu")  # one spare row: it decodes garbage at its first slot
    logits = torch.cat([prefill_row(llm, cache, r, ids) for r, ids in enumerate(prompts)])
    step = DecodeStep(llm, 4, 64, torch.float32, torch.device("cpu"), capture=False, cache=cache)
    lengths = torch.tensor([ids.shape[1] for ids in prompts] + [0])  # the spare row writes at its first slot
    got_tokens = [[] for _ in prompts]
    for i in range(6):
        for r in range(3):
            torch.testing.assert_close(logits[r], want[r][1][i][0], rtol=1e-5, atol=1e-5)
        tokens = logits.argmax(-1)
        tokens = torch.cat([tokens, torch.zeros(4 - len(tokens), dtype=torch.long)])
        for r in range(3):
            got_tokens[r].append(int(tokens[r]))
        slots = torch.cat([lengths[:3] + i, lengths[3:]])
        logits = step(tokens, slots, slots)[:3]
        cache.valid[3] = False  # the spare row keeps nothing
    assert got_tokens == [w[0] for w in want]
    # Each row's slots hold only its own tokens: the other rows' slots stayed invalid.
    assert cache.valid[:3].sum(-1).tolist() == [int(n) + 6 for n in lengths[:3]]
    assert not cache.valid[:3, 40:].any()


@torch.no_grad()
def test_one_slot_for_all_rows_still_works():
    """The old call (one slot number for every row) equals passing that slot per row."""
    llm = tiny_llm()
    ids = torch.cat([prompt(6, 4), prompt(6, 5)])
    outs = []
    for index in (6, torch.tensor([6, 6])):
        cache = llm.new_cache(2, 16, torch.float32, "cpu")
        for r in range(2):
            prefill_row(llm, cache, r, ids[r:r + 1])
        step = DecodeStep(llm, 2, 16, torch.float32, torch.device("cpu"), capture=False, cache=cache)
        outs.append(step(torch.tensor([7, 9]), torch.tensor([6, 6]), index))
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------------- scheduler
from ming.processor import MingProcessor  # noqa: E402
from ming.sampling import SamplingConfig  # noqa: E402
from serving.scheduler import Scheduler, batch_buckets, kv_bytes_per_token, plan_cache  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(REPO, "examples", "images", "street.png")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[MingOmni, MingProcessor]:
    folder = build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), with_speech=False)
    return MingOmni.from_pretrained(folder, dtype=torch.float32), MingProcessor.from_pretrained(folder)


def text_inputs(n: int, seed: int) -> dict[str, torch.Tensor]:
    ids = prompt(n, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def image_inputs(processor: MingProcessor) -> dict[str, torch.Tensor]:
    from PIL import Image

    message = {"role": "HUMAN", "content": [{"type": "image", "image": Image.open(IMAGE).convert("RGB")},
                                            {"type": "text", "text": "What is in this picture?"}]}
    return processor([message])


def alone(model: MingOmni, inputs: dict, sampling: SamplingConfig) -> tuple[list[int], str]:
    stream = model.generate_stream(**inputs, **sampling.__dict__)
    return list(stream), stream.finish_reason


def drain(stream) -> tuple[list[int], str]:
    return list(stream), stream.finish_reason


def run_concurrently(scheduler: Scheduler, requests: list[tuple[dict, SamplingConfig]]) -> list[tuple[list[int], str]]:
    """Submit every request from its own thread at once; each thread reads its own stream."""
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def visitor(i: int) -> None:
        start.wait()
        results[i] = drain(scheduler.submit(*requests[i]))

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def assert_rows_free(scheduler: Scheduler) -> None:
    """Once the streams have ended, every row is free and its valid flags are clear (within a few turns)."""
    deadline = time.time() + 10
    while (scheduler.active or scheduler.cache.valid.any()) and time.time() < deadline:
        time.sleep(0.05)
    assert not scheduler.active and not scheduler.cache.valid.any(), "every row is free and clean"


def test_cache_plan_fits_the_budget():
    per_token = 57_345  # the release: 28 layers x 4 KV heads x 128 x 2 (k, v) x bf16, plus the valid flag
    rows, capacity = plan_cache(per_token, 40 * 2**30, 32, 32768)
    assert (rows, capacity) == (32, 16384) and rows * capacity * per_token <= 40 * 2**30
    rows, capacity = plan_cache(per_token, 8 * 2**30, 32, 32768)
    assert capacity == 8192 and rows == 8 * 2**30 // (8192 * per_token) < 32, "rows go before context falls"
    assert plan_cache(per_token, 1, 32, 32768) == (1, 1024), "some room even on a tiny budget"
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32] and batch_buckets(6) == [1, 2, 4, 6]


@torch.no_grad()
def test_concurrent_requests_each_get_what_they_get_alone(tiny):
    """Different prompts, lengths, an image, sampling seeds, a repetition guard and max tokens, all at once:
    each stream equals that request run alone."""
    model, processor = tiny
    requests = [
        (text_inputs(7, 1), SamplingConfig(max_new_tokens=20)),
        (text_inputs(30, 2), SamplingConfig(max_new_tokens=9)),
        (image_inputs(processor), SamplingConfig(max_new_tokens=16)),
        (text_inputs(12, 3), SamplingConfig(max_new_tokens=14, do_sample=True, temperature=0.9, top_p=0.9, seed=5)),
        (text_inputs(12, 3), SamplingConfig(max_new_tokens=14, do_sample=True, top_k=20, seed=6)),
        (text_inputs(18, 4), SamplingConfig(max_new_tokens=25, no_repeat_ngram_size=3)),
    ]
    want = [alone(model, inputs, sampling) for inputs, sampling in requests]
    scheduler = Scheduler(model, max_active=8, prefill_chunk=512)
    try:
        got = run_concurrently(scheduler, requests)
        assert scheduler.peak_active > 1
    finally:
        scheduler.close()
    assert got == want


@torch.no_grad()
def test_prompts_prefilled_in_chunks_match_and_keep_thinker_states(tiny):
    """A prompt longer than a prefill chunk goes in several chunks between other rows' decode steps: same tokens
    as alone, and the same thinker_states (input embeddings + prompt hidden states) for the talker."""
    model, processor = tiny
    inputs, sampling = image_inputs(processor), SamplingConfig(max_new_tokens=12)
    want = model.generate_stream(**inputs, **sampling.__dict__)
    want_tokens = list(want)
    scheduler = Scheduler(model, max_active=4, prefill_chunk=16)
    try:
        other = scheduler.submit(text_inputs(9, 7), SamplingConfig(max_new_tokens=40))
        next(other)
        stream = scheduler.submit(inputs, sampling, thinker_states=True)
        torch.testing.assert_close(stream.thinker_states, want.thinker_states, rtol=1e-4, atol=1e-5)
        assert list(stream) == want_tokens
        assert len(list(other)) == 39
    finally:
        scheduler.close()


@torch.no_grad()
def test_arrivals_and_stops_mid_stream_leave_the_others_unchanged(tiny):
    """One request stopped after a few tokens, one that arrives mid-stream, one abandoned by its reader: the
    others' outputs are exactly their outputs alone, and every row is free afterwards."""
    model, _ = tiny
    long = (text_inputs(10, 11), SamplingConfig(max_new_tokens=40))
    short = (text_inputs(25, 12), SamplingConfig(max_new_tokens=30))
    late = (text_inputs(6, 13), SamplingConfig(max_new_tokens=12, do_sample=True, seed=3))
    want = {name: alone(model, *r) for name, r in (("long", long), ("short", short), ("late", late))}
    scheduler = Scheduler(model, max_active=4)
    try:
        stop = threading.Event()
        streams = {"long": scheduler.submit(*long), "stopped": scheduler.submit(*short, stop_event=stop),
                   "short": scheduler.submit(*short), "abandoned": scheduler.submit(*long)}
        got = {name: [next(streams[name]) for _ in range(5)] for name in streams}
        stop.set()
        streams["abandoned"].cancel()
        streams["late"] = scheduler.submit(*late)
        got["late"] = []
        for name in ("long", "short", "late"):
            got[name] += list(streams[name])
        assert list(streams["stopped"]) == [] and streams["stopped"].finish_reason == "stopped"
        for name in ("long", "short", "late"):
            assert (got[name], streams[name].finish_reason) == want[name], name
        assert_rows_free(scheduler)
    finally:
        scheduler.close()


@torch.no_grad()
def test_a_request_ending_while_its_next_step_runs_leaves_the_others_unchanged(tiny):
    """Each step is fed the tokens chosen after the last one on the device, before the host reads them, so a
    request whose token turns out to be <|endoftext|> is already in the next step. Its row is still freed at once,
    and the request moved into it (the highest row) carries on exactly as alone, sampled and guarded ones too. (The
    tiny model's random weights never choose <|endoftext|>: a token the first request chooses mid-stream, and no
    other request ever does, plays its part.)"""
    model, _ = tiny
    requests = [(text_inputs(8, 21), SamplingConfig(max_new_tokens=16)),
                (text_inputs(11, 22), SamplingConfig(max_new_tokens=18, no_repeat_ngram_size=3)),
                (text_inputs(14, 23), SamplingConfig(max_new_tokens=14, do_sample=True, seed=4)),
                (text_inputs(17, 24), SamplingConfig(max_new_tokens=20))]
    outputs = [alone(model, *r)[0] for r in requests]
    others = {t for out in outputs[1:] for t in out}
    eos = next(t for t in outputs[0][4:] if t not in others and outputs[0].index(t) >= 4)
    want = [(out[:out.index(eos)], "eos") if eos in out else (out, "length") for out in outputs]
    scheduler = Scheduler(model, max_active=4)
    scheduler.eos = eos
    try:
        streams = [scheduler.submit(*r) for r in requests]  # in order: the first request holds row 0
        got = [drain(stream) for stream in streams]
        assert_rows_free(scheduler)
    finally:
        scheduler.close()
    assert want[0][1] == "eos" and len(want[0][0]) >= 4
    assert got == want


@torch.no_grad()
def test_a_full_budget_queues_requests_and_reports_their_place(tiny):
    """A budget of two rows: the next requests wait (told how many are ahead), never fail, and get exactly their
    output alone once a row frees up."""
    model, _ = tiny
    per_row = 8192 * kv_bytes_per_token(model)
    scheduler = Scheduler(model, max_active=32, budget_bytes=2 * per_row)
    assert (scheduler.rows, scheduler.capacity) == (2, 8192)
    requests = [(text_inputs(8 + i, 20 + i), SamplingConfig(max_new_tokens=10 + i)) for i in range(5)]
    want = [alone(model, *r) for r in requests]
    try:
        streams = [scheduler.submit(*r) for r in requests]
        places = [list(s.waiting()) for s in streams]
        assert places[0] == [] and places[1] == []
        assert places[2][0] == 0 and places[3][0] == 1 and places[4][0] == 2, places
        assert places[4] == sorted(places[4], reverse=True), "places only go down"
        assert [drain(s) for s in streams] == want
        assert scheduler.peak_active == 2
    finally:
        scheduler.close()


def test_a_prompt_too_long_for_a_row_is_refused_politely(tiny):
    model, _ = tiny
    scheduler = Scheduler(model, max_active=2, budget_bytes=1024 * kv_bytes_per_token(model))
    assert (scheduler.rows, scheduler.capacity) == (1, 1024)
    try:
        with pytest.raises(ValueError, match="holds at most 1023"):
            scheduler.submit(text_inputs(1500, 1), SamplingConfig(max_new_tokens=4))
        # A prompt that fits, with more new tokens than the row holds: cut to what fits.
        tokens, reason = drain(scheduler.submit(text_inputs(1000, 2), SamplingConfig(max_new_tokens=500)))
        assert len(tokens) <= 24 and (reason == "eos" or len(tokens) == 24)
    finally:
        scheduler.close()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def test_memory_returns_to_its_level_after_a_burst(tiny):
    """After a burst of requests the process holds what it held before it (host RSS; the GPU's too when there is
    one): requests leave nothing behind."""
    model, processor = tiny
    scheduler = Scheduler(model, max_active=8)
    burst = [(text_inputs(20 + i, 40 + i), SamplingConfig(max_new_tokens=24)) for i in range(10)]
    burst.append((image_inputs(processor), SamplingConfig(max_new_tokens=8)))
    try:
        run_concurrently(scheduler, burst)  # warm-up: allocator pools, lazily built tables
        gc.collect()
        before = rss_bytes()
        cuda_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        for _ in range(2):
            run_concurrently(scheduler, burst)
        gc.collect()
        assert rss_bytes() - before < 16 * 2**20
        if torch.cuda.is_available():
            assert torch.cuda.memory_allocated() == cuda_before
    finally:
        scheduler.close()


# ------------------------------------------------------------------------------------------ the engine and the app
FOX = os.path.join(REPO, "examples", "audio", "fox_sentence.wav")
TRIANGLE = os.path.join(REPO, "examples", "images", "triangle.png")


def test_every_tab_answers_the_same_through_the_scheduler_and_alone(monkeypatch):
    """The two serving paths of the engine: the scheduler (a dedicated machine) and one request per GPU task
    (ZeroGPU, MING_SCHEDULER=0) give the same greedy text on every tab, and both speak."""
    from tests.test_app import serve

    from serving import flows
    from serving.checks import sampling_config

    serve()
    sampling = sampling_config(temperature=0.0, top_p=1.0, max_new_tokens=16)

    def every_tab() -> tuple:
        turns, _ = list(flows.chat([], "What is in this picture?", [IMAGE], "", sampling, True, "luna", "both"))[-1]
        assert turns[-1].reply_audio, "the reply was spoken"
        answer = list(flows.vision_qa(IMAGE, None, "Describe it.", sampling, "both"))[-1]
        transcript = list(flows.asr(FOX, "both"))[-1]
        thought, _ = list(flows.thinking([], "Find x.", TRIANGLE, sampling, "both"))[-1]
        return turns[-1].reply, answer, transcript, thought[-1].reply

    monkeypatch.setenv("MING_SCHEDULER", "1")
    scheduled = every_tab()
    monkeypatch.setenv("MING_SCHEDULER", "0")
    assert every_tab() == scheduled and all(scheduled)


def test_eight_visitors_stream_at_the_same_time_and_get_their_own_answers():
    """Eight gradio_client sessions at once on the tiny model: their partial updates interleave (all eight are
    streaming at one moment), each gets the complete answer its question gets alone, and no conversation leaks
    into another."""
    from gradio_client import Client

    from serving.engine import use_scheduler
    from tests.test_app import chat_args, message_texts, serve

    if not use_scheduler():
        pytest.skip("one request at a time on ZeroGPU")
    space = serve()
    url = space.demo.local_url
    assert space.ENGINE.concurrency_limit >= 8
    clients = [Client(url, verbose=False) for _ in range(8)]
    args = [chat_args(f"Question number {i}", max_new_tokens=48, temperature=0.0) for i in range(8)]
    updates: list[tuple[float, int]] = []  # (when, which visitor) for each partial reply
    finals: list = [None] * 8
    start = threading.Barrier(8)

    def visitor(i: int) -> None:
        start.wait()
        job = clients[i].submit(**args[i])
        for chatbot, *_ in job:
            if chatbot and chatbot[-1]["role"] == "assistant" and message_texts(chatbot[-1])[0]:
                updates.append((time.perf_counter(), i))
        finals[i] = job.result(timeout=300)[0]

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    first = {i: min(t for t, j in updates if j == i) for i in range(8)}
    last = {i: max(t for t, j in updates if j == i) for i in range(8)}
    assert max(first.values()) < min(last.values()), "all eight were streaming at one moment"
    order = [i for _, i in sorted(updates)]
    assert sum(a != b for a, b in zip(order, order[1:])) >= 16, "partial updates interleave"
    for i, chatbot in enumerate(finals):
        assert [m["role"] for m in chatbot] == ["user", "assistant"], "nobody sees another session's turns"
        assert message_texts(chatbot[0]) == [f"Question number {i}"]
    alone = [Client(url, verbose=False).predict(**args[i])[0] for i in (0, 5)]
    assert [message_texts(c[-1]) for c in alone] == [message_texts(finals[i][-1]) for i in (0, 5)]


# ------------------------------------------------------------------------------------------------ shared speech
def speak_together(speech, shared, replies: list[tuple[list[str], torch.Tensor, int]]) -> list:
    """Each reply (text deltas, thinker_states, seed) spoken alone through `speech`, then all at once, each on its
    own thread, through `shared`: (alone, together) lists of int16 audio arrays per reply."""
    import numpy as np

    def audio(generator, deltas, states, seed):
        chunks = [e.audio for e in generator.stream(deltas, thinker_states=states, voice=speech.voices[0], seed=seed)
                  if e.audio is not None]
        return np.concatenate(chunks)

    alone = [audio(speech, *reply) for reply in replies]
    together: list = [None] * len(replies)
    start = threading.Barrier(len(replies))

    def reply(i: int) -> None:
        start.wait()
        together[i] = audio(shared, *replies[i])

    threads = [threading.Thread(target=reply, args=(i,)) for i in range(len(replies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return alone, together


def test_replies_spoken_at_once_sound_as_each_alone(tmp_path):
    """Three spoken replies through one SharedSpeech at once, sentence by sentence: each reply's audio is exactly
    its audio alone (a reply whose talker prefix another reply replaced in between runs it again)."""
    from ming.speech import SpeechGenerator
    from serving.scheduler import SharedSpeech

    folder = build_tiny_checkpoint(str(tmp_path / "tiny"))
    speech = SpeechGenerator.from_pretrained(folder)
    speech.max_new_tokens = 12  # random tiny talker: keep clips short
    shared = SharedSpeech(speech)
    replies = [(["Hello there. ", "How are you today? ", "Fine, thanks."],
                torch.randn(1, 5 + i, 64, generator=torch.Generator().manual_seed(i)), 10 * i) for i in range(3)]
    alone, together = speak_together(speech, shared, replies)
    for a, b in zip(alone, together):
        assert len(a) > 0 and (a == b).all()
    assert shared.speech.talker.peak_speaking > 1  # the talker spoke for several replies in one step
    shared.close()


def test_more_replies_than_talker_rows_wait_for_a_row_and_still_sound_as_alone(tmp_path):
    """Four replies through a talker of two rows: sentences wait for a row, a reply whose row went to another runs
    its prefix again, and every reply is still exactly its audio alone. A stopped reply ends at once."""
    from ming.speech import SpeechGenerator
    from serving.scheduler import SharedSpeech

    folder = build_tiny_checkpoint(str(tmp_path / "tiny"))
    speech = SpeechGenerator.from_pretrained(folder)
    speech.max_new_tokens = 12
    shared = SharedSpeech(speech, rows=2)
    replies = [(["Hello there. ", "How are you today? ", "Fine, thanks."],
                torch.randn(1, 4 + i, 64, generator=torch.Generator().manual_seed(10 + i)), 7 * i) for i in range(4)]
    try:
        alone, together = speak_together(speech, shared, replies)
        for a, b in zip(alone, together):
            assert len(a) > 0 and (a == b).all()
        assert shared.speech.talker.peak_speaking == 2
        stop = threading.Event()
        stop.set()
        events = list(shared.stream(["Never said."], voice=speech.voices[0], stop_event=stop))
        assert not any(e.audio is not None and len(e.audio) for e in events)
    finally:
        shared.close()


def test_the_speech_lock_goes_to_the_earliest_deadline_then_first_come():
    """Released, the shared speech lock goes to the waiting reply whose listener runs out of audio first (a reply
    not yet heard ranks by its start), ties in arrival order; its holder may take it again inside."""
    from ming.layers import OrderedLock

    lock = OrderedLock()
    order: list[str] = []

    def reply(name: str, deadline: float) -> None:
        with lock.hold(deadline):
            with lock.hold(0.0):  # reentrant
                order.append(name)

    with lock.hold(0.0):
        threads = []
        for name, deadline in (("late", 30.0), ("urgent", 10.0), ("tie-first", 20.0), ("tie-second", 20.0)):
            threads.append(threading.Thread(target=reply, args=(name, deadline)))
            threads[-1].start()
            deadline_s = time.monotonic() + 5
            while len(lock._waiting) < len(threads) and time.monotonic() < deadline_s:
                time.sleep(0.01)
        assert len(lock._waiting) == 4 and order == []
    for t in threads:
        t.join(timeout=5)
    assert order == ["urgent", "tie-first", "tie-second", "late"]


def test_a_reply_not_yet_heard_ranks_before_one_with_audio_ahead():
    from serving.scheduler import _LazyContext

    playing, starting = _LazyContext(()), _LazyContext(())
    playing.made(3.0)  # three seconds ahead of its listener
    assert starting.deadline() < playing.deadline()
    starting.made(0.5)
    assert starting.deadline() < playing.deadline()


def test_a_prompt_too_long_for_a_talker_row_speaks_through_the_plain_talker(tmp_path):
    from ming.speech import SpeechGenerator
    from serving.scheduler import SharedSpeech

    folder = build_tiny_checkpoint(str(tmp_path / "tiny"))
    speech = SpeechGenerator.from_pretrained(folder)
    speech.max_new_tokens = 12
    shared = SharedSpeech(speech, rows=2, context=32)  # a 40-token prompt does not fit a row
    replies = [(["Hello there. ", "Fine."], torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(3)), 5)]
    try:
        alone, together = speak_together(speech, shared, replies)
        assert len(alone[0]) > 0 and (alone[0] == together[0]).all()
        assert shared.speech.talker.peak_speaking == 0
    finally:
        shared.close()
