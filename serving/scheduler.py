"""Continuous batching: one decode loop serves the text of every visitor at once (a dedicated GPU; not ZeroGPU).

A thread owns one slotted KV cache: `rows` rows of `capacity` slots each, both worked out from a memory budget.
Each admitted request gets a row. Every turn of the loop:

  1. requests that were stopped or abandoned leave at once, and the highest occupied row moves into the freed
     one (its used slots, valid flags, position and slot), so occupied rows stay packed at the bottom;
  2. waiting requests are admitted into free rows (the rest wait, and are told how many requests are ahead);
  3. each request of the decode step launched last turn chooses its next token, on the GPU;
  4. waiting prompts are embedded (media included) and prefilled into their rows, at most `prefill_chunk` tokens
     per turn (several short prompts, or one chunk of a long one), so that running streams never stall long for
     someone else's prompt;
  5. the next decode step is launched: it feeds every decoding row its next token (the tokens chosen in 3, still
     on the GPU, and the first tokens of prompts whose prefill ended in 4), each row at its own cache slot and
     position, captured for the smallest batch bucket (1, 2, 4, ... rows) covering the occupied rows;
  6. the host reads the tokens chosen in 3 while that step runs: each goes to its stream, and a request ends at
     <|endoftext|> (its row in the running step is simply never read) or max_new_tokens; the streams get them after
     the turn, so the GPU never waits for the host's Python (waking a visitor's thread, taking the GIL).

Each request keeps its own sampling settings, seed, max tokens, repetition guard and stop event, and streams its
token ids through a `RequestStream`. Iteration-level scheduling and chunked prefill are the ideas of Orca, vLLM and
SGLang; this is our own code on `ming.generation`'s pieces.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ming.generation import DecodeStep, key_valid_of
from ming.layers import CAPTURE_LOCK, MIN_BUCKET, OrderedLock, cache_bucket, cache_mask, prompt_mask, use_triton
from ming.modeling import MingOmni, split_generation_kwargs
from ming.sampling import NgramGuard, SamplingConfig, most_likely, select_next_token
from ming.speech.talker import MAX_NEW_TOKENS as TALKER_MAX_NEW_TOKENS
from ming.speech.talker import MIN_NEW_TOKENS as TALKER_MIN_NEW_TOKENS
from ming.speech.talker import DecodeStep as DecodeTalkerStep
from ming.speech.talker import SpokenSentence
from ming.speech.talker import sample as talker_sample

log = logging.getLogger("serving.scheduler")

MAX_ACTIVE = 32  # rows decoded together at most: aggregate throughput still grows past it, per visitor speed falls
# Prompt tokens per loop turn: what a running stream waits at most for someone else's prompt (~40 ms for 1,024 on an
# H100, bench/results). A 1,000-token chat prompt goes in one chunk, which attends to itself only (flash attention);
# later chunks attend over the row's slots so far (a masked pass).
PREFILL_CHUNK = 1024
MIN_CONTEXT = 8192  # shrink the number of rows before each row's context falls below this
CPU_BUDGET_BYTES = 192 * 2**20  # KV memory on the CPU (the tiny model): a fixed small budget
GPU_BUDGET_FRACTION = 0.4  # of the GPU memory free once the model is loaded; the rest: activations, vision, speech
SPEAKING_ROWS = 8  # replies the talker speaks for at once (more wait for a row, a sentence at a time)
# Talker cache slots per row: a reply's prompt (thinker states, as long as a scheduler row's) and a sentence. 1.5 GiB
# for 8 rows of the real talker; a longer prompt speaks through the plain talker, holding up everyone's GPU work.
TALKER_CONTEXT = 16384


# ------------------------------------------------------------------------------------------------- memory budget
def kv_bytes_per_token(model: MingOmni) -> int:
    """Cache bytes one token takes: keys and values of every layer, plus its valid flag."""
    c = model.config.llm_config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.attention_head_dim * model.dtype.itemsize + 1


def memory_budget(device: torch.device) -> int:
    """KV bytes this process may use: MING_KV_BUDGET_GB if set, else a share of the free GPU memory, or a fixed
    small budget on the CPU."""
    if os.environ.get("MING_KV_BUDGET_GB"):
        return int(float(os.environ["MING_KV_BUDGET_GB"]) * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_BUDGET_FRACTION)
    return CPU_BUDGET_BYTES


def plan_cache(bytes_per_token: int, budget: int, max_active: int, max_context: int) -> tuple[int, int]:
    """(rows, capacity) of the slotted cache within `budget`: each row as long as the model's context while
    `max_active` rows fit, then shorter (down to MIN_CONTEXT), then fewer rows. Capacity is a power of two (the
    flash-decoding kernel's shape)."""
    capacity = cache_bucket(max_context)
    while capacity > max(MIN_CONTEXT, MIN_BUCKET) and max_active * capacity * bytes_per_token > budget:
        capacity //= 2
    rows = min(max_active, budget // (capacity * bytes_per_token))
    while rows == 0 and capacity > MIN_BUCKET:  # a tiny budget: one shorter row
        capacity //= 2
        rows = min(max_active, budget // (capacity * bytes_per_token))
    return max(rows, 1), capacity


def batch_buckets(rows: int) -> list[int]:
    """Batch sizes a decode step is captured for: powers of two below `rows`, then `rows`."""
    buckets = [1 << i for i in range(rows.bit_length()) if 1 << i < rows]
    return buckets + [rows]


# ------------------------------------------------------------------------------------------------------ streams
class RequestStream:
    """What a caller holds for one submitted request: iterate it for the new token ids (it ends at <|endoftext|>,
    max_new_tokens, the stop event or `cancel()`); `waiting()` first yields how many requests are ahead while it
    is queued; `thinker_states` (when asked for) is ready once the prompt is prefilled."""

    def __init__(self, stop_event: threading.Event | None):
        self.stop_event = stop_event
        self.finish_reason: str | None = None  # "eos" | "length" | "stopped"
        self.queue_position: int | None = None  # requests ahead of this one while it waits; None once admitted
        self._events: queue.Queue = queue.Queue()  # ("ahead", n) | ("prefilled", states) | ("token", id) | end
        self._held: collections.deque = collections.deque()  # events read ahead by waiting()/thinker_states
        self._states: torch.Tensor | None = None
        self._prefilled = False
        self.cancelled = threading.Event()

    # -------- the scheduler's side
    def _put(self, kind: str, value=None) -> None:
        self._events.put((kind, value))

    # -------- the caller's side
    def _next_event(self):
        if self._held:
            return self._held.popleft()
        while True:
            try:
                return self._events.get(timeout=0.05)
            except queue.Empty:
                if self.stop_event is not None and self.stop_event.is_set():
                    return ("end", "stopped")  # the scheduler drops the row at its next turn

    def waiting(self) -> Iterator[int]:
        """While queued: the number of requests ahead, each time it changes. Returns once the request is admitted
        (or has ended)."""
        while True:
            kind, value = self._next_event()
            if kind == "ahead":
                self.queue_position = value
                yield value
                continue
            self._held.appendleft((kind, value))
            return

    @property
    def thinker_states(self) -> torch.Tensor | None:
        """[1, L, H]: the prompt's input embeddings plus its last hidden states (what the talker is conditioned on);
        None unless asked for. Blocks until the prompt is prefilled."""
        while not self._prefilled:
            kind, value = self._next_event()
            if kind == "prefilled":
                self._prefilled, self._states = True, value
            elif kind != "ahead":
                self._held.appendleft((kind, value))
                break
        return self._states

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        while self.finish_reason is None:
            if self.stop_event is not None and self.stop_event.is_set():
                self.finish_reason = "stopped"
                break
            kind, value = self._next_event()
            if kind == "token":
                return value
            if kind == "prefilled":
                self._prefilled, self._states = True, value
            elif kind == "end":
                self.finish_reason = value
            elif kind == "error":
                self.finish_reason = "stopped"
                raise value
        raise StopIteration

    def cancel(self) -> None:
        """The caller is gone (or done): free the row at the scheduler's next turn."""
        self.cancelled.set()


@dataclass(eq=False)
class Request:
    """One request's state inside the scheduler (only its thread touches it after admission)."""

    input_ids: torch.Tensor  # [1, L]
    attention_mask: torch.Tensor | None
    media: dict[str, torch.Tensor]
    cfg: SamplingConfig
    stream: RequestStream
    keep_thinker_states: bool
    row: int = -1
    # prefill
    embeds: torch.Tensor | None = None
    router_ids: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [1, L] key validity (no padding for one prompt, but honour a mask)
    positions: torch.Tensor | None = None  # [1, L] RoPE positions
    prefilled: int = 0  # prompt tokens in the cache so far
    states: list[torch.Tensor] = field(default_factory=list)
    # decode
    decoding: bool = False
    token: int = 0  # the first token to feed, chosen by the prefill (later ones are fed on the device)
    position: int = 0  # its RoPE position
    slot: int = 0  # its cache slot; slots [0, slot) are this request's
    generated: int = 0
    guard: NgramGuard | None = None
    generator: torch.Generator | None = None
    reason: str | None = None  # set when the request is done: "eos" | "length" | "stopped"

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def used_slots(self) -> int:
        return self.slot if self.decoding else self.prefilled


@dataclass(eq=False)
class ChosenTokens:
    """A launched step's next tokens, chosen on the device (`tokens`, fed to the next step there) and copied to
    `host` once `ready` (a CUDA event; None on the CPU) has passed."""

    requests: list[Request]
    tokens: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None


# ---------------------------------------------------------------------------------------------------- scheduler
class Scheduler:
    """The decode loop and its slotted cache; `submit` from any thread."""

    def __init__(self, model: MingOmni, max_active: int = MAX_ACTIVE, budget_bytes: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.model, self.llm = model, model.model
        self.device, self.dtype = model.device, model.dtype
        self.prefill_chunk = prefill_chunk
        self.budget = budget_bytes if budget_bytes is not None else memory_budget(self.device)
        max_context = model.config.llm_config.max_position_embeddings
        self.rows, self.capacity = plan_cache(kv_bytes_per_token(model), self.budget, max_active, max_context)
        self.cache = self.llm.new_cache(self.rows, self.capacity, self.dtype, self.device)
        self.kv_bytes = self.rows * self.capacity * kv_bytes_per_token(model)
        capture = use_triton(self.llm.lm_head.weight)
        # Every bucket's step is made (and on a GPU captured) now, before any visitor: a capture fails if another
        # thread launches GPU work meanwhile, and it would stall everyone's stream.
        self.steps = {b: DecodeStep(self.llm, b, self.capacity, self.dtype, self.device, capture,
                                    cache=self.cache.rows(slice(0, b))) for b in batch_buckets(self.rows)}
        self.cache.valid.zero_()
        self.eos = model.config.llm_config.eos_token_id
        self.active: list[Request] = []  # row i holds active[i]: occupied rows packed at the bottom
        self.waiting: collections.deque[Request] = collections.deque()
        self.peak_active = 0
        self.steps_run = 0
        # The decode step launched last turn, its tokens not chosen yet: (logits, its requests, their rows then).
        self.in_flight: tuple[torch.Tensor, list[Request], list[int]] | None = None
        self.outbox: list[tuple[RequestStream, str, object]] = []  # stream events of this turn, delivered after it
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ming-scheduler", daemon=True)
        self._thread.start()
        log.info("scheduler: %d rows x %d slots (%.2f GiB of a %.2f GiB budget), buckets %s", self.rows,
                 self.capacity, self.kv_bytes / 2**30, self.budget / 2**30, list(self.steps))

    # ----------------------------------------------------------------------------------------- callers' side
    @property
    def max_prompt(self) -> int:
        """The longest prompt a row holds with room for at least one new token."""
        return self.capacity - 1

    def submit(self, inputs: dict[str, torch.Tensor], sampling: SamplingConfig,
               stop_event: threading.Event | None = None, thinker_states: bool = False) -> RequestStream:
        """Queue one prompt (the processor's inputs for one conversation: input_ids [1, L], media tensors). Returns
        at once; the stream yields its new token ids. max_new_tokens is cut to what the row holds."""
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        if input_ids.shape[0] != 1:
            raise ValueError("the scheduler takes one prompt per request")
        _, media = split_generation_kwargs(inputs)
        length = input_ids.shape[1]
        if length > self.max_prompt:
            raise ValueError(f"The prompt is {length} tokens long; this server holds at most {self.max_prompt} "
                             "per visitor. Try a shorter conversation (Clear), or fewer or smaller media.")
        room = self.capacity - length
        if sampling.max_new_tokens > room:
            sampling = dataclasses.replace(sampling, max_new_tokens=room)
        stream = RequestStream(stop_event)
        request = Request(input_ids, attention_mask, media, sampling, stream, thinker_states)
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self.waiting.append(request)
            self._wake.notify()
        return stream

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._closed and not self.active and not self.waiting:
                    self._wake.wait()
                if self._closed:
                    break
                self._admit()
            # Speech threads capture their graphs at run time (under this lock): never during our GPU work.
            with CAPTURE_LOCK:
                try:
                    self._turn()
                except Exception as error:  # a step failed (out of memory, say): end every running request
                    log.exception("decode step failed")
                    self.in_flight = None
                    for request in list(self.active):
                        self._finish(request, error=error)
            self._deliver()  # while the GPU runs the step just launched
        for request in [*self.active, *self.waiting]:
            request.stream._put("end", "stopped")

    def _admit(self) -> None:
        """Waiting requests into free rows, first come first served (caller holds `_wake`); tell the rest their
        place in the queue."""
        for request in list(self.waiting):
            if request.stream.cancelled.is_set() or _stopped(request):
                self.waiting.remove(request)
                request.stream._put("end", "stopped")
        while self.waiting and len(self.active) < self.rows:
            request = self.waiting.popleft()
            request.row = len(self.active)  # its valid flags were cleared when the row was last vacated
            self.active.append(request)
            request.stream.queue_position = None
        self.peak_active = max(self.peak_active, len(self.active))
        for ahead, request in enumerate(self.waiting):
            if request.stream.queue_position != ahead:
                request.stream.queue_position = ahead
                request.stream._put("ahead", ahead)

    def _turn(self) -> None:
        """Choose the tokens of the step in flight on the GPU, prefill, launch the next step, then read the chosen
        tokens: the next step is fed those tokens on the GPU, so it runs while the host reads and streams them,
        and the GPU never waits for the host between steps (one visitor on an H200, one process: 585-590 tok/s
        against 505-512 when each turn first read the step). The turn's tokens reach their streams after it
        (`_deliver`). (Launching the step before the prefill, to overlap
        the prefill's launches with it, measured no better on an H200: 124 against 120-132 tok/s per visitor at 16
        visitors.)"""
        for request in list(self.active):
            if request.stream.cancelled.is_set() or _stopped(request):
                self._finish(request, "stopped")
        chosen = self._choose_in_flight()
        # Up to `prefill_chunk` prompt tokens per turn, oldest request first: several short prompts share a turn,
        # but a prompt that does not fit in what is left waits for a turn of its own rather than start with a sliver.
        budget = self.prefill_chunk
        for request in [r for r in self.active if not r.decoding]:
            if budget <= 0 or budget < min(self.prefill_chunk, request.length - request.prefilled):
                break
            try:
                budget -= self._prefill_chunk(request, budget)
            except Exception as error:  # bad media, out of memory: this request only
                log.exception("prefill failed")
                self._finish(request, error=error)
        self._launch_step(chosen)
        if chosen is not None:
            self._read_chosen(chosen)

    # ---------------------------------------------------------------------------------------------- prefill
    def _prefill_chunk(self, request: Request, limit: int) -> int:
        """Embed the prompt on its first chunk, then prefill the next chunk (at most `limit` tokens) into the
        request's row; returns its length. The last chunk gives the first new token."""
        if request.embeds is None:
            self._start_prefill(request)
        start = request.prefilled
        end = min(request.length, start + limit)
        row = self.cache.rows(slice(request.row, request.row + 1)).first_slots(end)
        slots = torch.arange(start, end, device=self.device)
        valid = request.valid[:, start:end]
        row.valid[:, start:end] = valid
        # The first chunk attends to itself only, as one prompt alone does (plain causal when nothing is padded);
        # later chunks attend over the row's slots so far.
        mask = prompt_mask(valid) if start == 0 else cache_mask(row.valid, slots)
        router_ids = None if request.router_ids is None else request.router_ids[:, start:end]
        hidden = self.llm.model(request.embeds[:, start:end], request.positions[:, start:end], mask, router_ids,
                                row, slots)
        if request.keep_thinker_states:
            request.states.append(request.embeds[:, start:end] + hidden)
        request.prefilled = end
        if end < request.length:
            return end - start
        logits = self.llm.logits(hidden[:, -1])
        states = torch.cat(request.states, dim=1) if request.keep_thinker_states else None
        request.embeds = request.router_ids = request.states = None  # free them now
        request.stream._put("prefilled", states)  # at once: it precedes the request's first token
        request.decoding = True
        request.slot = request.length
        request.position = int(request.positions[0, -1]) + 1
        self._accept(request, self._choose([request], logits).tolist()[0])
        return end - start

    def _start_prefill(self, request: Request) -> None:
        ids = request.input_ids.to(self.device)
        media = {name: value.to(self.device) for name, value in request.media.items()}
        request.embeds, request.router_ids = self.model.embed(ids, **media)
        if not media:
            # Text only: the text gate scores every token. Known here, it spares the prefill asking the GPU which
            # gates its tokens need (`ming.llm.modality_rows`), which would wait for the decode step running now
            # before the host could launch the prompt's kernels.
            request.router_ids = None
        request.media = {}
        request.valid = key_valid_of(request.attention_mask, ids, self.device)
        request.positions = (request.valid.long().cumsum(-1) - 1).clamp(min=0)
        cfg = request.cfg
        if cfg.no_repeat_ngram_size > 0:
            request.guard = NgramGuard(cfg.no_repeat_ngram_size, request.input_ids[0].tolist())
        if cfg.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)

    # ----------------------------------------------------------------------------------------------- decode
    def _launch_step(self, chosen: ChosenTokens | None) -> None:
        """Launch one step for all occupied rows (the smallest captured bucket covering them); its tokens are
        chosen next turn. A request fed last turn's `chosen` token (not read by the host yet) takes it on the GPU;
        one whose prefill just ended is fed its first token; one whose chosen token is its last (max_new_tokens)
        sits this step out. Rows still prefilling, and the bucket's empty rows, feed a dummy token at their first
        unused slot (nothing is there yet, and attention reads up to it), which the step leaves invalid."""
        pending = {id(r): i for i, r in enumerate(chosen.requests)} if chosen is not None else {}
        fed_rows, fed_from, launched = [], [], []
        for request in self.active:
            if not request.decoding:
                continue
            if id(request) in pending:
                if request.generated + 1 >= request.cfg.max_new_tokens:
                    continue
                fed_rows.append(request.row)
                fed_from.append(pending[id(request)])
            launched.append(request)
        if not launched:
            return
        batch = next(b for b in self.steps if b >= len(self.active))
        tokens, positions, slots, keep = [0] * batch, [0] * batch, [0] * batch, [0] * batch
        for request in self.active:
            slots[request.row] = request.used_slots
        for request in launched:
            tokens[request.row], positions[request.row], keep[request.row] = request.token, request.position, 1
        step = self.steps[batch]
        step.load(torch.tensor([tokens, positions, slots, keep]))
        if fed_rows and fed_rows == fed_from == list(range(len(chosen.requests))):  # rows as they were: one copy
            step.token[:len(fed_rows)].copy_(chosen.tokens)
        elif fed_rows:
            step.token.index_copy_(0, self._on_device(fed_rows), chosen.tokens[self._on_device(fed_from)])
        logits = step.run()
        self.steps_run += 1
        for request in launched:  # the step put this token at `slot`
            request.slot += 1
            request.position += 1
        self.in_flight = (logits, launched, [r.row for r in launched])

    def _choose_in_flight(self) -> ChosenTokens | None:
        """The launched step's next token for each of its requests still running (rows may have moved since),
        chosen on the GPU and on its way to the host: nothing here waits for the GPU."""
        if self.in_flight is None:
            return None
        logits, launched, rows = self.in_flight
        self.in_flight = None
        running = [(request, row) for request, row in zip(launched, rows) if request.reason is None]
        if not running:
            return None
        requests = [request for request, _ in running]
        rows = [row for _, row in running]
        if rows == list(range(len(rows))):
            logits = logits[:len(rows)]
        else:
            logits = logits.index_select(0, self._on_device(rows))
        tokens = self._choose(requests, logits)
        if tokens.device.type != "cuda":
            return ChosenTokens(requests, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return ChosenTokens(requests, tokens, host, ready)

    def _read_chosen(self, chosen: ChosenTokens) -> None:
        """Wait for the chosen tokens (the step launched after them keeps the GPU busy meanwhile) and accept them."""
        if chosen.ready is not None:
            chosen.ready.synchronize()
        for request, token in zip(chosen.requests, chosen.host.tolist()):  # all still running (see _turn)
            self._accept(request, token)

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """Each request's next token [n] (on the logits' device) from its row of logits [n, V] (float32), by its own
        settings, exactly as `Decoder.step` chooses for that prompt alone: its repetition guard's bans, then greedy,
        or sampling with its own generator when it has a seed. Rows are batched where that changes nothing: one
        ban write, one argmax for the greedy rows, one draw per group of unseeded rows with the same settings.
        Nothing waits for the GPU (row indices go over in pinned memory)."""
        bans = [(i, token) for i, r in enumerate(requests) if r.guard is not None for token in r.guard.banned()]
        if bans:
            logits = logits.clone()
            rows, tokens = zip(*bans)
            logits[self._on_device(rows), self._on_device(tokens)] = float("-inf")
        greedy = [i for i, r in enumerate(requests) if not r.cfg.do_sample]
        if len(greedy) == len(requests):  # the common case in one launch
            return most_likely(logits)
        chosen = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        if greedy:
            index = self._on_device(greedy)
            chosen[index] = most_likely(logits[index])
        unseeded: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, request in enumerate(requests):
            cfg = request.cfg
            if not cfg.do_sample:
                continue
            if request.generator is None:
                unseeded[(cfg.temperature, cfg.top_p, cfg.top_k)].append(i)
            else:
                chosen[i] = select_next_token(logits[i:i + 1], cfg, None, request.generator)[0]
        for rows in unseeded.values():
            index = self._on_device(rows)
            chosen[index] = select_next_token(logits[index], requests[rows[0]].cfg, None, None)
        return chosen

    def _on_device(self, values) -> torch.Tensor:
        """Integers as an index tensor on the scheduler's device, copied from pinned memory: a copy from ordinary
        host memory would wait for the GPU's queue to drain (this thread keeps a step queued ahead of it)."""
        index = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return index
        return index.pin_memory().to(self.device, non_blocking=True)

    def _accept(self, request: Request, token: int) -> None:
        """A chosen token: end at <|endoftext|>, else stream it, and end at max_new_tokens."""
        request.generated += 1
        if token == self.eos:
            self._finish(request, "eos")
            return
        if request.guard is not None:
            request.guard.append(token)
        self.outbox.append((request.stream, "token", token))
        if request.generated >= request.cfg.max_new_tokens:
            self._finish(request, "length")
            return
        request.token = token

    # ------------------------------------------------------------------------------------------------ leave
    def _finish(self, request: Request, reason: str = "stopped", error: Exception | None = None) -> None:
        """The request leaves its row now; the highest occupied row moves into it."""
        if request not in self.active:
            return
        request.reason = reason
        row, last = request.row, self.active[-1]
        if last is not request:
            self._move(last, row)
            self.active[row] = last
        self.active.pop()
        self.cache.valid[len(self.active)].zero_()
        request.embeds = request.router_ids = request.states = None
        # Last: once a stream has ended, its row is already free for the next request.
        self.outbox.append((request.stream, "error", error) if error is not None else (request.stream, "end", reason))

    def _deliver(self) -> None:
        """Hand the turn's tokens and endings to their streams, in order."""
        outbox, self.outbox = self.outbox, []
        for stream, kind, value in outbox:
            stream._put(kind, value)

    def _move(self, request: Request, row: int) -> None:
        """Copy a request's used slots and valid flags to `row` (lower than its own)."""
        used = request.used_slots
        src = request.row
        for keys, values in zip(self.cache.keys, self.cache.values):
            keys[row, :, :used].copy_(keys[src, :, :used])
            values[row, :, :used].copy_(values[src, :, :used])
        self.cache.valid[row].copy_(self.cache.valid[src])
        request.row = row


def _stopped(request: Request) -> bool:
    return request.stream.stop_event is not None and request.stream.stop_event.is_set()


# ------------------------------------------------------------------------------------------------------- speech
class SharedSpeech:
    """One `SpeechGenerator` speaking several replies at once.

    The talker speaks for all of them together (`TalkerRows`: a row of one cache per reply, one decode step for every
    row with a sentence to say). The flow decoder and vocoder run one sentence at a time, under a lock that goes to
    the reply whose listener runs out of audio first:
    replies not heard yet (by arrival), then the one with the least audio left to play (earliest deadline first).
    Graph captures take `CAPTURE_LOCK` (inside `CapturedStep`), which every thread launching GPU work around them
    holds, so they never overlap the decode loops. Each reply sounds as it would alone (the same sampling, each
    with its own generator): bit for bit in float32; in bf16 the GPU's attention kernel splits its work by batch
    size, so a reply spoken beside others may round differently."""

    def __init__(self, speech, rows: int = SPEAKING_ROWS, context: int = TALKER_CONTEXT):
        from ming.speech import SpeechGenerator

        talker = TalkerRows(speech.talker, rows, context)
        self.speech = SpeechGenerator(talker, speech.codec, _LockedDetokenizer(speech.detokenizer, talker),
                                      speech.voice_bank, speech.max_new_tokens)

    def stream(self, *args, **kwargs):
        return self.speech.stream(*args, **kwargs)

    def close(self) -> None:
        self.speech.talker.close()

    def __getattr__(self, name: str):
        return getattr(self.speech, name)


@dataclass(eq=False)
class _LazyContext:
    """A reply to the talker: its prefix (run again whenever its row went to someone else), and how much of the
    reply its listener has, to rank its next sentence."""

    args: tuple  # speaker, thinker states, max new tokens
    embeds: torch.Tensor | None = None  # the prefix, made once
    length: int | None = None
    started: float = field(default_factory=time.monotonic)
    first_audio: float | None = None
    audio_s: float = 0.0

    def deadline(self) -> float:
        """When the listener runs out of audio, if playback started with the first chunk (its start before then)."""
        return self.started if self.first_audio is None else self.first_audio + self.audio_s

    def made(self, seconds: float) -> None:
        self.first_audio = self.first_audio or time.monotonic()
        self.audio_s += seconds


@dataclass(eq=False)
class _Sentence:
    """One sentence a reply asked the talker for, and where it stands."""

    reply: _LazyContext
    text: str
    speaking: SpokenSentence
    generator: torch.Generator | None
    stop_event: threading.Event | None
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None

    def stopped(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()


class TalkerRows:
    """The talker speaking for several replies at once, in the place of `Talker.start` / `Talker.generate`.

    Each reply keeps its prefix (thinker states + voice) in a row of one cache; one loop thread runs a decode step
    for every row with a sentence to say and samples each row with its sentence's own generator, so a reply sounds
    as it would alone while the GPU reads the talker's weights once for all of them. With more replies speaking
    than rows, a sentence waits for a row (earliest deadline first); a reply whose row went to another runs its
    prefix again. A prefix too long for a row speaks through the plain talker, alone."""

    def __init__(self, talker, rows: int, context: int):
        self.talker = talker
        self.context = context
        with CAPTURE_LOCK:
            self.cache = talker.model.model.new_cache(context, talker.dtype, talker.device, rows=rows)
            self.step = DecodeTalkerStep(talker, self.cache)
        self.owners: list[_LazyContext | None] = [None] * rows  # whose prefix each row holds
        self.speaking_in: list[_Sentence | None] = [None] * rows
        self.last_used = [0.0] * rows
        self.waiting: list[_Sentence] = []
        self.peak_speaking = 0  # the most rows one step has spoken for
        self.speaking: dict[int, _LazyContext] = {}  # thread -> the reply whose sentence it is speaking
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ming-talker", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str):
        return getattr(self.talker, name)

    def start(self, speaker, thinker_states=None, max_new_tokens=None) -> _LazyContext:
        return _LazyContext((speaker, thinker_states, max_new_tokens))

    def generate(self, reply: _LazyContext, text: str, generator: torch.Generator | None = None,
                 max_new_tokens: int = TALKER_MAX_NEW_TOKENS, min_new_tokens: int = TALKER_MIN_NEW_TOKENS,
                 stop_event: threading.Event | None = None) -> list[int]:
        """S3-BPE ids for one sentence, as `Talker.generate` gives them; blocks until the loop has spoken it."""
        speaking = SpokenSentence(self.talker.tokenizer, text, max_new_tokens, min_new_tokens)
        self.speaking[threading.get_ident()] = reply  # its audio comes next, from this thread (_speak_piece)
        sentence = _Sentence(reply, text, speaking, generator, stop_event)
        with self._changed:
            if self._closed:
                raise RuntimeError("the talker is closed")
            self.waiting.append(sentence)
            self._changed.notify()
        sentence.done.wait()
        if sentence.error is not None:
            raise sentence.error
        return sentence.speaking.spoken

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._changed:
                while not self._closed and not self.waiting and not any(self.speaking_in):
                    self._changed.wait()
                if self._closed:
                    break
                waiting, self.waiting = sorted(self.waiting, key=lambda s: s.reply.deadline()), []
            top, unseated = None, []
            with torch.inference_mode(), CAPTURE_LOCK:  # never launch GPU work while another thread captures
                for sentence in waiting:
                    try:
                        if not self._seat(sentence):
                            unseated.append(sentence)
                    except Exception as error:  # its prefill failed (out of memory, say): this sentence only
                        log.exception("talker prefill failed")
                        sentence.error = error
                        sentence.done.set()
                try:
                    if any(self.speaking_in):
                        top = self._step()
                except Exception as error:  # the step failed: every sentence in progress gets the error
                    log.exception("talker step failed")
                    for row, sentence in enumerate(self.speaking_in):
                        if sentence is not None:
                            self._end(row, error)
            with self._changed:
                self.waiting = unseated + self.waiting
            if top is not None:
                self._sample(*top)
        for sentence in [*self.waiting, *filter(None, self.speaking_in)]:
            sentence.error = RuntimeError("the talker is closed")
            sentence.done.set()

    def _seat(self, sentence: _Sentence) -> bool:
        """Give the sentence a row (its reply's own, a free one or the longest unused), running the reply's prefix
        there if the row holds someone else's. False: every row is speaking."""
        reply = sentence.reply
        if sentence.stopped():
            sentence.done.set()
            return True
        if reply.length is None:
            reply.embeds = self.talker.embed_prefix(reply.args[0], reply.args[1])
            reply.length = reply.embeds.shape[1]
        speaking = sentence.speaking
        if reply.length + speaking.max_new_tokens + 1 > self.context:  # a very long prompt: the plain talker, alone
            context = self.talker.start(*reply.args)
            speaking.spoken = self.talker.generate(context, sentence.text, sentence.generator,
                                                   speaking.max_new_tokens, speaking.min_new_tokens,
                                                   sentence.stop_event)
            sentence.done.set()
            return True
        rows = [r for r, owner in enumerate(self.owners) if owner is reply and self.speaking_in[r] is None]
        rows = rows or sorted((r for r in range(len(self.owners)) if self.speaking_in[r] is None),
                              key=lambda r: self.last_used[r])
        if not rows:
            return False
        row = rows[0]
        if self.owners[row] is not reply:
            self.cache.valid[row].zero_()
            self.talker.model.model.prefill(reply.embeds, self.cache.rows(slice(row, row + 1)))
            self.owners[row] = reply
        self.cache.valid[row, reply.length:] = False  # forget the previous sentence
        self.speaking_in[row] = sentence
        return True

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for every row; rows with no sentence only fill the batch."""
        n = len(self.owners)
        audio, text, positions, allow_eos, keep = [0] * n, [0] * n, [0] * n, [False] * n, [False] * n
        for row, sentence in enumerate(self.speaking_in):
            owner = self.owners[row]
            positions[row] = 0 if owner is None else owner.length  # an idle row's first free slot
            if sentence is not None:
                speaking = sentence.speaking
                audio[row], text[row], allow_eos[row] = speaking.audio_in, speaking.text_in, speaking.allow_eos
                positions[row] += len(speaking.spoken)
                keep[row] = True
        self.peak_speaking = max(self.peak_speaking, sum(keep))
        top_logits, top_ids = self.step(audio, text, positions, allow_eos, keep)
        return top_logits.cpu(), top_ids.cpu()

    def _sample(self, top_logits: torch.Tensor, top_ids: torch.Tensor) -> None:
        now = time.monotonic()
        for row, sentence in enumerate(self.speaking_in):
            if sentence is None:
                continue
            self.last_used[row] = now
            sentence.speaking.accept(talker_sample(top_logits[row], top_ids[row], sentence.generator))
            if sentence.speaking.done or sentence.stopped():
                self._end(row)

    def _end(self, row: int, error: Exception | None = None) -> None:
        sentence = self.speaking_in[row]
        self.speaking_in[row] = None
        sentence.error = error
        sentence.done.set()


class _LockedDetokenizer:
    def __init__(self, detokenizer, talker: TalkerRows):
        self.detokenizer, self.talker = detokenizer, talker
        self.lock = OrderedLock()  # earliest deadline first

    def __getattr__(self, name: str):
        return getattr(self.detokenizer, name)

    def synthesize(self, *args, **kwargs) -> torch.Tensor:
        reply = self.talker.speaking.pop(threading.get_ident(), None)
        with self.lock.hold(reply.deadline() if reply is not None else time.monotonic()):
            waveform = self.detokenizer.synthesize(*args, **kwargs)
        if reply is not None:
            reply.made(waveform.shape[-1] / self.detokenizer.sample_rate)
        return waveform
