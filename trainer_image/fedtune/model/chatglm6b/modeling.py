"""ChatGLM-6B as its upstream code defines it, written for current transformers.

What makes it ChatGLM-6B (GLM-130B's layout), each as the upstream `modeling_chatglm.py` computes it:
- 2D rotary positions: each head's dimensions split in two halves; the first half is rotated by the
  token's position (in the context, its index; after `<sop>`, the position of `[gMASK]`), the second
  by its block position (0 in the context, 1, 2, ... from `<sop>` on). The frequencies are rounded to
  float16, as upstream builds them.
- The prefix attention mask: every token sees the whole context (up to `<sop>`), the rest is causal.
- `query_key_value` interleaved per head: the row block of head h holds its query, key and value.
- GLM-130B's residual scaling: each sublayer adds to its normalised input times sqrt(2 * 28) (upstream's
  blocks never get the config's layer count).
- GeLU (tanh approximation) MLP, LayerNorm, `lm_head` tied to the word embeddings (upstream's config leaves
  `tie_word_embeddings` at its default).
- P-tuning v2 in its own form (`pre_seq_len`, `prefix_projection`): `transformer.prefix_encoder` yields
  every layer's keys and values for the prefix, which precede the tokens' unrotated; positions do not
  count it.

Parameter names are upstream's, so its checkpoints, its LoRA adapters and its prefix-encoder files load
as they are. Tensors are (batch, heads, sequence, head_dim) inside; attention is SDPA (or eager); the
key/value cache is transformers' `Cache`.
"""

from __future__ import annotations

import math
import sys
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from fedtune.model.chatglm6b.configuration import ChatGLM6BConfig

ROPE_BASE = 10000
# GLM-130B's residual scaling, sqrt(2 * layers): upstream builds every block with its default of 28 layers,
# whatever the config says, so 6B's value holds for any depth.
RESIDUAL_ALPHA = (2 * 28) ** 0.5
TOKENS_SEEN = "fedtune_chatglm6b_tokens"  # attribute of a cache: how many tokens (not prefix) it holds


# --- positions and the attention mask ----------------------------------------------------


def _first(hits: torch.Tensor, default: int) -> torch.Tensor:
    """Per row, the index of the first True, or `default` where there is none."""
    return torch.where(hits.any(1), hits.int().argmax(1), torch.full_like(hits[:, 0], default, dtype=torch.long))


def position_ids(input_ids: torch.Tensor, padding: torch.Tensor | None, config: ChatGLM6BConfig) -> torch.Tensor:
    """(batch, 2, seq): upstream's positions and block positions, counted from each row's first real token
    (left padding shifts nothing, as upstream's tokenizer pads them)."""
    batch, seq = input_ids.shape
    index = torch.arange(seq, device=input_ids.device).expand(batch, -1)
    pads = (padding.to(input_ids.device).cumsum(1) == 0).sum(1) if padding is not None else index[:, 0] * 0
    context = _first(input_ids == config.bos_token_id, seq)[:, None]
    has_gmask = (input_ids == config.gmask_token_id).any(1, keepdim=True)
    mask_token = torch.where(has_gmask, config.gmask_token_id, config.mask_token_id)
    mask_at = _first(input_ids == mask_token, -1)[:, None]
    after = index >= context
    positions = torch.where(after & (mask_at >= 0), mask_at, index) - pads[:, None]
    blocks = torch.where(after, index - context + 1, 0)
    return torch.stack([positions.clamp(min=0), blocks], dim=1)


def attention_mask(input_ids: torch.Tensor, padding: torch.Tensor | None, past: int,
                   config: ChatGLM6BConfig) -> torch.Tensor:
    """(batch, 1, seq, past + seq), True where a query may attend: every earlier key that is not padding,
    and the whole context (up to `<sop>`) of this chunk; `padding` covers the keys (or only the tokens:
    then whatever precedes them, a prefix, is visible)."""
    batch, seq = input_ids.shape
    keys = past + seq
    device = input_ids.device
    visible = torch.ones(batch, keys, dtype=torch.bool, device=device)
    if padding is not None:
        padding = padding.to(device=device, dtype=torch.bool)
        visible[:, keys - padding.shape[1]:] = padding[:, -keys:]
    key = torch.arange(keys, device=device)
    query = torch.arange(seq, device=device) + past
    context = _first(input_ids == config.bos_token_id, seq)[:, None, None] + past
    allowed = (key[None, None, :] <= query[None, :, None]) | ((key >= past)[None, None, :] & (key < context))
    allowed = allowed & visible[:, None, :]
    allowed |= key[None, None, :] == query[None, :, None]  # a padding row sees itself, never nothing (no NaN)
    return allowed[:, None]


