"""Configuration of a tiny model written the way ChatGLM's checkpoints ship their code (trust_remote_code).

`pre_seq_len` / `prefix_projection` switch on the model's own P-tuning v2 prefix encoder, as
ChatGLM-6B's, ChatGLM2-6B's and ChatGLM3-6B's configurations do.
"""

from transformers import PretrainedConfig


class TinyChatGLMConfig(PretrainedConfig):
    model_type = "tinychatglm"

    def __init__(self, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
                 num_attention_heads: int = 4, max_positions: int = 512, pre_seq_len: int | None = None,
                 prefix_projection: bool = False, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.max_positions = max_positions
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        super().__init__(**kwargs)
