"""Which weights train: LoRA injection (peft), the ICM, added-token rows, full fine-tuning.

The vision tower is frozen (as in Retrv-R1, arXiv 2510.02745) unless ``train_vision`` (a tower trained from
scratch or grafted), and then it trains in full. LoRA adapters are injected with
``peft.inject_adapter_in_model`` into the language model only, so
``RetrvR1Model.save_pretrained`` stores them in ``adapter/`` and ``from_pretrained`` loads
them back; a model that already carries adapters (e.g. the SFT output fed to RL) keeps
training them instead of stacking new ones.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from retrv_r1_plugin.model import added_token_ids, lm_has_lora

from .config import LoraSettings

logger = logging.getLogger(__name__)

__all__ = ["has_lora", "inject_lora", "configure_trainable", "trainable_parameters", "trainable_state", "load_trainable_state", "param_groups"]


def has_lora(model) -> bool:
    return lm_has_lora(model.lm)


def _vision_prefixes(model) -> list[str]:
    return [name for name, _ in model.lm.named_modules() if name.endswith("visual") or name == "visual"]


def inject_lora(model, settings: LoraSettings) -> None:
    """Add LoRA adapters to the language model's linear layers named in ``settings``."""
    import peft

    if has_lora(model):
        existing = model.lm.peft_config["default"]
        if (existing.r, existing.lora_alpha) != (settings.r, settings.alpha):
            logger.warning("the model already carries LoRA adapters (r=%s, alpha=%s) and keeps training them; "
                           "the config's lora settings (r=%s, alpha=%s) are not applied", existing.r, existing.lora_alpha,
                           settings.r, settings.alpha)
        return
    names = "|".join(re.escape(m) for m in settings.target_modules)
    # full-match regex over module names: language model only, never the vision tower
    pattern = rf"^(?!.*visual).*\.({names})$"
    cfg = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=pattern)
    peft.inject_adapter_in_model(cfg, model.lm)


def configure_trainable(model, *, lm: str, train_icm: bool, train_token_rows: bool, lora: LoraSettings | None = None,
                        train_vision: bool = False) -> None:
    """Set ``requires_grad`` for a stage. ``lm``: ``lora``, ``full`` or ``frozen``.

    With ``train_token_rows`` (and a LoRA or frozen LM) the input/output embedding matrices
    get gradients only in the rows of the added tokens (:func:`prepare_gradients` zeroes the
    rest before each optimizer step);
    put them in a param group without weight decay (:func:`param_groups` does) so the
    other rows stay bit-identical.
    """
    for p in model.lm.parameters():
        p.requires_grad_(False)
    if lm == "lora":
        inject_lora(model, lora or LoraSettings())
        for name, p in model.lm.named_parameters():
            p.requires_grad_(".lora_" in name)
    elif lm == "full":
        for p in model.lm.parameters():
            p.requires_grad_(True)
        model.backbone_modified = True  # save_pretrained must write the backbone
    elif lm != "frozen":
        raise ValueError(f"lm must be lora, full or frozen, got {lm!r}")
    for prefix in _vision_prefixes(model):  # frozen unless asked (a model trained from scratch must learn to see)
        for p in model.lm.get_submodule(prefix).parameters():
            p.requires_grad_(train_vision)
    if train_vision and model.config.vision_graft is None:
        model.backbone_modified = True  # a grafted tower is saved on its own; any other needs the backbone
    for p in model.icm.parameters():
        p.requires_grad_(train_icm)
    if train_icm:
        model.icm_available = True  # trained from here on, saved with the checkpoints
    if train_token_rows and lm != "full":
        rows = torch.tensor(added_token_ids(model.tokenizer), dtype=torch.long)
        mats = {id(m.weight): m.weight for m in (model.lm.get_input_embeddings(), model.lm.get_output_embeddings()) if m is not None}
        for weight in mats.values():
            mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            mask[rows.to(weight.device)] = 1
            weight.requires_grad_(True)
            weight._retrv_row_mask = mask  # applied by prepare_gradients before every optimizer step


def prepare_gradients(params) -> None:
    """Before clipping and the optimizer step: zero the gradient outside the trainable rows
    of a row-masked embedding matrix (once per step, not in a per-backward hook)."""
    for p in params:
        mask = getattr(p, "_retrv_row_mask", None)
        if mask is not None and p.grad is not None:
            p.grad.mul_(mask.to(p.grad.dtype))


def trainable_parameters(model) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: embedding matrices (row-masked) and norms/biases without decay."""
    decay, no_decay = [], []
    for name, p in trainable_parameters(model):
        if p.ndim < 2 or getattr(p, "_retrv_row_mask", None) is not None or "norm" in name or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return groups


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Exact copies of the trainable parameters (for bit-identical resume)."""
    return {n: p.detach().cpu().clone().contiguous() for n, p in trainable_parameters(model)}


def load_trainable_state(model, state: dict[str, torch.Tensor], names: Iterable[str] | None = None) -> None:
    """Copy saved trainable parameters into the model in place (same storage, same alignment)."""
    params = dict(model.named_parameters())
    expected = set(names) if names is not None else {n for n, _ in trainable_parameters(model)}
    missing = expected - set(state)
    unknown = set(state) - set(params)
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model: missing={sorted(missing)[:5]} unknown={sorted(unknown)[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
