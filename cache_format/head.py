"""The teacher's MLM head (hidden state -> vocabulary logits), saved into the cache.

Stage two rebuilds exact full-vocabulary teacher logits from cached hidden states through
this head, without loading or running the teacher. The head module is located by
architecture; loading rebuilds the model skeleton on the meta device (no weights, no memory)
and fills only the head.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_FILE = "mlm_head.safetensors"
LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)
"""What `from_pretrained` raises for a missing, unreadable or damaged model directory."""
_HEAD_ATTRS = ("cls", "lm_head", "predictions")
"""BERT-like models keep the head in `cls`, RoBERTa-likes (XLM-R, CamemBERT, MPNet, ...) in
`lm_head`, ALBERT in `predictions`."""


class DistilBertHead(nn.Module):
    """DistilBERT's head is four attributes of the model rather than one module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vocab_transform = model.vocab_transform
        self.activation = model.activation
        self.vocab_layer_norm = model.vocab_layer_norm
        self.vocab_projector = model.vocab_projector

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.vocab_layer_norm(self.activation(self.vocab_transform(hidden)))
        return self.vocab_projector(x)


def find_head(model: nn.Module) -> nn.Module | None:
    """The submodule mapping last hidden states to logits, or None for unknown architectures."""
    if getattr(model.config, "model_type", None) == "distilbert":
        return DistilBertHead(model)
    for attr in _HEAD_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            return head
    return None


def head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """Head weights as float32 copies (tied tensors duplicated: safetensors refuses shared memory)."""
    return {k: v.detach().float().cpu().clone().contiguous() for k, v in head.state_dict().items()}


def save_head(model: nn.Module, directory: Path) -> bool:
    """Write the model config and head weights to `directory`; False if the head is unknown."""
    head = find_head(model)
    if head is None:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_file(head_state(head), str(directory / HEAD_FILE))
    return True


def load_head(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the saved head as a float32 module in eval mode."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        skeleton = AutoModelForMaskedLM.from_config(config)
    head = find_head(skeleton)
    if head is None:
        raise ValueError(f"no known MLM head for model type {config.model_type!r}")
    head.to_empty(device=device)
    head.load_state_dict(load_file(str(directory / HEAD_FILE), device=str(device)))
    return head.float().eval()
