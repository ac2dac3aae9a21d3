"""The Ling (BailingMoe) language model of Ming-Lite-Omni-Preview.

28 pre-norm decoder layers: grouped-query attention with a fused QKV projection and 1-D RoPE, then a sparse MoE
(64 routed SwiGLU experts, top-6, plus one shared expert) whose router is chosen per token by modality: the Preview
has three gates of identical shape (`gate` for text, `image_gate`, `audio_gate`).

Attribute names follow the release's checkpoint keys (`model.model.layers.{i}.attention.query_key_value.weight`,
`...mlp.experts.{e}.gate_proj.weight`, ...). The routed experts are stored stacked (`[num_experts, ...]`) so the
decode path can read only the selected experts, but `state_dict()` and the loader still speak the per-expert keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import LLMConfig
from .layers import (
    MLP,
    KVCache,
    RMSNorm,
    TunedKernels,
    attend,
    decode_batch,
    few_tokens,
    kernels,
    linear,
    rope_cos_sin,
    use_grouped_mm,
    use_triton,
)

TEXT, IMAGE, AUDIO = 0, 1, 2  # router ids: which gate a token is routed by
RouterRows = list[tuple[int, torch.Tensor]]


def modality_rows(router_ids: torch.Tensor | None) -> RouterRows | None:
    """Which gate scores which tokens, from router ids [B, L] (TEXT/IMAGE/AUDIO): None when all are text (the text
    gate scores every token), else (router id, flat token indices) per router present. Found once per forward pass:
    a check in every layer would stop the host for the GPU 28 times a prompt chunk (the host launches a prompt's
    kernels faster than the GPU runs them only if it never waits for them)."""
    if router_ids is None:
        return None
    flat = router_ids.reshape(-1)
    present = torch.bincount(flat, minlength=3).tolist()
    if present[IMAGE] == present[AUDIO] == 0:
        return None
    return [(router, (flat == router).nonzero().squeeze(-1)) for router in (TEXT, IMAGE, AUDIO) if present[router]]


class Attention(nn.Module, TunedKernels):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_out, bias=config.use_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots: torch.Tensor | None = None,
        input_norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """Self-attention of input_norm(x) (`input_norm`, the layer's pre-norm, runs inside the QKV projection's
        kernel at decode). mask, cache (this layer's keys, values) and slots as for `ming.layers.attend`."""
        B, L, _ = x.shape
        qkv = linear(x, self.query_key_value, input_norm, self.kernel_tuning)
        qkv = qkv.view(B, L, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        out = attend(qkv, rope, self.num_heads, self.num_kv_heads, mask, cache, slots, self.kernel_tuning)
        return linear(out, self.dense, tuning=self.kernel_tuning)


class Router(nn.Module):
    """One gate: softmax over experts in float32, top-k, renormalised to sum to one."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """The routed experts, stacked: gate/up [E, I, H], down [E, H, I].

    The release stores them as `experts.{e}.{gate,up,down}_proj.weight`; `release_views()` maps those names onto
    slices of the stacked tensors, and a state-dict hook writes them back under the same names.
    """

    def __init__(self, config: LLMConfig):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self._register_state_dict_hook(Experts._per_expert_state_dict)
        self._register_load_state_dict_pre_hook(Experts._stack_on_load, with_module=True)

    def release_views(self) -> dict[str, tuple[nn.Parameter, int]]:
        """`{"{e}.gate_proj.weight": (stacked_param, e), ...}` relative to this module's prefix."""
        views = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            param = getattr(self, name)
            for e in range(param.shape[0]):
                views[f"{e}.{name}.weight"] = (param, e)
        return views

    @staticmethod
    def _per_expert_state_dict(module, state_dict, prefix, local_metadata):
        for name in ("gate_proj", "up_proj", "down_proj"):
            stacked = state_dict.pop(prefix + name)
            for e in range(stacked.shape[0]):
                state_dict[f"{prefix}{e}.{name}.weight"] = stacked[e]
        return state_dict

    def _stack_on_load(self, state_dict, prefix, *args):
        for name in ("gate_proj", "up_proj", "down_proj"):
            keys = [f"{prefix}{e}.{name}.weight" for e in range(getattr(self, name).shape[0])]
            if all(k in state_dict for k in keys):
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_idx/topk_weight [T, k] -> weighted sum of the chosen experts' outputs [T, H].

        (token, expert) pairs are sorted by expert so each expert runs one matmul over its tokens. The weighted sum
        is accumulated in float32, as the release does.
        """
        T, k = topk_idx.shape
        gpu = use_grouped_mm(x)
        flat_expert = topk_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // k
        weights = topk_weight.reshape(-1)[order]
        if gpu:
            return self._grouped(x, flat_expert, token_of, weights)
        out = torch.zeros(T, x.shape[-1], dtype=torch.float32, device=x.device)
        counts = torch.bincount(flat_expert, minlength=self.gate_proj.shape[0]).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tokens = token_of[start : start + n]
            h = x[tokens]
            h = F.silu(h @ self.gate_proj[e].T) * (h @ self.up_proj[e].T)
            h = h @ self.down_proj[e].T
            out.index_add_(0, tokens, h.float() * weights[start : start + n, None])
            start += n
        return out.to(x.dtype)

    def _grouped(self, x, flat_expert, token_of, weights) -> torch.Tensor:
        """The GPU path: three grouped GEMMs over the expert-sorted rows. Reads only the weights of experts that
        have tokens, and never syncs with the host, so a decode step can be captured in a CUDA graph."""
        num_experts = self.gate_proj.shape[0]
        counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_expert.int(), torch.ones_like(flat_expert, dtype=torch.int32))
        offsets = counts.cumsum(0, dtype=torch.int32)
        rows = x[token_of]
        gate = torch._grouped_mm(rows, self.gate_proj.transpose(1, 2), offs=offsets)
        up = torch._grouped_mm(rows, self.up_proj.transpose(1, 2), offs=offsets)
        h = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of, h.float() * weights[:, None])
        return out.to(x.dtype)


class SparseMoeBlock(nn.Module, TunedKernels):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.experts = Experts(config)
        self.gate = Router(config)
        if config.multi_gate:
            self.image_gate = Router(config)
            self.audio_gate = Router(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts
            else None
        )

    def router_logits(self, x: torch.Tensor, router_rows: RouterRows | None) -> torch.Tensor:
        """x [T, H], router_rows (`modality_rows`: None when all tokens are text) -> gate logits [T, E].

        Each token is scored only by its own modality's gate; the result equals computing all three gates and
        selecting per token, as the release does."""
        if router_rows is None:
            return self.gate.logits(x)
        logits = x.new_empty(x.shape[0], self.gate.weight.shape[0])
        gates = {TEXT: self.gate, IMAGE: self.image_gate, AUDIO: self.audio_gate}
        for router, rows in router_rows:
            logits[rows] = gates[router].logits(x[rows])
        return logits

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate logits [T, E] -> (topk_idx, topk_weight) [T, k]: float32 softmax, top-k, renormalised."""
        renormalize = self.top_k > 1 and self.norm_topk_prob
        if use_triton(logits):
            return kernels.route_topk(logits, self.top_k, renormalize)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = scores.topk(self.top_k, dim=-1)
        if renormalize:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return topk_idx, topk_weight

    def forward(
        self,
        x: torch.Tensor,
        router_rows: RouterRows | None,
        residual: torch.Tensor | None = None,
        routing: tuple[torch.Tensor, torch.Tensor] | None = None,
        swiglu: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MoE output for x [B, L, H], plus `residual` when given (fused into the last kernel on the GPU).
        `routing` (topk_idx, topk_weight) [B*L, k], when the caller already has it (the fused decode norm), skips
        the gate; so does `swiglu` the shared expert's SwiGLU at one row (see `kernels.add_norm_route`)."""
        B, L, H = x.shape
        flat = x.reshape(-1, H)
        if routing is None:
            routing = self.route(self.router_logits(flat, router_rows))
        topk_idx, topk_weight = routing
        if decode_batch(x):
            # The rows sorted by expert: each chosen expert read once for all of its rows, the shared one alongside
            # (one row needs no sort: two launches instead of four).
            e, shared = self.experts, self.shared_experts
            shared_weights = None if shared is None else (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
            flat_residual = None if residual is None else residual.reshape(-1, H)
            if flat.shape[0] == 1:
                y = kernels.moe_one_row(flat, topk_idx, topk_weight, e.gate_proj, e.up_proj, e.down_proj,
                                        shared_weights, flat_residual, self.kernel_tuning, swiglu)
            else:
                y = kernels.moe_sorted(flat, topk_idx, topk_weight, e.gate_proj, e.up_proj, e.down_proj,
                                       shared_weights, flat_residual, self.kernel_tuning)
            return y.view(B, L, H)
        y = self.experts(flat, topk_idx, topk_weight).view(B, L, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y if residual is None else residual + y


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx < config.first_k_dense_replace:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = SparseMoeBlock(config)

    def forward(self, x, rope, mask, router_rows, cache=None, slots=None) -> torch.Tensor:
        attention = self.attention(x, rope, mask, cache, slots, input_norm=self.input_layernorm)
        norm = self.post_attention_layernorm
        if not isinstance(self.mlp, SparseMoeBlock):
            x, h = norm.add_and_norm(x, attention)
            return self.mlp(h, residual=x)
        if few_tokens(x) and router_rows is None:
            # Decode: the residual add, the norm, the (text) gate and the routing in one kernel.
            # At one row the shared expert's SwiGLU joins that kernel too: its weights stream during the routing.
            B, L, H = x.shape
            moe = self.mlp
            shared = moe.shared_experts if B * L == 1 else None
            x, h, *routing, swiglu = kernels.add_norm_route(
                x.reshape(-1, H), attention.reshape(-1, H), norm.weight, norm.eps, moe.gate.weight, moe.top_k,
                moe.top_k > 1 and moe.norm_topk_prob,
                None if shared is None else (shared.gate_proj.weight, shared.up_proj.weight),
                moe.experts.gate_proj.shape[1], moe.kernel_tuning,
            )
            return moe(h.view(B, L, H), router_rows, residual=x.view(B, L, H), routing=tuple(routing), swiglu=swiglu)
        x, h = norm.add_and_norm(x, attention)
        return self.mlp(h, router_rows, residual=x)


class BailingMoeModel(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        router_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        final_norm: bool = True,
    ) -> torch.Tensor:
        """Hidden states [B, L, H] after the final norm (before it if `final_norm` is False: the decode step fuses it
        into the output head). With a cache, the tokens' keys and values go to cache `slots` [L], and `mask` says
        what they attend to (see `ming.layers.attend`): a prompt from slot 0 attends to itself, a decode step or a
        chunk prefilled after earlier ones to the cache."""
        rope = rope_cos_sin(position_ids, self.config.attention_head_dim, self.config.rope_theta)
        router_rows = modality_rows(router_ids)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x = layer(x, rope, mask, router_rows, layer_cache, slots)
        return self.norm(x) if final_norm else x


class BailingMoeForCausalLM(nn.Module, TunedKernels):
    """Keys: `model.*` (the decoder) and `lm_head.weight`. Under MingOmni this whole module sits at `model.`."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.model = BailingMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The checkpoint holds the raw head; with norm_head the model uses W / ||W|| over the vocab axis.
        self.head_is_normalized = not config.norm_head

    @torch.no_grad()
    def normalize_head_(self) -> None:
        """Fold `norm_head` into the weight once, in float32 (what the release does at its first eval forward)."""
        if self.head_is_normalized:
            return
        w = self.lm_head.weight
        w_float = w.float()
        w.copy_(w_float / (w_float.norm(p=2, dim=0, keepdim=True) + 1e-7))
        self.head_is_normalized = True

    def logits(self, hidden: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """Float32 logits of hidden [..., H] (rounded to the weight dtype first, as the release's head); `norm`,
        if given, is applied to hidden first (fused into the head's kernel at decode)."""
        self.normalize_head_()
        return linear(hidden, self.lm_head, norm, self.kernel_tuning, out_dtype=torch.float32)

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        c = self.config
        return KVCache.empty(c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.attention_head_dim,
                             dtype, device)


def expert_active_parameters(config: LLMConfig) -> int:
    """Parameters one decode step reads per token (attention, top-k + shared experts, gates, norms; no embeddings)."""
    H, I = config.hidden_size, config.moe_intermediate_size
    hd = config.attention_head_dim
    attn = H * (config.num_attention_heads + 2 * config.num_key_value_heads) * hd + config.num_attention_heads * hd * H
    experts = 3 * H * I * config.num_experts_per_tok
    shared = 3 * H * I * (config.num_shared_experts or 0)
    gate = config.num_experts * H
    return config.num_hidden_layers * (attn + experts + shared + gate + 2 * H) + H

