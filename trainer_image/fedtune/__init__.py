"""fedtune: federated fine-tuning of ChatGLM-family models."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"

# ChatGLM-6B is a model type of fedtune's own: transformers' Auto classes learn it (fedtune.model.chatglm6b.register)
# right after transformers imports the Auto module concerned, so that importing fedtune imports neither
# transformers nor torch.
_REGISTRAR = "fedtune.model.chatglm6b.register"
_REGISTRATIONS = {
    "transformers.models.auto.configuration_auto": "register_config",
    "transformers.models.auto.modeling_auto": "register_models",
    "transformers.models.auto.tokenization_auto": "register_tokenizer",
}


def _register(module: str) -> None:
    getattr(importlib.import_module(_REGISTRAR), _REGISTRATIONS[module])()


class _AfterAutoImport(importlib.abc.MetaPathFinder):
    """Finds the Auto modules as the other finders do, and registers once one has been executed."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _REGISTRATIONS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            execute(module)
            _register(fullname)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if not any(isinstance(finder, _AfterAutoImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterAutoImport())
for _module in _REGISTRATIONS:
    if _module in sys.modules:  # transformers came first
        _register(_module)
