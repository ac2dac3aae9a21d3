"""The talker: a small Qwen2 language model that reads the reply text and writes S3-BPE speech tokens.

Inputs are two token streams summed per position (both look up the same embedding table):
  audio stream  <prompt></prompt><thinker_prefix> <audio_pad>×T </thinker_prefix><vp><audio_pad></vp> <audio_bos> s1 s2 ...
  text stream   <prompt></prompt><thinker_prefix> <audio_pad>×T </thinker_prefix><vp><audio_pad></vp> t0          t1 t2 ... <text_eos> <text_pad> ...
The T `<audio_pad>` slots after `<thinker_prefix>` are overwritten by `thinker_to_talker_proj(thinker_states)` (the
thinker's prompt: input embeddings + last hidden states; T = 0 for plain text-to-speech), and the slot inside `<vp>`
by `vp_head(speaker_embedding)`. From `<audio_bos>` on, each step feeds the audio token just sampled plus the next
text token; sampling is top-k 20 at temperature 1 and stops at `<audio_eos>`.

Everything up to `</vp>` depends only on the thinker states and the voice, not on the sentence being spoken, so it is
run once per reply and kept in the KV cache (`TalkerContext`); each sentence starts from that cached prefix.

Positions run 0, 1, 2, ... over prefix and generated tokens, as in the reference's `forward()` and its later releases.
(The Preview's `omni_tts_binary_generation` gives every prefix token the position of the last one; v1.5 fixed it.)

Weights: the talker is a submodule of the release's model, so its tensors are in the main safetensors under
`talker.` (`talker.model.model.*`, `talker.model.lm_head.weight`, `talker.thinker_to_talker_proj.*`,
`talker.vp_head.*`); `talker/` holds the Qwen2 `config.json` and the text tokenizer.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from torch import nn

from ..layers import (
    MLP,
    CapturedStep,
    KVCache,
    RMSNorm,
    TunedKernels,
    attend,
    cache_bucket,
    decode_mask,
    few_tokens,
    graphs_allowed,
    linear,
    rope_cos_sin,
)
from ..loading import CheckpointError, checkpoint_files, materialize, params_on_meta

WEIGHT_PREFIX = "talker."
TOP_K = 20
MAX_NEW_TOKENS = 1000  # the reference's cap (about 30 s of speech)
MIN_NEW_TOKENS = 10  # later releases refuse <audio_eos> this early; it keeps a sentence from coming out silent


# ---------------------------------------------------------------------------------------------------- text tokenizer
class TalkerTokenizer:
    """The talker's Qwen2 text tokenizer (`talker/tokenizer.json`) and the control tokens of the prefix layout.

    Audio tokens follow the text vocabulary: talker id = `audio_offset` + S3-BPE id."""

    CONTROL_TOKENS = (
        "<prompt>", "</prompt>", "<thinker_prefix>", "</thinker_prefix>", "<vp>", "</vp>",
        "<audio_pad>", "<audio_bos>", "<audio_eos>", "<text_eos>", "<text_pad>",
    )  # fmt: skip

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        missing = [t for t in self.CONTROL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"talker tokenizer lacks the control tokens {missing}")
        self.ids = {t: tokenizer.token_to_id(t) for t in self.CONTROL_TOKENS}
        self.audio_offset = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}

    @classmethod
    def from_dir(cls, talker_dir: str | os.PathLike) -> "TalkerTokenizer":
        return cls(Tokenizer.from_file(os.path.join(talker_dir, "tokenizer.json")))

    def encode(self, text: str) -> list[int]:
        """Text ids; special tokens typed into the text (e.g. a literal "<audio_eos>") are dropped, not obeyed."""
        return [i for i in self.tokenizer.encode(text, add_special_tokens=False).ids if i not in self.special_ids]

    def shared_prefix(self, thinker_length: int) -> "PrefixLayout":
        """The prefix up to `</vp>` (identical in both streams)."""
        t = self.ids
        ids = [t["<prompt>"], t["</prompt>"], t["<thinker_prefix>"]]
        thinker_start = len(ids)
        ids += [t["<audio_pad>"]] * thinker_length + [t["</thinker_prefix>"], t["<vp>"]]
        speaker_index = len(ids)
        ids += [t["<audio_pad>"], t["</vp>"]]
        return PrefixLayout(ids, thinker_start, thinker_length, speaker_index)


@dataclass
class PrefixLayout:
    ids: list[int]
    thinker_start: int  # first of the `thinker_length` slots filled from the thinker states
    thinker_length: int
    speaker_index: int  # the slot filled from the speaker embedding


# ---------------------------------------------------------------------------------------------------- Qwen2 LM
@dataclass
class TalkerLMConfig:
    """The fields of `talker/config.json` (a Qwen2 config) that the model uses."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TalkerLMConfig":
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("use_sliding_window"):
            raise ValueError(f"{path}: sliding-window attention is not supported by the talker")
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{path}: only plain RoPE is supported, got {rope}")
        theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        return cls(
            **{n: raw[n] for n in names},
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
        )