# --- layers -------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """cos and sin for upstream's rotation of half a head (dim = head_dim / 2), frequencies held as float16."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inv_freq = (1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2).float() / dim))).half().float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (batch, 1, seq, dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_halves(x: torch.Tensor) -> torch.Tensor:
    """upstream's rotate_half on each half of the head, in one op: (a, b | c, d) -> (-b, a | -d, c)."""
    quarters = x.unflatten(-1, (2, 2, -1))
    return torch.stack((-quarters[..., 1, :], quarters[..., 0, :]), dim=-2).flatten(-3)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Both halves at once: `cos` and `sin` hold the positions' for the first, the block positions' for the second."""
    return x * cos + rotate_halves(x) * sin


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM6BConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.config = config

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, ...], mask: torch.Tensor,
                prefix: tuple[torch.Tensor, torch.Tensor] | None, cache: Cache | None) -> torch.Tensor:
        batch, seq, _ = hidden.shape
        mixed = self.query_key_value(hidden).view(batch, seq, self.heads, 3 * self.head_dim).transpose(1, 2)
        query, key, value = mixed.split(self.head_dim, dim=-1)
        cos, sin = rotary
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        if prefix is not None:  # the model's own P-tuning prefix, unrotated, before the tokens
            key = torch.cat([prefix[0].to(key.dtype), key], dim=2)
            value = torch.cat([prefix[1].to(value.dtype), value], dim=2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_id)
        context = self._attend(query, key, value, mask)
        return self.dense(context.transpose(1, 2).reshape(batch, seq, -1))

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        if self.config._attn_implementation == "eager":
            # upstream's arithmetic: scores in float32 softmax, masked with -10000
            scores = torch.matmul(query, key.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~mask, -10000.0)
            return torch.matmul(F.softmax(scores, dim=-1).to(value.dtype), value)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


class GLU(nn.Module):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLM6BConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)
        self.alpha = RESIDUAL_ALPHA

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, ...], mask: torch.Tensor,
                prefix_key: torch.Tensor | None = None, prefix_value: torch.Tensor | None = None, *,
                cache: Cache | None = None) -> torch.Tensor:
        prefix = (prefix_key, prefix_value) if prefix_key is not None else None
        attention_input = self.input_layernorm(hidden)
        hidden = attention_input * self.alpha + self.attention(attention_input, rotary, mask, prefix, cache)
        mlp_input = self.post_attention_layernorm(hidden)
        return mlp_input * self.alpha + self.mlp(mlp_input)


class PrefixEncoder(nn.Module):
    """Upstream's P-tuning v2 encoder: per prefix token, every layer's key and value (projected or not)."""

    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__()
        width = config.num_layers * config.hidden_size * 2
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, width))
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded


# --- models -------------------------------------------------------------------------------


class ChatGLM6BPreTrainedModel(PreTrainedModel):
    config_class = ChatGLM6BConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = False
    _no_split_modules: ClassVar[list[str]] = ["GLMBlock"]
    # upstream checkpoints carry each layer's rotary frequencies, which are recomputed here
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, RotaryEmbedding):
            dim = 2 * module.inv_freq.shape[0]
            module.inv_freq.copy_((1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2).float() / dim))).half().float())


class ChatGLM6BModel(ChatGLM6BPreTrainedModel):
    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.rotary = RotaryEmbedding(config.hidden_size // (config.num_attention_heads * 2))
        self.gradient_checkpointing = False
        if config.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)
            self.dropout = nn.Dropout(0.1)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.word_embeddings = value

    def prompt(self, batch: int, device: torch.device) -> torch.Tensor:
        """The own prefix's keys and values: (2 * layers, batch, heads, pre_seq_len, head_dim)."""
        config = self.config
        tokens = torch.arange(config.pre_seq_len, device=device).expand(batch, -1)
        kv = self.prefix_encoder(tokens).view(batch, config.pre_seq_len, 2 * config.num_layers,
                                              config.num_attention_heads, -1)
        return self.dropout(kv).permute(2, 0, 3, 1, 4)

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        if input_ids is None:
            raise ValueError("ChatGLM-6B needs input_ids: its positions and attention mask follow [gMASK] and <sop>")
        use_cache = (use_cache if use_cache is not None else self.config.use_cache) and not self.training
        cache = cache if cache is not None else kwargs.get("past_key_values")  # the name peft still uses
        if use_cache and cache is None:
            cache = DynamicCache()
        # a cache given without use_cache is still read: peft's prefix tuning hands its prefix over as one
        past = cache.get_seq_length() if cache is not None else 0
        hidden = inputs_embeds if inputs_embeds is not None else self.word_embeddings(input_ids)
        prefix = self.prompt(input_ids.shape[0], input_ids.device) if self.config.pre_seq_len and past == 0 else None
        own_prefix = self.config.pre_seq_len if prefix is not None else 0
        if cache is not None and self.training:  # peft's prefix in training: read as a prefix, never written
            prefix = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
            cache = None
        if position_ids is None:
            position_ids = position_ids_for(input_ids, attention_mask, self.config)
        if position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError(f"ChatGLM-6B position_ids have shape (batch, 2, seq) (positions, block positions), "
                             f"not {tuple(position_ids.shape)}")
        keys_before = past + own_prefix
        mask = attention_mask_for(input_ids, attention_mask, keys_before, self.config)
        cos, sin = self.rotary(position_ids[:, 0], hidden.dtype)
        block_cos, block_sin = self.rotary(position_ids[:, 1], hidden.dtype)
        rotary = (torch.cat((cos, block_cos), dim=-1), torch.cat((sin, block_sin), dim=-1))
        states = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if states is not None:
                states.append(hidden)
            pk, pv = (prefix[2 * i], prefix[2 * i + 1]) if prefix is not None else (None, None)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # the prefix goes in as arguments, so that its gradient flows through the recomputation
                hidden = self._gradient_checkpointing_func(partial(layer, cache=None), hidden, rotary, mask, pk, pv)
            else:
                hidden = layer(hidden, rotary, mask, pk, pv, cache=cache)
        hidden = self.final_layernorm(hidden)
        if states is not None:
            states.append(hidden)
        if cache is not None:
            setattr(cache, TOKENS_SEEN, getattr(cache, TOKENS_SEEN, 0) + input_ids.shape[1])
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None,
                                       hidden_states=tuple(states) if states is not None else None)


