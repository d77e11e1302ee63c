"""Tiny backbones built from config, for tests, benchmarks and offline demos.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in well under
a second on built-in text, and the models are randomly initialised from small configs.
"""

from __future__ import annotations

import torch

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A query asks for the most relevant candidate.
Retrieval ranks passages, images and captions. The candidate describes a red apple on a table.
A photo of a cat sleeping on a sofa. The rocket launches into the blue sky. Coffee in a white cup.
Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20. Think step by step, then answer.
Inspect the candidate in full when the compressed view is not enough to decide.
Query: which passage explains photosynthesis? Candidates: plants use light to make sugar.
"""


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with the Qwen special tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


HF_INIT_STD = 0.02  # transformers' default initializer_range


def scaled_init_std(hidden_size: int) -> float:
    """``1/sqrt(width)``: the initialisation to train a tiny model from scratch with.

    transformers' default of 0.02 suits widths near 2,500; at width 64 it starts attention so
    flat and its gradients so small that a from-scratch model does not learn to match a query
    to a candidate (K=2 stayed at chance for 10,000 steps; ``1/sqrt(64)`` learns it in under
    500: docs/benchmarks.md, section 4b). Tests keep the default, which their fixed random
    weights were written against."""
    return hidden_size**-0.5


def _init_std(init_std: float | str | None, width: int) -> float:
    if init_std is None:
        return HF_INIT_STD
    if init_std == "scaled":
        return scaled_init_std(width)
    try:
        return float(init_std)
    except ValueError:
        raise ValueError(f"init_std must be a number or 'scaled', got {init_std!r}") from None


def build_tiny_text_backbone(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, init_std: float | str | None = None):
    """A Qwen2-shaped causal LM of ~100k parameters with its tokenizer, as a Backbone.

    ``init_std``: weight init std, ``"scaled"`` (:func:`scaled_init_std`, for training from
    scratch) or ``None`` (transformers' 0.02)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .backbone import Backbone

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer) + 128,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=_init_std(init_std, hidden_size),
    )
    model = Qwen2ForCausalLM(config).eval()
    return Backbone(model, tokenizer)


def tiny_qwen_vl_config(model_type: str, tokenizer, hidden_size: int = 128, num_layers: int = 2, init_std: float | str | None = None):
    """A small config of a Qwen-VL architecture (``num_layers`` LM layers, vision depth 2).

    ``init_std`` as in :func:`build_tiny_text_backbone`; ``"scaled"`` uses each tower's own width."""
    from transformers import AutoConfig

    from .graft import mrope_section, vision_token_ids

    heads = 4
    head_dim = hidden_size // heads
    mrope = mrope_section(head_dim)
    text = dict(
        vocab_size=len(tokenizer) + 128,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=_init_std(init_std, hidden_size),
    )
    vision = dict(depth=2, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=_init_std(init_std, 64))
    if model_type == "qwen2_5_vl":
        vision.update(intermediate_size=128, out_hidden_size=hidden_size, window_size=56, fullatt_block_indexes=[1])
    elif model_type == "qwen2_vl":
        vision.update(embed_dim=64, mlp_ratio=2, hidden_size=hidden_size)
    elif model_type == "qwen3_vl":
        vision.update(intermediate_size=128, out_hidden_size=hidden_size, patch_size=16, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        text.update(head_dim=head_dim)
    else:
        raise ValueError(f"not a Qwen-VL model type: {model_type}")
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        **vision_token_ids(tokenizer),
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=text["initializer_range"],
    )


def build_tiny_vl_backbone(model_type: str = "qwen2_5_vl", seed: int = 0, hidden_size: int = 128, num_layers: int = 2, init_std: float | str | None = None):
    """A tiny Qwen-VL model (random weights) with tokenizer and PIL image processor."""
    from transformers import AutoModelForImageTextToText

    from .backbone import Backbone

    tokenizer = build_tokenizer()
    config = tiny_qwen_vl_config(model_type, tokenizer, hidden_size, num_layers, init_std)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    return Backbone(model, tokenizer)


class scripted_generation:
    """Context manager: the model's written tokens are replaced by ``tokens`` (as strings
    or ids), so tests can force any output, including faulty ones, through the real
    decoding, splicing and scoring path.

    >>> with scripted_generation(model, ["<inspection-index-start>", "<cand_2>", "<inspection-index-end>"]):
    ...     result = model.rank(query, candidates)
    """

    def __init__(self, model, tokens: list[str | int]) -> None:
        self.model = model
        tok = model.tokenizer
        added = tok.get_added_vocab()
        self.ids: list[int] = []
        for t in tokens:
            if isinstance(t, int):
                self.ids.append(t)
            elif t in added:
                self.ids.append(added[t])
            else:  # plain text: its ordinary tokens
                self.ids.extend(tok(t, add_special_tokens=False)["input_ids"])

    def __enter__(self):
        decoder = self.model.decoder
        self._original = decoder.decode
        ids = self.ids

        def decode(*args, **kwargs):
            kwargs["script"] = ids
            return self._original(*args, **kwargs)

        decoder.decode = decode
        return self

    def __exit__(self, *exc) -> None:
        self.model.decoder.decode = self._original
