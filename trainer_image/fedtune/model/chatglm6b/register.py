"""ChatGLM-6B in transformers' Auto classes (model type `chatglm6b`), each registered once transformers' own
Auto module for it has been imported: `fedtune/__init__.py` arranges that, so `import fedtune` costs no torch."""

from __future__ import annotations

import importlib
import sys

MODELING = "fedtune.model.chatglm6b.modeling"


def register_config() -> None:
    from transformers import AutoConfig

    from fedtune.model.chatglm6b.configuration import MODEL_TYPE, ChatGLM6BConfig

    AutoConfig.register(MODEL_TYPE, ChatGLM6BConfig, exist_ok=True)


def register_models() -> None:
    module = sys.modules.get(MODELING)
    if module is not None and getattr(module.__spec__, "_initializing", False):
        return  # its own imports brought transformers' modeling_auto in: it registers itself once defined
    importlib.import_module(MODELING).register()


def register_tokenizer() -> None:
    from transformers import AutoTokenizer

    from fedtune.model.chatglm6b.configuration import ChatGLM6BConfig
    from fedtune.model.chatglm6b.tokenization import ChatGLM6BTokenizer

    AutoTokenizer.register(ChatGLM6BConfig, slow_tokenizer_class=ChatGLM6BTokenizer, exist_ok=True)
