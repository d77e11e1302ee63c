"""Shared fixtures: tiny models built from config (offline, random weights)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The SmolLM2 GGUF is converted once per test session into a temporary float cache (not the
# user's cache dir), shared by the tests and the example scripts they run.
if "RETRV_R1_GGUF_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["RETRV_R1_GGUF_CACHE"] = _GGUF_CACHE = tempfile.mkdtemp(prefix="retrv-r1-gguf-")
    atexit.register(shutil.rmtree, _GGUF_CACHE, ignore_errors=True)

import pytest
import torch
from PIL import Image

from retrv_r1_plugin.model import RetrvR1Model
from retrv_r1_plugin.testing import build_tiny_text_backbone, build_tiny_vl_backbone

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_text_model(seed: int = 0, **overrides) -> RetrvR1Model:
    overrides.setdefault("max_candidates", 16)
    torch.manual_seed(seed)
    return RetrvR1Model.from_backbone(build_tiny_text_backbone(seed=seed), **overrides).eval()


def make_vl_model(model_type: str = "qwen2_5_vl", seed: int = 0, **overrides) -> RetrvR1Model:
    overrides.setdefault("max_candidates", 16)
    torch.manual_seed(seed)
    return RetrvR1Model.from_backbone(build_tiny_vl_backbone(model_type, seed=seed), **overrides).eval()


def boost_label(model: RetrvR1Model, index: int, margin: float = 30.0) -> RetrvR1Model:
    """Make the model prefer label ``index`` at every position, whatever its random weights:
    the LM head adds ``margin`` to that label's logit (a real forward, a fixed preference)."""
    label = model.special.labels[index]

    def add_margin(module, inputs, logits):
        logits = logits.clone()
        logits[..., label] += margin
        return logits

    model.backbone.lm_head.register_forward_hook(add_margin)
    return model


@pytest.fixture(scope="session")
def text_model() -> RetrvR1Model:
    return make_text_model()


@pytest.fixture(scope="session")
def vl_model() -> RetrvR1Model:
    return make_vl_model()


def solid(color: tuple[int, int, int], size: tuple[int, int] = (56, 56)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.fixture
def images(tmp_path):
    """Real PNG files on disk plus their PIL images."""
    paths = {}
    for name, color, size in [("red", (220, 20, 20), (56, 56)), ("green", (20, 200, 20), (84, 56)), ("blue", (20, 20, 220), (56, 112))]:
        p = tmp_path / f"{name}.png"
        solid(color, size).save(p)
        paths[name] = p
    return paths


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory):
    """A randomly initialised, tiny CLIP saved as a plain transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-clip")
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(
        ["a red square", "a blue circle", "green leaves"] * 5,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"]),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=32,
    )
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
