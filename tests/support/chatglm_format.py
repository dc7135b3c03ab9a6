"""A small random checkpoint in ChatGLM2/ChatGLM3/GLM-4's own format, and a forward pass written from that format.

`ReferenceChatGLM` is written from the format's definition (the checkpoints' modelling code), not
from fedtune or transformers' GLM: its parameters carry the checkpoint's names, its forward is
ChatGLM's. RMSNorm; `query_key_value` split into heads·head_dim query rows and groups·head_dim key
and value rows; rotary embedding on the first half of each head's dimensions, rotating interleaved
pairs (x[2i], x[2i+1]) by position·base^(-4i/head_dim), base 10000·rope_ratio; key/value groups
repeated over the heads; causal softmax attention scaled by 1/sqrt(head_dim); SwiGLU MLP
(silu of the first half times the second half). P-tuning v2 (`pre_seq_len`):
`transformer.prefix_encoder.embedding` holds, per prefix token, every layer's key and value
(layer·2 + k/v, group, head_dim), which precede the tokens' own keys and values unrotated; the
tokens' positions still count from 0.

`write_checkpoint` saves one as such a folder: config.json with `model_type: chatglm`, sharded
weights under ChatGLM's names, and a `tokenizer.model` trained on the given texts: sentencepiece BPE
for ChatGLM2/3, tiktoken's byte-level BPE ranks for GLM-4, whose encoding `tiktoken_encode` writes
from tiktoken's definition.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.model.tiny import corpus_texts

SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>")
# GLM-4's split pattern, as its tokenization_chatglm.py gives it to tiktoken.
GLM4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def chatglm_config(vocab: int, *, glm4: bool = False, **overrides: Any) -> dict[str, Any]:
    """A small config with the keys ChatGLM2/3 (or, with `glm4`, GLM-4) checkpoints carry."""
    config = {
        "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True, "ffn_hidden_size": 96, "fp32_residual_connection": False, "hidden_dropout": 0.0,
        "hidden_size": 64, "kv_channels": 16, "layernorm_epsilon": 1e-5, "multi_query_attention": True,
        "multi_query_group_num": 2, "num_attention_heads": 4, "num_layers": 2, "original_rope": True,
        "padded_vocab_size": vocab, "post_layer_norm": True, "rmsnorm": True, "seq_length": 256,
        "use_cache": True, "torch_dtype": "float32", "tie_word_embeddings": False, "eos_token_id": 2,
        "pad_token_id": 0, "pre_seq_len": None, "prefix_projection": False, "quantization_bit": 0,
    }
    if glm4:
        config.update(layernorm_epsilon=1.5625e-07, rope_ratio=500, _name_or_path="THUDM/glm-4-9b-chat")
    config.update(overrides)
    return config


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class SelfAttention(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = c["num_attention_heads"], c["multi_query_group_num"], c["kv_channels"]
        width = (self.heads + 2 * self.groups) * self.head_dim
        self.query_key_value = nn.Linear(c["hidden_size"], width, bias=c["add_qkv_bias"])
        self.dense = nn.Linear(self.heads * self.head_dim, c["hidden_size"], bias=False)
        # rope_ratio: ChatGLM2-6B-32k divides the positions by it, ChatGLM3 and GLM-4 multiply the base.
        ratio = c.get("rope_ratio", 1)
        self.position_scale = ratio if c.get("rope_scales_positions") else 1
        self.base = 10000.0 * (1 if c.get("rope_scales_positions") else ratio)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [batch, length, heads, head_dim]; pairs (2i, 2i+1) of the first half turn by position * theta_i."""
        half = self.head_dim // 2
        theta = self.base ** (-torch.arange(0, half, 2, dtype=torch.float32) / half)
        angle = positions[:, None].float() * theta[None, :]  # [length, half / 2]
        cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
        pairs, rest = x[..., :half].unflatten(-1, (half // 2, 2)), x[..., half:]
        even, odd = pairs[..., 0], pairs[..., 1]
        turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
        return torch.cat([turned, rest], dim=-1)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.query_key_value(x).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim], dim=-1)
        q = q.view(batch, length, self.heads, self.head_dim)
        k = k.view(batch, length, self.groups, self.head_dim)
        v = v.view(batch, length, self.groups, self.head_dim)
        positions = torch.arange(length) / self.position_scale
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        before = 0
        if prefix is not None:  # [batch, pre_seq_len, groups, head_dim], never rotated
            k, v = torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)
            before = prefix[0].shape[1]
        repeat = self.heads // self.groups
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        allowed = torch.ones(length, before + length, dtype=torch.bool).tril(diagonal=before)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, -1)
        return self.dense(out)


