"""A tiny causal LM shaped like ChatGLM's own modelling code, for tests (a real ChatGLM is gigabytes).

What fedtune relies on is what ChatGLM-6B/2/3 do: `config.pre_seq_len` makes the model build
`transformer.prefix_encoder` (an embedding of `pre_seq_len` rows, with the `trans` MLP when
`prefix_projection`), freeze every other weight, and prepend the encoded prefix to each
layer's keys and values; module names `query_key_value`, `dense`, `dense_h_to_4h`,
`dense_4h_to_h`; and a `generate` of its own.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tinychatglm import TinyChatGLMConfig


class PrefixEncoder(nn.Module):
    def __init__(self, config: TinyChatGLMConfig) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = config.num_layers * 2 * config.hidden_size
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, width))
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded


class Attention(nn.Module):
    def __init__(self, config: TinyChatGLMConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2)
                   for t in self.query_key_value(x).split(hidden, dim=-1))
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        before = k.shape[2] - length  # every position sees the whole prefix, then causally
        mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=before)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(batch, length, hidden))


class Block(nn.Module):
    def __init__(self, config: TinyChatGLMConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.self_attention = Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), prefix)
        return x + self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(self.post_attention_layernorm(x))))


class TinyChatGLMModel(nn.Module):
    def __init__(self, config: TinyChatGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_positions, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len is not None:
            for param in self.parameters():  # P-tuning v2 trains the prefix alone, as ChatGLM's code does
                param.requires_grad = False
            self.prefix_encoder = PrefixEncoder(config)

    def get_prompt(self, batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        tokens = torch.arange(self.pre_seq_len, device=device).unsqueeze(0).expand(batch, -1)
        encoded = self.prefix_encoder(tokens).view(batch, self.pre_seq_len, c.num_layers * 2, c.num_attention_heads, -1)
        encoded = encoded.permute(2, 0, 3, 1, 4)  # layer*2, batch, heads, prefix, head_dim
        return [(encoded[2 * i], encoded[2 * i + 1]) for i in range(c.num_layers)]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embedding(input_ids) + self.position(positions)
        prompts = self.get_prompt(input_ids.shape[0], input_ids.device) if self.pre_seq_len else None
        for i, layer in enumerate(self.layers):
            x = layer(x, prompts[i] if prompts else None)
        return self.output_layer(self.final_layernorm(x))


class TinyChatGLMForConditionalGeneration(PreTrainedModel):
    config_class = TinyChatGLMConfig
    base_model_prefix = "transformer"

    def __init__(self, config: TinyChatGLMConfig) -> None:
        super().__init__(config)
        self.transformer = TinyChatGLMModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: object) -> CausalLMOutput:
        # Right padding only (what fedtune's collator makes): causal attention never sees it.
        logits = self.transformer(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **_: object) -> dict[str, torch.Tensor]:
        """As ChatGLM's code has it (peft's causal-LM wrapper asks for it); no cache here."""
        return {"input_ids": input_ids}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id: list[int] | int | None = None,
                 streamer: object = None, **_: object) -> torch.Tensor:
        """Greedy, without a cache: enough for a tiny model. A `streamer` gets the prompt, then each
        token as it is made, then `end()`, as from transformers' generate()."""
        stop = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id] if eos_token_id else [])
        ids = input_ids
        if streamer is not None:
            streamer.put(ids.cpu())
        for _ in range(max_new_tokens):
            token = self.transformer(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            if streamer is not None:
                streamer.put(token[0].cpu())
            if int(token) in stop:
                break
        if streamer is not None:
            streamer.end()
        return ids
