"""The reference's inference snippet, run under transformers 4.33 (`tests.support.upstream_env`) on the CPU.

    python upstream_snippet.py MODE MODEL CHECKPOINT PROMPT MAX_NEW_TOKENS

MODE is `lora` or `ptuning`, as in the reference's document; its code is followed line by line, except
that it stays in float32 on the CPU and decodes greedily. Prints `model.chat(...)`'s response as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModel, AutoTokenizer


def main(mode: str, mpath: str, checkpoint: str, prompt: str, max_new_tokens: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(mpath, trust_remote_code=True)
    if mode == "ptuning":
        settings = json.loads(Path(checkpoint, "prefix_config.json").read_text())
        config = AutoConfig.from_pretrained(mpath, trust_remote_code=True, pre_seq_len=settings["pre_seq_len"])
        model = AutoModel.from_pretrained(mpath, config=config, trust_remote_code=True)
        pd = torch.load(os.path.join(checkpoint, "pytorch_model.bin"))
        new_dict = {}
        for k, v in pd.items():
            if k.startswith("transformer.prefix_encoder."):
                new_dict[k[len("transformer.prefix_encoder."):]] = v
        model = model.float()
        model.transformer.prefix_encoder.load_state_dict(new_dict)
        model = model.eval()
    else:
        model = AutoModel.from_pretrained(mpath, trust_remote_code=True)
        model = PeftModel.from_pretrained(model, checkpoint)
        model = model.float().eval()
    response, _history = model.chat(tokenizer, prompt, history=[], do_sample=False, max_new_tokens=max_new_tokens)
    print(json.dumps(response, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
