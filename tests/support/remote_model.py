"""A model folder shaped like a ChatGLM checkpoint: weights, tokenizer and its own modelling code.

fedtune loads such folders with `trust_remote_code`. The code is tests/support/remote_chatglm
(a tiny stand-in for ChatGLM's, which cannot be downloaded here); the tokenizer is the tiny
model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CODE = Path(__file__).resolve().parent / "remote_chatglm"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_remote_chatglm(out: Path, tokenizer_dir: Path, *, seed: int = 0, hidden_size: int = 32,
                         num_layers: int = 2, heads: int = 4) -> Path:
    from transformers import AutoTokenizer

    from support.remote_chatglm.configuration_tinychatglm import TinyChatGLMConfig
    from support.remote_chatglm.modeling_tinychatglm import TinyChatGLMForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = TinyChatGLMConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                               num_attention_heads=heads, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyChatGLMForConditionalGeneration(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    for code in CODE.glob("*.py"):
        shutil.copy(code, out / code.name)
    saved = json.loads((out / "config.json").read_text())
    saved["auto_map"] = {
        "AutoConfig": "configuration_tinychatglm.TinyChatGLMConfig",
        "AutoModel": "modeling_tinychatglm.TinyChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_tinychatglm.TinyChatGLMForConditionalGeneration",
    }
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    return out
