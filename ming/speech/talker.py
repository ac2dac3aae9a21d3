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
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer
from torch import nn

from ..decoding import cache_bucket, graphs_allowed
from ..llm import MLP, RMSNorm, use_triton

try:  # Triton comes with CUDA builds of torch; the CPU path never needs it.
    from .. import kernels
except ImportError:
    kernels = None
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class KVCache:
    """Keys and values of every layer in fixed slots, [1, kv_heads, capacity, head_dim], and which slots hold a
    position (`valid`). Fixed shapes let a decode step be replayed from a CUDA graph; going back to a shorter
    prefix is just marking the later slots invalid."""

    def __init__(self, config: TalkerLMConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (1, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(1, capacity, dtype=torch.bool, device=device)

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


class Attention(nn.Module):
    def __init__(self, config: TalkerLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: [1, n, H] at cache `slots` [n]. mask None: x is a whole sequence from slot 0 and attends causally to
        itself; otherwise mask [1, 1, 1, capacity] says which cache slots the (single) new position sees."""
        _, n, _ = x.shape
        q = self.q_proj(x).view(1, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys.index_copy_(2, slots, k)
        values.index_copy_(2, slots, v)
        gqa = self.num_kv_heads != self.num_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(1, n, self.num_heads * self.head_dim))

    def fused_decode(
        self, x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
        values: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor,
    ) -> torch.Tensor:
        """`forward` of norm(x) for one new position on the GPU, in six kernels: the norm inside the q/k/v GEMVs
        (written side by side, the thinker's fused layout), RoPE + cache write, flash-decoding attention over the
        valid slots [1, capacity], the output GEMV. cos/sin float32 [1, 1, head_dim]. Returns [1, H]."""
        h = x.reshape(1, -1)
        qkv = h.new_empty(1, 1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        flat, start = qkv.view(1, -1), 0
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            end = start + proj.weight.shape[0]
            kernels.gemv(h, proj.weight, (norm.weight, norm.eps), bias=proj.bias, out=flat[:, start:end])
            start = end
        kernels.rope_(qkv, cos, sin, self.num_heads, self.num_kv_heads, (keys, values), slot)
        out = kernels.decode_attention(qkv, keys, values, valid, self.num_heads)
        return kernels.gemv(out.reshape(1, -1), self.o_proj.weight)


def use_fused_decode(h: torch.Tensor, cache: "KVCache") -> bool:
    """One new bf16 position on an Ampere-or-newer GPU over a power-of-two cache (the graphed sizes), with heads
    of at least 16 (a power of two: the attention kernel's tile): the Triton kernels."""
    capacity, head_dim = cache.capacity, cache.keys[0].shape[-1]
    return (
        use_triton(h) and h.shape[1] == 1 and capacity & (capacity - 1) == 0
        and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    )


class DecoderLayer(nn.Module):
    def __init__(self, config: TalkerLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)  # Qwen2's SwiGLU is the LLM's

    def forward(self, x, cos, sin, keys, values, slots, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, keys, values, slots, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fused_decode(self, x, cos, sin, keys, values, slot, valid) -> torch.Tensor:
        """`forward` for one new position on the GPU: ten kernels instead of about thirty."""
        attention = self.self_attn.fused_decode(x, self.input_layernorm, cos, sin, keys, values, slot, valid)
        norm, mlp = self.post_attention_layernorm, self.mlp
        x, h = kernels.rms_norm(x.reshape(1, -1), norm.weight, norm.eps, delta=attention)
        y = kernels.mlp_gemv(h, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, residual=x)
        return y.view(1, 1, -1)


class Qwen2Decoder(nn.Module):
    """Embedding table, decoder layers and final norm (the release's `talker.model.model`)."""

    def __init__(self, config: TalkerLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def prefill(self, inputs_embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A sequence [1, n, H] at positions 0..n-1 into an empty cache. Returns hidden states [1, n, H]."""
        slots = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        cache.valid[:, slots] = True
        return self._run(inputs_embeds, slots, cache, mask=None)

    def decode(self, inputs_embeds: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new position [1, 1, H] at `position` ([1], on the device: no host sync, so it can be graphed),
        attending to every valid cache slot and itself. Returns [1, 1, H]."""
        cache.valid.index_fill_(1, position, True)
        return self._run(inputs_embeds, position, cache, mask=cache.valid[:, None, None, :])

    def _run(self, h: torch.Tensor, slots: torch.Tensor, cache: KVCache, mask: torch.Tensor | None) -> torch.Tensor:
        angles = slots.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos()[None], angles.sin()[None]  # [1, n, head_dim]
        fused = mask is not None and use_fused_decode(h, cache)
        if not fused:  # the fused kernels rotate in float32; the plain path in the activation dtype, as released
            cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            if fused:
                h = layer.fused_decode(h, cos, sin, keys, values, slots, cache.valid)
            else:
                h = layer(h, cos, sin, keys, values, slots, mask)
        return self.norm(h)


class TalkerLM(nn.Module):
    """Qwen2 decoder plus output head (the release's `talker.model`, a `Qwen2ForCausalLM`)."""

    def __init__(self, config: TalkerLMConfig):
        super().__init__()
        self.model = Qwen2Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ---------------------------------------------------------------------------------------------------- the talker
class DecodeStep:
    """One talker step with static shapes: (audio id, text id) at a cache slot -> the top-k candidates for the next
    token. Its inputs live in fixed buffers, so on a GPU the step is captured once per cache and replayed as a
    CUDA graph: one launch instead of ~1,000 kernel launches from Python, which otherwise hold the full-size talker
    to about 32 steps a second on an H100, barely real time. (`MING_CUDA_GRAPHS=0` turns graphs off, as for the
    thinker.)"""

    def __init__(self, talker: "Talker", cache: KVCache):
        device = talker.device
        self.talker, self.cache = talker, cache
        self.ids = torch.zeros(1, 2, dtype=torch.long, device=device)  # audio-stream id, text-stream id
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.eos_penalty = torch.zeros((), device=device)  # -inf while <audio_eos> is refused
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        if graphs_allowed(device):
            self._capture()

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        talker = self.talker
        embeds = talker.embed_streams(self.ids[:, :1], self.ids[:, 1:])
        hidden = talker.model.model.decode(embeds, self.position, self.cache)
        return talker.candidates(talker.logits(hidden[0, -1]), self.eos_penalty)

    def _capture(self) -> None:
        # Warm-up and capture run at the last slot, which generation never reaches (see Talker.start).
        last = self.cache.capacity - 1
        self.position.fill_(last)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # lets kernels pick their algorithms and allocate workspaces
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._step()
        self.cache.valid[:, last] = False

    def __call__(self, audio_id: int, text_id: int, position: int, allow_eos: bool):
        """Top-k (logits, ids) on the device."""
        self.ids.copy_(torch.tensor([[audio_id, text_id]]))
        self.position.fill_(position)
        self.eos_penalty.fill_(0.0 if allow_eos else float("-inf"))
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.outputs


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
        return self.model.lm_head(hidden).float()

    def candidates(self, logits: torch.Tensor, eos_penalty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k 20 (logits, ids) among the audio tokens and `<audio_eos>` (its logit + `eos_penalty`).

        Text ids are never valid output here (they would not decode to speech), so they are excluded up front."""
        eos, offset = self.tokenizer.ids["<audio_eos>"], self.tokenizer.audio_offset
        allowed = torch.full_like(logits, float("-inf"))
        allowed[offset:] = logits[offset:]
        allowed[eos] = logits[eos] + eos_penalty
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
        if not graphs_allowed(self.device):
            cache = KVCache(self.config, slots, self.dtype, self.device)
            return cache, DecodeStep(self, cache)
        capacity = cache_bucket(slots)
        steps: dict[int, tuple[KVCache, DecodeStep]] = self.__dict__.setdefault("_decode_steps", {})
        if capacity not in steps:
            cache = KVCache(self.config, capacity, self.dtype, self.device)
            steps[capacity] = (cache, DecodeStep(self, cache))
        cache, step = steps[capacity]
        cache.valid.zero_()
        return cache, step

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_decode_steps", None)  # captured for the old device / dtype
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
        text_ids = self.tokenizer.encode(text)
        if not text_ids:
            raise ValueError(f"nothing to speak in {text!r}")
        room = context.cache.capacity - 1 - context.prefix_length
        if max_new_tokens > room:
            raise ValueError(f"max_new_tokens {max_new_tokens} exceeds the {room} the context was started for")
        ids = self.tokenizer.ids
        upcoming_text = text_ids[1:] + [ids["<text_eos>"]]
        context.cache.valid[:, context.prefix_length :] = False  # forget the previous sentence
        audio_in, text_in = ids["<audio_bos>"], text_ids[0]
        spoken: list[int] = []
        for step in range(max_new_tokens):
            if stop_event is not None and stop_event.is_set():
                break
            top_logits, top_ids = context.step(audio_in, text_in, context.prefix_length + step, step >= min_new_tokens)
            token = sample(top_logits, top_ids, generator)
            if token == ids["<audio_eos>"]:
                break
            spoken.append(token - self.tokenizer.audio_offset)
            audio_in = token
            text_in = upcoming_text.pop(0) if upcoming_text else ids["<text_pad>"]
        return spoken


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
