"""Run under transformers 4.33 (`tests.support.upstream_env`): ChatGLM-6B's own code records what it computes.

    python upstream_chatglm6b.py REFERENCE_FOLDER OUT

REFERENCE_FOLDER holds upstream's code, config.json and ice_text.model (the reference's demo folder).
Writes into OUT:
- `model/`: a small random checkpoint in upstream's format (its config, code, tokenizer, pytorch_model.bin);
- `lora/`: a random LoRA on `query_key_value` (peft of that time, `adapter_model.bin`);
- `prefix/`: a random P-tuning v2 encoder in upstream's form (`pytorch_model.bin`, keys
  `transformer.prefix_encoder.*`; `pre_seq_len` and `prefix_projection` in `prefix_config.json`);
- `record.pt`: token ids of some texts, float32 logits of prompts (one alone, a left-padded batch) and the
  greedy continuations, for the base model, with the LoRA, with the prefix; and `chat()`'s answers.

Nothing here imports fedtune: this is upstream's side of the comparison.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

TEXTS = ["你好", "床前明月光，疑是地上霜。", "Hello  world\n\tindented   three", "emoji 😀🚀 and ü é ß",
         "[gMASK] <sop> <eop> [MASK] </s> <pad>", "  leading and trailing  ", "数字 12345 and code: def f(x): return x"]
PROMPTS = ["根据上句，写出下一句。：\n问：床前明月光\n答：", "写一首诗"]
CHAT = [("你好", []), ("再说一遍", [("你好", "你好！")])]
NEW_TOKENS = 8
PRE_SEQ_LEN = 4


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that the greedy choice is far from a tie, each a float16 value, so that
    upstream's own loading (into float16 parameters) keeps them exactly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 1.0 if name.endswith("layernorm.weight") else 0.3
            noise = torch.randn(param.shape, generator=generator) * scale
            noise = noise + 1.0 if name.endswith("layernorm.weight") else noise
            param.copy_(noise.half().float())  # float16 values: upstream's from_pretrained holds them so


def record(model: torch.nn.Module, tokenizer, prefix: str) -> dict:
    out = {}
    single = tokenizer([PROMPTS[0]], return_tensors="pt")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out[f"{prefix}.logits"] = model(**single).logits.float()
        out[f"{prefix}.batch_logits"] = model(**batch).logits.float()
        out[f"{prefix}.greedy"] = model.generate(**single, do_sample=False, max_new_tokens=NEW_TOKENS)
        out[f"{prefix}.batch_greedy"] = model.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS)
    out[f"{prefix}.chat"] = [model.chat(tokenizer, query, history=history, do_sample=False, max_length=64)[0]
                             for query, history in CHAT]
    return out


def main(reference: Path, out: Path) -> None:
    folder = out / "model"
    shutil.copytree(reference, folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.vocab_size = 130528
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_config(config, trust_remote_code=True, empty_init=False).float()
    model.tie_weights()  # as from_pretrained does (upstream's config ties lm_head to the word embeddings)
    randomise(model, 0)
    model.eval()
    model.save_pretrained(folder, safe_serialization=False)
    for code in reference.glob("*.py"):  # save_pretrained may leave the code out
        shutil.copy(code, folder / code.name)
    results = {"batch_ids": tokenizer(PROMPTS, padding=True)["input_ids"],
               "ids": [tokenizer(text)["input_ids"] for text in TEXTS],
               "plain_ids": [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS],
               "decoded": [tokenizer.decode(tokenizer(text)["input_ids"]) for text in TEXTS]}
    results.update(record(model, tokenizer, "base"))
    results.update(record_prefix(folder, model, tokenizer, out / "prefix"))
    results.update(record_lora(model, tokenizer, out / "lora"))
    torch.save(results, out / "record.pt")


def record_lora(model, tokenizer, out: Path) -> dict:
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query_key_value"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    lora.eval()
    lora.save_pretrained(out)
    return record(lora, tokenizer, "lora")


def record_prefix(folder: Path, base: torch.nn.Module, tokenizer, out: Path) -> dict:
    """The base weights with a random prefix encoder, built in float32 (from_pretrained would hold them in
    float16, upstream's fixed parameter dtype)."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True, pre_seq_len=PRE_SEQ_LEN,
                                        prefix_projection=False)
    model = AutoModel.from_config(config, trust_remote_code=True, empty_init=False).float()
    model.tie_weights()
    model.load_state_dict(base.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.transformer.prefix_encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.eval()
    out.mkdir()
    state = {f"transformer.prefix_encoder.{k}": v for k, v in model.transformer.prefix_encoder.state_dict().items()}
    torch.save(state, out / "pytorch_model.bin")
    (out / "prefix_config.json").write_text(json.dumps({"pre_seq_len": PRE_SEQ_LEN, "prefix_projection": False}))
    return record(model, tokenizer, "prefix")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
