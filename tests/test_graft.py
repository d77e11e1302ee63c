"""A Qwen2.5-VL vision tower grafted onto a pretrained text LM (retrv_r1_plugin/graft.py):
text behaviour unchanged, image tokens at the text scale, training and save/load round trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from retrv_r1_plugin.backbone import Backbone, ModelLoadError, load_backbone  # noqa: E402
from retrv_r1_plugin.graft import VISION_WEIGHTS, graft_vision_tower  # noqa: E402
from retrv_r1_plugin.model import RetrvR1Model  # noqa: E402
from retrv_r1_plugin.testing import build_tiny_text_backbone, build_tiny_vl_backbone, build_tokenizer  # noqa: E402
from retrv_r1_plugin.types import Candidate, Query  # noqa: E402
from training.config import LoraSettings, SFTConfig  # noqa: E402
from training.cot import ProgrammaticTeacher, synthesize_cot  # noqa: E402
from training.examples import CandidateRecord, TrainingExample  # noqa: E402
from training.sft import SFTTrainer  # noqa: E402

SMALL_TOWER = {"hidden_size": 32, "depth": 1, "num_heads": 2, "intermediate_size": 64}


def tiny_llama(seed: int = 0) -> Backbone:
    """A Llama-architecture text LM (no attention biases), like SmolLM2 at toy size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok) + 16, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=50000.0,
                      initializer_range=0.125, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Backbone(LlamaForCausalLM(cfg).eval(), tok)


def _ids(backbone: Backbone) -> torch.Tensor:
    return torch.tensor([backbone.tokenizer("The rocket launches into the blue sky. A photo of a cat.")["input_ids"]])


@pytest.mark.parametrize("donor_kind", ["llama", "qwen2"])
def test_grafted_model_reads_text_exactly_as_its_donor(donor_kind):
    donor = tiny_llama() if donor_kind == "llama" else build_tiny_text_backbone(0)
    if donor_kind == "qwen2":  # give the Qwen2 biases non-zero values: they must be copied, not zeroed
        with torch.no_grad():
            donor.model.model.layers[0].self_attn.q_proj.bias.normal_()
    ids = _ids(donor)
    with torch.no_grad():
        expected = donor.model(input_ids=ids).logits
    grafted = graft_vision_tower(donor, SMALL_TOWER)
    assert grafted.is_vision and grafted.model_type == "qwen2_5_vl"
    with torch.no_grad():
        got = grafted.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_image_tokens_start_at_the_scale_of_text_embeddings():
    donor = tiny_llama()
    rms = donor.embedding_rms()
    grafted = graft_vision_tower(donor, SMALL_TOWER)
    image = Image.fromarray((torch.rand(56, 56, 3) * 255).to(torch.uint8).numpy())
    with torch.no_grad():
        (tokens,) = grafted.encode_images([image])
    ratio = float(tokens.embeds.pow(2).mean().sqrt()) / rms
    assert 0.5 < ratio < 2.0, ratio


def test_graft_leaves_the_callers_rng_alone():
    """Grafting (and so loading a grafted checkpoint) reseeded torch's global RNG to the
    tower's seed: a caller's torch.manual_seed was silently undone."""
    donors = [tiny_llama(), tiny_llama()]  # (tiny_llama seeds the RNG itself)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = graft_vision_tower(donors[0], SMALL_TOWER)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(999)  # and the tower's init depends on its seed only
    second = graft_vision_tower(donors[1], SMALL_TOWER)
    for (name, a), (_, b) in zip(first.model.model.visual.state_dict().items(), second.model.model.visual.state_dict().items()):
        assert torch.equal(a, b), name


def test_graft_refuses_a_vision_donor():
    with pytest.raises(ValueError, match="already a vision model"):
        graft_vision_tower(build_tiny_vl_backbone())


