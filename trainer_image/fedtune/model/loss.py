"""The causal-LM training loss, computed only where there are labels and never as a full logits tensor.

A plain training step projects every position (prompt, padding and answer alike) onto the whole
vocabulary, keeps those float32 logits for softmax and its gradient, and reads them several
times: at ChatGLM's 130,528 or GLM-4's 151,552 tokens that is most of the step's time and
memory. `causal_lm_loss` runs the model with its output projection (`lm_head`) replaced by the
identity for the one forward pass, so the model returns its final hidden states, keeps the
positions whose next token is a label, and computes the cross-entropy of `hidden @ W.T` there:

- on CUDA with Liger-Kernel installed (the `gpu` extra), with its fused linear cross-entropy;
- otherwise with `ChunkedLinearCrossEntropy`: a few rows at a time, the logits of a chunk stay
  in cache, and their gradient with respect to the hidden states is made in the same pass, so
  the backward pass only scales it.

The loss and the adapter gradients are those of the plain computation (transformers'
`ForCausalLMLoss`: shifted labels, -100 ignored, mean over the label tokens or sum over
`num_items_in_batch`). A model this cannot serve exactly (a trainable or wrapped `lm_head`,
logits that the model rescales) takes the plain path; each reason is logged once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_BYTES = 2 << 20  # float32 logits per chunk: a few rows of a 130k vocabulary, within a core's L2 cache
# Config keys of models whose logits are not simply lm_head(hidden): these keep the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# Where ChatGLM-2/3 checkpoints keep the output projection (their code has no get_output_embeddings).
_OUTPUT_LAYER_NAMES = ("transformer.output_layer",)
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info("%s", message)


# --- the chunked linear cross-entropy -------------------------------------------------------


def _chunk_rows(vocab: int, width: int) -> int:
    """Rows per chunk: logits that stay in cache, but at least width/8 rows, so that reading the
    (vocab x width) weight matrix once per chunk stays cheap beside the chunk's own work."""
    return max(1, CHUNK_BYTES // (4 * vocab), width // 8)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i) * scale, with d/d(hidden) made during the forward pass.

    `weight` and `bias` are constants here (a frozen `lm_head`): no gradient flows to them.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, scale: float) -> torch.Tensor:
        rows = _chunk_rows(*weight.shape)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], rows):
            chunk_targets = targets[start:start + rows]
            # In the weight's dtype, as lm_head computes under autocast (a half-precision base's hidden states may
            # arrive in float32 here, outside the autocast region).
            logits = nn.functional.linear(hidden[start:start + rows].to(weight.dtype), weight, bias).float()
            probs = torch.softmax(logits, dim=-1)
            index = torch.arange(len(chunk_targets), device=hidden.device)
            picked = probs[index, chunk_targets]
            losses = -torch.log(picked)
            tiny = picked < 1e-30  # -log(p) loses precision (or is inf) once p underflows: use lse - logit
            if bool(tiny.any()):
                exact = torch.logsumexp(logits[tiny], dim=-1) - logits[tiny, chunk_targets[tiny]]
                losses = losses.masked_scatter(tiny, exact)
            total += losses.sum()
            probs[index, chunk_targets] -= 1.0  # d CE / d logits = softmax - one_hot
            grad[start:start + rows] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.scale = scale
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * (grad_output * ctx.scale).to(grad.dtype), None, None, None, None


def _liger_loss() -> Any | None:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as err:  # not installed, or no Triton for this device: both mean the chunked path
        _say_once(f"Liger-Kernel's fused linear cross-entropy is unavailable ({type(err).__name__}: {err}); "
                  "using the chunked cross-entropy")
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    """sum over rows of CE(hidden @ weight.T + bias, targets) / denominator, without all the logits at once."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # a batch without answer tokens: zero, still attached to the graph
    if hidden.is_cuda:
        liger = _liger_loss()
        if liger is not None:
            return liger(weight, hidden, targets, bias) / denominator
    scale = 1.0 / float(denominator)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, scale)


# --- the model side ---------------------------------------------------------------------------


def _output_projection(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, attribute, lm_head) when lm_head is a frozen plain Linear that produces the logits as they are."""
    if getattr(getattr(model, "active_peft_config", None), "orth_reg_weight", 0):
        _say_once("the adapter adds a term to the model's loss (AdaLoRA's orth_reg_weight): using the plain "
                  "cross-entropy")
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    for name in _OUTPUT_LAYER_NAMES:
        if head is None:
            with contextlib.suppress(AttributeError):
                head = base.get_submodule(name)
    if type(head) is not nn.Linear:
        _say_once(f"output layer {type(head).__name__} is not a plain Linear: using the plain cross-entropy")
        return None
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        _say_once("the output layer trains: using the plain cross-entropy")
        return None
    config = getattr(base, "config", None)
    transformed = [key for key in _LOGIT_TRANSFORMS if getattr(config, key, None) not in (None, 0, 1, 1.0)]
    if transformed:
        _say_once(f"the model rescales its logits ({transformed[0]}): using the plain cross-entropy")
        return None
    for name, module in base.named_modules():
        if module is head:
            parent_name, _, attribute = name.rpartition(".")
            return base.get_submodule(parent_name), attribute, head
    return None


@contextlib.contextmanager
def _hidden_states_out(parent: nn.Module, attribute: str) -> Iterator[None]:
    """The model's forward returns its final hidden states where the logits would be."""
    head = getattr(parent, attribute)
    setattr(parent, attribute, nn.Identity())
    try:
        yield
    finally:
        setattr(parent, attribute, head)


def supports_fused_loss(model: nn.Module) -> bool:
    return _output_projection(model) is not None


def causal_lm_loss(model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None, *,
                   unwrapped: nn.Module | None = None) -> torch.Tensor:
    """The plain causal-LM loss of `model` on `inputs` (with `labels`), from the label positions only.

    Mean over the batch's label tokens, or their sum over `num_items_in_batch` when given (what
    transformers does under gradient accumulation). `unwrapped` is the model inside a
    data-parallel wrapper `model`. Call only when `supports_fused_loss(unwrapped or model)`.
    """
    projection = _output_projection(unwrapped or model)
    if projection is None:
        raise ValueError("causal_lm_loss: this model's logits need the plain cross-entropy")
    parent, attribute, head = projection
    labels = inputs["labels"]
    with _hidden_states_out(parent, attribute):
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    hidden = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if hidden.shape[-1] != head.in_features:
        raise ValueError(f"causal_lm_loss: the model's output has width {hidden.shape[-1]}, "
                         f"not its lm_head's input width {head.in_features}")
    # Prompt-learning adapters put virtual tokens before the sequence: the labels align with the end.
    hidden = hidden[:, hidden.shape[1] - labels.shape[1]:]
    next_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts t+1
    keep = next_labels != IGNORE_INDEX
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(hidden.device)
    return linear_cross_entropy(hidden[keep], head.weight, head.bias, next_labels[keep].to(hidden.device),
                                denominator)