class Attention(nn.Module, TunedKernels):
    """Qwen2 attention: separate q/k/v projections with biases, written side by side into one qkv buffer (the
    thinker's fused layout), so both models share `ming.layers.attend`."""

    def __init__(self, config: TalkerLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, input_norm: RMSNorm, rope: tuple[torch.Tensor, torch.Tensor],
                cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Self-attention of input_norm(x) for x [B, n, H] at cache `slots` ([n], or [B, n] per row); mask as for
        `ming.layers.attend` (None: a sequence from slot 0, causal over itself)."""
        B, n, _ = x.shape
        # A few tokens on the GPU: the norm runs inside each projection's GEMV; otherwise once, up front.
        fused_norm = few_tokens(x)
        h = x if fused_norm else input_norm(x)
        qkv = torch.cat([linear(h, proj, input_norm if fused_norm else None, self.kernel_tuning)
                         for proj in (self.q_proj, self.k_proj, self.v_proj)], dim=-1)
        qkv = qkv.view(B, n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        out = attend(qkv, rope, self.num_heads, self.num_kv_heads, mask, cache, slots, self.kernel_tuning)
        return linear(out, self.o_proj, tuning=self.kernel_tuning)


class DecoderLayer(nn.Module):
    def __init__(self, config: TalkerLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)  # Qwen2's SwiGLU is the LLM's

    def forward(self, x, rope, cache, slots, mask) -> torch.Tensor:
        attention = self.self_attn(x, self.input_layernorm, rope, cache, slots, mask)
        x, h = self.post_attention_layernorm.add_and_norm(x, attention)
        return self.mlp(h, residual=x)


class Qwen2Decoder(nn.Module):
    """Embedding table, decoder layers and final norm (the release's `talker.model.model`)."""

    def __init__(self, config: TalkerLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def new_cache(self, capacity: int, dtype: torch.dtype, device: torch.device | str, rows: int = 1) -> KVCache:
        c = self.config
        return KVCache.empty(c.num_hidden_layers, rows, c.num_key_value_heads, capacity, c.head_dim, dtype, device)

    def prefill(self, inputs_embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A sequence [1, n, H] at positions 0..n-1 into an empty cache. Returns hidden states [1, n, H]."""
        slots = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        cache.valid[:, slots] = True
        return self._run(inputs_embeds, slots, cache, mask=None)

    def decode(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new position per row [B, 1, H], row b at `positions[b]` ([B], on the device: no host sync, so it can
        be graphed), attending to the row's valid cache slots and itself. Returns [B, 1, H]."""
        slots = positions[:, None]
        cache.valid.scatter_(1, slots, True)
        return self._run(inputs_embeds, slots, cache, mask=decode_mask(cache.valid))

    def _run(self, h: torch.Tensor, slots: torch.Tensor, cache: KVCache, mask: torch.Tensor | None) -> torch.Tensor:
        """slots: [n] (every row at the same ones) or [B, n]; positions are the slots."""
        rope = rope_cos_sin(slots if slots.dim() == 2 else slots[None], self.config.head_dim, self.config.rope_theta)
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            h = layer(h, rope, (keys, values), slots, mask)
        return self.norm(h)


class TalkerLM(nn.Module):
    """Qwen2 decoder plus output head (the release's `talker.model`, a `Qwen2ForCausalLM`)."""

    def __init__(self, config: TalkerLMConfig):
        super().__init__()
        self.model = Qwen2Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ---------------------------------------------------------------------------------------------------- the talker
class DecodeStep:
    """One talker step with static shapes for each row of a cache: (audio id, text id) at the row's slot -> the
    top-k candidates for its next token. A reply speaks in one row; several replies can speak at once, a row each.
    Its inputs live in fixed buffers, so on a GPU the step is captured once per cache and replayed as a CUDA graph:
    one launch instead of ~1,000 kernel launches from Python, which otherwise hold the full-size talker to about 32
    steps a second on an H100, barely real time. (`MING_CUDA_GRAPHS=0` turns graphs off, as for the thinker.)"""

    def __init__(self, talker: "Talker", cache: KVCache):
        device = talker.device
        self.talker, self.cache = talker, cache
        # Per row: audio-stream id, text-stream id, position (= slot), <audio_eos> allowed (1/0), keep (1/0; 0: the
        # row only fills the batch and its slot is left invalid). One host-to-device copy per step.
        self.inputs = torch.zeros(5, cache.valid.shape[0], dtype=torch.long, device=device)
        # Warm-up and capture run at the last slot, which generation never reaches (see Talker.start).
        self.inputs[2].fill_(cache.capacity - 1)
        self.run = CapturedStep(self._step, device)

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        talker = self.talker
        audio, text, positions, allow_eos, keep = self.inputs
        embeds = talker.embed_streams(audio[:, None], text[:, None])
        hidden = talker.model.model.decode(embeds, positions, self.cache)
        self.cache.valid.scatter_(1, positions[:, None], keep[:, None] != 0)
        eos_penalty = torch.where(allow_eos != 0, 0.0, float("-inf"))
        return talker.candidates(talker.logits(hidden[:, -1]), eos_penalty)

    def __call__(self, audio_ids: list[int], text_ids: list[int], positions: list[int], allow_eos: list[bool],
                 keep: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (logits, ids) [B, k] on the device, for one value per row of each input."""
        keep = [True] * len(audio_ids) if keep is None else keep
        self.inputs.copy_(torch.tensor([audio_ids, text_ids, positions, allow_eos, keep], dtype=torch.long))
        return self.run()


@dataclass
class TalkerContext:
    """A reply's shared prefix (thinker states + voice) in the KV cache, and the step that speaks after it."""

    cache: KVCache
    prefix_length: int
    step: DecodeStep


class Talker(nn.Module):
    def __init__(
        self,
        config: TalkerLMConfig,
        tokenizer: TalkerTokenizer,
        thinker_hidden_size: int,
        speaker_dim: int = 192,
        speaker_kernel: int = 1,
    ):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.model = TalkerLM(config)
        self.thinker_to_talker_proj = nn.Linear(thinker_hidden_size, config.hidden_size)
        self.vp_head = nn.Conv1d(speaker_dim, config.hidden_size, speaker_kernel, padding=speaker_kernel // 2)
        self.captured_steps: dict[int, tuple[KVCache, DecodeStep]] = {}  # per power-of-two cache size
        if tokenizer.audio_offset >= config.vocab_size:
            raise ValueError(f"talker vocab {config.vocab_size} leaves no room for audio tokens after the text vocab")

    @property
    def device(self) -> torch.device:
        return self.thinker_to_talker_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.thinker_to_talker_proj.weight.dtype

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "Talker":
        """Config and tokenizer from `ckpt_dir/talker/`, weights from the `talker.*` keys of the checkpoint's
        safetensors. Sizes not in the Qwen2 config (vocab, thinker width, speaker width) are read off the weights."""
        ckpt_dir = os.fspath(ckpt_dir)
        talker_dir = os.path.join(ckpt_dir, "talker")
        weights = read_talker_weights(ckpt_dir)
        config = TalkerLMConfig.from_file(os.path.join(talker_dir, "config.json"))
        # The release's config.json is the base Qwen2 one; the model's table was resized to text + audio vocab.
        config.vocab_size = weights["model.model.embed_tokens.weight"].shape[0]
        speaker_head = weights["vp_head.weight"]  # [hidden, speaker_dim, kernel]
        with params_on_meta():
            talker = cls(
                config,
                TalkerTokenizer.from_dir(talker_dir),
                thinker_hidden_size=weights["thinker_to_talker_proj.weight"].shape[1],
                speaker_dim=speaker_head.shape[1],
                speaker_kernel=speaker_head.shape[2],
            )
        materialize(talker, device, dtype)
        talker.load_weights(weights)
        return talker.eval()

    @torch.inference_mode()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy `weights` (keys without the `talker.` prefix) into the parameters; raise on any mismatch."""
        params = dict(self.named_parameters())
        tied = self.config.tie_word_embeddings and "model.lm_head.weight" not in weights
        expected = set(params) - ({"model.lm_head.weight"} if tied else set())
        missing = sorted(expected - set(weights))
        unexpected = sorted(set(weights) - set(params))
        mis_shaped = [k for k in expected & set(weights) if weights[k].shape != params[k].shape]
        if missing or unexpected or mis_shaped:
            raise CheckpointError(
                f"talker weights do not match: missing {missing}, unexpected {unexpected}, wrong shape {mis_shaped}"
            )
        for key in expected:
            params[key].copy_(weights[key])
        if tied:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight

    # ------------------------------------------------------------------ forward pieces
    def embed_streams(self, audio_ids: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """[1, n] audio-stream ids + [1, n] text-stream ids -> [1, n, H] summed embeddings."""
        table = self.model.model.embed_tokens
        return table(audio_ids) + table(text_ids)

    def embed_prefix(self, speaker_embedding: torch.Tensor, thinker_states: torch.Tensor | None) -> torch.Tensor:
        """The shared prefix as embeddings [1, P, H], conditioning slots filled.

        speaker_embedding: [1, speaker_dim]; thinker_states: [1, T, thinker_hidden] or None."""
        thinker_length = 0 if thinker_states is None else thinker_states.shape[1]
        layout = self.tokenizer.shared_prefix(thinker_length)
        ids = torch.tensor([layout.ids], device=self.device)
        embeds = self.embed_streams(ids, ids)  # both streams carry the same tokens here
        speaker = speaker_embedding.to(self.device, self.dtype).reshape(1, -1, 1)  # Conv1d over a length-1 sequence
        embeds[:, layout.speaker_index] = self.vp_head(speaker)[:, :, 0]
        if thinker_states is not None:
            start, end = layout.thinker_start, layout.thinker_start + thinker_length
            embeds[:, start:end] = self.thinker_to_talker_proj(thinker_states.to(self.device, self.dtype))
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.model.lm_head, out_dtype=torch.float32)

    def candidates(self, logits: torch.Tensor, eos_penalty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k 20 (logits, ids) of logits [..., V] among the audio tokens and `<audio_eos>` (its logit +
        `eos_penalty` [...]).

        Text ids are never valid output here (they would not decode to speech), so they are excluded up front."""
        eos, offset = self.tokenizer.ids["<audio_eos>"], self.tokenizer.audio_offset
        allowed = torch.full_like(logits, float("-inf"))
        allowed[..., offset:] = logits[..., offset:]
        allowed[..., eos] = logits[..., eos] + eos_penalty
        return allowed.topk(TOP_K)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def start(
        self, speaker_embedding: torch.Tensor, thinker_states: torch.Tensor | None = None, max_new_tokens: int = MAX_NEW_TOKENS
    ) -> TalkerContext:
        """Run the shared prefix once; `generate` then speaks any number of sentences of up to `max_new_tokens`
        tokens after it."""
        embeds = self.embed_prefix(speaker_embedding, thinker_states)
        prefix_length = embeds.shape[1]
        # One slot more than generation can reach: the decode step's graph is captured there.
        cache, step = self._cache_and_step(prefix_length + max_new_tokens + 1)
        self.model.model.prefill(embeds, cache)
        return TalkerContext(cache, prefix_length, step)

    def _cache_and_step(self, slots: int) -> tuple[KVCache, DecodeStep]:
        """An empty cache of at least `slots` slots and its decode step.

        With CUDA graphs they are kept per power-of-two size and reused by later replies, as the thinker's are:
        capturing a step costs two eager steps and a capture (~0.1 s) that would otherwise delay every reply's
        first sound. So a talker speaks one reply at a time (the app runs one GPU job at a time)."""
        decoder = self.model.model
        if not graphs_allowed(self.device):
            cache = decoder.new_cache(slots, self.dtype, self.device)
            return cache, DecodeStep(self, cache)
        capacity = cache_bucket(slots)
        if capacity not in self.captured_steps:
            cache = decoder.new_cache(capacity, self.dtype, self.device)
            self.captured_steps[capacity] = (cache, DecodeStep(self, cache))
        cache, step = self.captured_steps[capacity]
        cache.valid.zero_()
        return cache, step

    def _apply(self, fn, *args, **kwargs):
        self.captured_steps.clear()  # captured for the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    @torch.inference_mode()
    def generate(
        self,
        context: TalkerContext,
        text: str,
        generator: torch.Generator | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        min_new_tokens: int = MIN_NEW_TOKENS,
        stop_event: threading.Event | None = None,
    ) -> list[int]:
        """S3-BPE ids (audio offset removed) for one sentence, spoken after the context's prefix."""
        sentence = SpokenSentence(self.tokenizer, text, max_new_tokens, min_new_tokens)
        room = context.cache.capacity - 1 - context.prefix_length
        if max_new_tokens > room:
            raise ValueError(f"max_new_tokens {max_new_tokens} exceeds the {room} the context was started for")
        context.cache.valid[:, context.prefix_length :] = False  # forget the previous sentence
        while not sentence.done and not (stop_event is not None and stop_event.is_set()):
            top_logits, top_ids = context.step([sentence.audio_in], [sentence.text_in],
                                               [context.prefix_length + len(sentence.spoken)], [sentence.allow_eos])
            sentence.accept(sample(top_logits[0], top_ids[0], generator))
        return sentence.spoken


class SpokenSentence:
    """One sentence as the talker speaks it after a reply's prefix: the (audio id, text id) pair to feed next,
    whether `<audio_eos>` may end it yet, and the S3-BPE ids spoken so far (audio offset removed). The audio stream
    starts at `<audio_bos>`, the text stream at the first text id and goes on with the rest, `<text_eos>`, then
    `<text_pad>`; the sentence ends at `<audio_eos>` or after `max_new_tokens`."""

    def __init__(self, tokenizer: TalkerTokenizer, text: str, max_new_tokens: int, min_new_tokens: int):
        text_ids = tokenizer.encode(text)
        if not text_ids:
            raise ValueError(f"nothing to speak in {text!r}")
        ids = tokenizer.ids
        self._eos, self._text_pad, self._offset = ids["<audio_eos>"], ids["<text_pad>"], tokenizer.audio_offset
        self._upcoming_text = text_ids[1:] + [ids["<text_eos>"]]
        self.audio_in, self.text_in = ids["<audio_bos>"], text_ids[0]
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.spoken: list[int] = []
        self.done = max_new_tokens <= 0

    @property
    def allow_eos(self) -> bool:
        return len(self.spoken) >= self.min_new_tokens

    def accept(self, token: int) -> None:
        """The token sampled for this sentence: `<audio_eos>` ends it; anything else is spoken and fed next."""
        if token == self._eos:
            self.done = True
            return
        self.spoken.append(token - self._offset)
        self.audio_in = token
        self.text_in = self._upcoming_text.pop(0) if self._upcoming_text else self._text_pad
        self.done = len(self.spoken) >= self.max_new_tokens


def sample(top_logits: torch.Tensor, top_ids: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one id from the top-k candidates at temperature 1. On the CPU, so a CPU generator gives the same tokens
    whatever device the talker runs on."""
    probs = torch.softmax(top_logits.float().cpu(), dim=-1)
    return int(top_ids.cpu()[torch.multinomial(probs, 1, generator=generator)])


def read_talker_weights(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every `talker.*` tensor of the checkpoint's safetensors, keyed without the prefix (CPU, stored dtype)."""
    weights: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(os.fspath(ckpt_dir)):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith(WEIGHT_PREFIX):
                    weights[key[len(WEIGHT_PREFIX) :]] = f.get_tensor(key)
    if not weights:
        raise CheckpointError(
            f"{ckpt_dir} has no talker weights (no '{WEIGHT_PREFIX}*' keys in its safetensors): this checkpoint "
            "cannot speak"
        )
    return weights