def _digit_like_examples(tmp_path: Path) -> list[TrainingExample]:
    paths = {}
    for name, color in [("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220))]:
        paths[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (56, 56), color).save(paths[name])
    out = []
    for i, name in enumerate(paths):
        cands = [CandidateRecord(id=n, image=str(p)) for n, p in paths.items()]
        out.append(TrainingExample(id=f"t{i}", query_text=f"a {name} square", candidates=cands, positive=i))
    return out


def test_grafted_tower_trains_with_lora_and_saves_without_the_backbone(tmp_path):
    donor = tiny_llama()
    donor.model.save_pretrained(tmp_path / "donor")
    donor.tokenizer.save_pretrained(tmp_path / "donor")
    examples = _digit_like_examples(tmp_path)
    traces = tmp_path / "traces.jsonl"
    synthesize_cot(examples, ProgrammaticTeacher(max_inspections=0), traces)
    cfg = SFTConfig(init_from=str(tmp_path / "donor"), vision_graft=SMALL_TOWER, data=str(traces), output_dir=str(tmp_path / "sft"),
                    steps=2, batch_size=3, lr=1e-2, save_every=2, reasoning_budget=0, answer_space="labels", compression="none",
                    lm="lora", lora=LoraSettings(r=4, alpha=8), train_vision=True, train_icm=False, progress=False,
                    model_overrides={"max_candidates": 8, "system_prompt": "Rank.", "image_max_pixels": 3136})
    trainer = SFTTrainer(cfg)
    tower = trainer.model.backbone.model.model.visual
    before = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    final = trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())  # the tower learned
    assert (final / VISION_WEIGHTS).is_file() and (final / "adapter").is_dir() and not (final / "backbone").exists()
    assert (final / VISION_WEIGHTS).stat().st_size < 1_000_000
    loaded = RetrvR1Model.from_pretrained(final)
    assert loaded.config.vision_graft == trainer.model.config.vision_graft and loaded.backbone.is_vision
    query = Query(text="a green square")
    cands = [Candidate(id=c.id, image=c.image) for c in examples[0].candidates]
    a = trainer.model.eval().rank(query, cands, reasoning_budget=0)
    b = loaded.rank(query, cands, reasoning_budget=0)
    assert a.scores == pytest.approx(b.scores, abs=1e-6)

    (final / VISION_WEIGHTS).unlink()
    with pytest.raises(ModelLoadError, match=VISION_WEIGHTS):
        RetrvR1Model.from_pretrained(final)
    with pytest.raises(ValueError, match="plain text backbone"):
        SFTTrainer(SFTConfig(init_from=str(final), vision_graft={}, data=str(traces), output_dir=str(tmp_path / "again"), progress=False))


def test_smollm2_graft_adds_the_vision_tokens_and_keeps_its_text_logits():
    from retrv_r1_plugin.backbone import smollm2_source

    source, gguf = smollm2_source()
    donor = load_backbone(source, gguf_file=gguf)
    assert "<|image_pad|>" not in donor.tokenizer.get_vocab()
    ids = _ids(donor)
    with torch.no_grad():
        expected = donor.model(input_ids=ids).logits
    grafted = graft_vision_tower(donor)
    assert all(t in grafted.tokenizer.get_vocab() for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
    with torch.no_grad():
        got = grafted.model(input_ids=ids).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, atol=1e-4, rtol=1e-4)


def test_vision_alignment_trains_only_the_tower_to_caption_images(tmp_path):
    from training.align import AlignTrainer
    from training.config import AlignConfig
    from training.examples import write_examples

    donor = tiny_llama()
    donor.model.save_pretrained(tmp_path / "donor")
    donor.tokenizer.save_pretrained(tmp_path / "donor")
    examples = _digit_like_examples(tmp_path)
    # the other direction too: an image query whose positive is a caption
    examples.append(TrainingExample(id="i2t", query_text="", query_image=examples[0].candidates[1].image,
                                    candidates=[CandidateRecord(id="c0", text="a red square"), CandidateRecord(id="c1", text="a green square")], positive=1))
    write_examples(tmp_path / "ex.jsonl", examples)
    cfg = AlignConfig(init_from=str(tmp_path / "donor"), vision_graft=SMALL_TOWER, align="vision", data=str(tmp_path / "ex.jsonl"),
                      output_dir=str(tmp_path / "valign"), steps=20, batch_size=4, lr=1e-2, save_every=20, progress=False,
                      model_overrides={"max_candidates": 8, "image_max_pixels": 3136})
    trainer = AlignTrainer(cfg)
    assert [len(trainer._caption_pairs(ex)) for ex in examples] == [1, 1, 1, 1]
    lm_before = {k: v.detach().clone() for k, v in trainer.model.backbone.model.model.language_model.state_dict().items()}
    icm_before = {k: v.detach().clone() for k, v in trainer.model.icm.state_dict().items()}
    final = trainer.train()
    losses = [r["content_loss"] for r in trainer.history]
    assert sum(losses[-4:]) < sum(losses[:4]) * 0.8, losses
    assert all(torch.equal(v, lm_before[k]) for k, v in trainer.model.backbone.model.model.language_model.state_dict().items())
    assert all(torch.equal(v, icm_before[k]) for k, v in trainer.model.icm.state_dict().items())
    assert (final / VISION_WEIGHTS).is_file() and not (final / "backbone").exists()

    text_only = tmp_path / "text.jsonl"
    write_examples(text_only, [TrainingExample(id="t", query_text="a cat", candidates=[CandidateRecord(id="a", text="a cat"), CandidateRecord(id="b", text="a dog")], positive=0)])
    with pytest.raises(ValueError, match="no \\(image, caption\\) pairs"):
        AlignTrainer(AlignConfig(init_from=str(tmp_path / "donor"), vision_graft=SMALL_TOWER, align="vision", data=str(text_only),
                                 output_dir=str(tmp_path / "x"), progress=False))
    with pytest.raises(ValueError, match="needs a vision backbone"):
        AlignTrainer(AlignConfig(init_from=str(tmp_path / "donor"), align="vision", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / "y"), progress=False))