class MLP(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c["hidden_size"], 2 * c["ffn_hidden_size"], bias=False)
        self.dense_4h_to_h = nn.Linear(c["ffn_hidden_size"], c["hidden_size"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["layernorm_epsilon"])
        self.self_attention = SelfAttention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["layernorm_epsilon"])
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c["padded_vocab_size"], c["hidden_size"])


class Encoder(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(c) for _ in range(c["num_layers"]))
        self.final_layernorm = RMSNorm(c["hidden_size"], c["layernorm_epsilon"])


class PrefixEncoder(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        width = c["num_layers"] * 2 * c["multi_query_group_num"] * c["kv_channels"]
        self.embedding = nn.Embedding(c["pre_seq_len"], width)


class Transformer(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.embedding = Embedding(c)
        self.encoder = Encoder(c)
        self.output_layer = nn.Linear(c["hidden_size"], c["padded_vocab_size"], bias=False)
        if c.get("pre_seq_len"):
            self.prefix_encoder = PrefixEncoder(c)


class ReferenceChatGLM(nn.Module):
    """ChatGLM2/3 / GLM-4 with the checkpoint's parameter names (`transformer.` ...)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from transformers import PretrainedConfig

        super().__init__()
        self.c = config
        self.config = PretrainedConfig(**config)  # what peft reads of a model
        self.transformer = Transformer(config)

    def prefixes(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if not self.c.get("pre_seq_len"):
            return None
        c = self.c
        encoded = self.transformer.prefix_encoder.embedding.weight.view(
            c["pre_seq_len"], c["num_layers"] * 2, c["multi_query_group_num"], c["kv_channels"])
        encoded = encoded.unsqueeze(0).expand(batch, -1, -1, -1, -1)
        return [(encoded[:, :, 2 * i], encoded[:, :, 2 * i + 1]) for i in range(c["num_layers"])]

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        x = self.transformer.embedding.word_embeddings(input_ids)
        prefixes = self.prefixes(input_ids.shape[0])
        for i, layer in enumerate(self.transformer.encoder.layers):
            x = layer(x, prefixes[i] if prefixes else None)
        return CausalLMOutput(logits=self.transformer.output_layer(self.transformer.encoder.final_layernorm(x)))

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # peft asks for it
        return kwargs


def random_reference(config: dict[str, Any], seed: int = 0) -> ReferenceChatGLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ReferenceChatGLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "layernorm" in name:
                    param.uniform_(0.5, 1.5)  # not all ones: a misplaced norm weight must show
                else:
                    param.normal_(0, 0.2)
    return model.eval()


def train_sentencepiece(out: Path, data: list[Path], vocab_size: int = 1600) -> Path:
    """ChatGLM2/3's kind of tokenizer.model: BPE with byte fallback, trained on the texts of the data."""
    import sentencepiece as spm

    text = out.parent / "sentencepiece-corpus.txt"
    text.write_text("\n".join(corpus_texts(data)) + "\nHello, world! Federated fine-tuning.\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out.with_suffix("")), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    text.unlink()
    return out


def train_byte_bpe(texts: list[str], merges: int = 400) -> dict[bytes, int]:
    """tiktoken-style ranks: the 256 bytes, then the most frequent adjacent pair within split chunks, repeatedly."""
    from collections import Counter

    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(chunk.encode() for text in texts for chunk in regex.findall(GLM4_SPLIT, text))
    parts = {word: [bytes([b]) for b in word] for word in words}
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, pieces in parts.items():
            for a, b in itertools.pairwise(pieces):
                pairs[a, b] += words[word]
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for pieces in parts.values():
            i = 0
            while i < len(pieces) - 1:
                if pieces[i] == a and pieces[i + 1] == b:
                    pieces[i:i + 2] = [a + b]
                i += 1
    return ranks


def tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's encoding: split by the pattern; in each chunk merge the adjacent pair of lowest rank until none."""
    import regex

    ids: list[int] = []
    for chunk in regex.findall(GLM4_SPLIT, text):
        pieces = [bytes([b]) for b in chunk.encode()]
        while True:
            candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(itertools.pairwise(pieces)) if a + b in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
        ids += [ranks[piece] for piece in pieces]
    return ids


def read_ranks(path: Path) -> dict[bytes, int]:
    import base64

    return {base64.b64decode(token): int(rank) for token, rank in
            (line.split() for line in path.read_text(encoding="ascii").splitlines() if line)}


def write_glm4_tokenizer(folder: Path, data: list[Path]) -> int:
    """GLM-4's tokenizer files: tokenizer.model (base64 token, rank) and its specials in tokenizer_config.json."""
    import base64

    ranks = train_byte_bpe([*corpus_texts(data), "Hello, world! Federated fine-tuning."])
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="ascii")
    added = {str(len(ranks) + i): {"content": token, "special": True} for i, token in enumerate(GLM4_SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLM4Tokenizer", "added_tokens_decoder": added, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}}),
        encoding="utf-8")
    return len(ranks) + len(GLM4_SPECIALS)


def write_sentencepiece_tokenizer(folder: Path, data: list[Path]) -> int:
    """ChatGLM2/3's tokenizer files: a sentencepiece tokenizer.model; its five specials follow the pieces."""
    import sentencepiece as spm

    sp_model = train_sentencepiece(folder / "tokenizer.model", data)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLMTokenizer", "remove_space": False, "do_lower_case": False,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}), encoding="utf-8")
    return spm.SentencePieceProcessor(model_file=str(sp_model)).vocab_size() + len(SPECIALS)


# What each format's own modeling_chatglm.py does with rope_ratio (the line that says it, in its rotary embedding).
ROPE_CODE = {
    "base": "        base = base * self.rope_ratio\n",  # ChatGLM3, GLM-4; ChatGLM2-6B-32k below
    "positions": "        seq_idx = torch.arange(seq_len, dtype=torch.float, device=device) / self.rope_ratio\n",
}


def write_checkpoint(folder: Path, data: list[Path], *, glm4: bool = False, shards: int = 2,
                     weights_format: str = "safetensors", seed: int = 0, rope: str = "base", **overrides: Any) -> Path:
    """A ChatGLM-format folder: config.json, `shards` weight files under an index, the tokenizer's files, and
    with a rope_ratio the line of its modelling code that says how it applies (`rope`: a key of ROPE_CODE)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tokens = write_glm4_tokenizer(folder, data) if glm4 else write_sentencepiece_tokenizer(folder, data)
    vocab = math.ceil(tokens / 64) * 64  # ChatGLM pads its vocabulary
    config = chatglm_config(vocab, glm4=glm4, **overrides)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if "rope_ratio" in config:
        (folder / "modeling_chatglm.py").write_text("class RotaryEmbedding:\n    def forward_impl(self, seq_len, "
                                                    "n_elem, dtype, device, base=10000):\n" + ROPE_CODE[rope],
                                                    encoding="utf-8")
    state = random_reference(config, seed).state_dict()
    state["transformer.rotary_pos_emb.inv_freq"] = torch.ones(config["kv_channels"] // 4)  # as the real ones carry
    names = list(state)
    weight_map: dict[str, str] = {}
    suffix = "safetensors" if weights_format == "safetensors" else "bin"
    stem = "model" if suffix == "safetensors" else "pytorch_model"
    for shard in range(shards):
        file = f"{stem}-{shard + 1:05d}-of-{shards:05d}.{suffix}"
        part = {n: state[n].contiguous() for n in names[shard::shards]}
        save_file(part, str(folder / file)) if suffix == "safetensors" else torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = f"{stem}.{suffix}.index.json" if suffix == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    return folder


def load_reference(folder: Path, **config_overrides: Any) -> ReferenceChatGLM:
    """The reference model with a folder's weights, every tensor name checked (strict)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8")) | config_overrides
    model = ReferenceChatGLM(config)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model-*.bin")):
        state.update(load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, weights_only=True))
    state.pop("transformer.rotary_pos_emb.inv_freq", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(m.startswith("transformer.prefix_encoder.") for m in missing), (missing, unexpected)
    return model.eval()