def position_ids_for(input_ids: torch.Tensor, padding: torch.Tensor | None, config: ChatGLM6BConfig) -> torch.Tensor:
    if padding is not None and padding.shape[1] != input_ids.shape[1]:
        padding = padding[:, -input_ids.shape[1]:]  # a mask that also covers a prefix or earlier tokens
    return position_ids(input_ids, padding, config)


def attention_mask_for(input_ids: torch.Tensor, padding: torch.Tensor | None, past: int,
                       config: ChatGLM6BConfig) -> torch.Tensor:
    if padding is not None and padding.dim() != 2:
        raise ValueError("ChatGLM-6B takes a (batch, keys) attention mask of 1 (attend) and 0 (padding)")
    return attention_mask(input_ids, padding, past, config)


class ChatGLM6BForCausalLM(ChatGLM6BPreTrainedModel, GenerationMixin):
    # unless the config unties them
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLM6BConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLM6BModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        outputs = self.transformer(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   output_hidden_states=output_hidden_states)
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache: Cache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      **kwargs: Any) -> dict[str, Any]:
        """The tokens the cache does not hold yet, with their positions counted over the whole sequence."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        positions = position_ids_for(input_ids, attention_mask, self.config)
        done = getattr(cache, TOKENS_SEEN, 0) if cache is not None else 0
        inputs = {"input_ids": input_ids[:, done:], "position_ids": positions[..., done:],
                  "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs


def register() -> None:
    """transformers' AutoModel and AutoModelForCausalLM build these for a `chatglm6b` config."""
    from transformers import AutoModel, AutoModelForCausalLM

    AutoModel.register(ChatGLM6BConfig, ChatGLM6BModel, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLM6BConfig, ChatGLM6BForCausalLM, exist_ok=True)


if "transformers.models.auto.modeling_auto" in sys.modules:  # imported before this module was complete
    register()
