"""ChatGLM-6B's configuration: the keys of its config.json, under a model type of its own.

Upstream's folders say `model_type: chatglm`, as ChatGLM2/3 and GLM-4 do; a converted folder says
`chatglm6b`, so that transformers' Auto classes reach this implementation without remote code.
`tie_word_embeddings` defaults to true, as it did for upstream's configuration (transformers 4's
default): `lm_head` is the word embeddings.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

MODEL_TYPE = "chatglm6b"


class ChatGLM6BConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers", "intermediate_size": "inner_hidden_size",
        "max_position_embeddings": "max_sequence_length"}
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    def __init__(self, vocab_size: int = 130528, hidden_size: int = 4096, num_layers: int = 28,
                 num_attention_heads: int = 32, layernorm_epsilon: float = 1e-5, use_cache: bool = True,
                 bos_token_id: int = 130004, eos_token_id: int = 130005, mask_token_id: int = 130000,
                 gmask_token_id: int = 130001, pad_token_id: int = 3, max_sequence_length: int = 2048,
                 inner_hidden_size: int = 16384, position_encoding_2d: bool = True, quantization_bit: int = 0,
                 pre_seq_len: int | None = None, prefix_projection: bool = False, tie_word_embeddings: bool = True,
                 **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.max_sequence_length = max_sequence_length
        self.inner_hidden_size = inner_hidden_size
        self.position_encoding_2d = position_encoding_2d
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
