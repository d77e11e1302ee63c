"""RetrvR1Model: scores, modes, save/load, batching, content-token caching."""

import math

import pytest
import torch

from retrv_r1_plugin.icm import InformationCompressionModule
from retrv_r1_plugin.model import RetrvR1Model
from retrv_r1_plugin.types import Candidate, Query

from conftest import boost_label, make_text_model, make_vl_model, solid

TEXTS = ["plants turn light into sugar", "a rocket in the sky", "coffee in a white cup", "the cat sat on the mat"]


@pytest.mark.parametrize("budget", [0, 6])
@pytest.mark.parametrize("compression", ["icm", "none"])
def test_scores_are_a_distribution_over_exactly_k(text_model, compression, budget):
    result = text_model.rank("photosynthesis", TEXTS, compression=compression, reasoning_budget=budget)
    assert len(result.scores) == len(TEXTS)
    assert math.isclose(sum(result.scores), 1.0, rel_tol=1e-5)
    assert all(0.0 <= s <= 1.0 for s in result.scores)
    assert sorted(result.order) == list(range(len(TEXTS)))
    assert [result.scores[i] for i in result.order] == sorted(result.scores, reverse=True)
    assert [c.text for c in result.candidates] == TEXTS
    assert result.usage.prompt_tokens > 0


def test_icm_context_is_much_shorter_than_full_tokens(text_model):
    long_texts = [t + " " + "detail " * 60 for t in TEXTS]
    icm = text_model.rank("q", long_texts, compression="icm", reasoning_budget=0)
    full = text_model.rank("q", long_texts, compression="none", reasoning_budget=0)
    assert icm.usage.prompt_tokens + 4 * 60 < full.usage.prompt_tokens


def test_scores_follow_the_label_logits_not_positions():
    """Boost one label's output row: that candidate must get the top score wherever it sits."""
    model = make_text_model(seed=1)
    head = model.backbone.lm_head.weight
    label = model.special.labels[2]
    with torch.no_grad():
        head[label] *= 40
    result = model.rank("q", TEXTS, reasoning_budget=0)
    assert result.order[0] == 2 and result.answer == 2 and result.fallback is None
    assert result.scores[2] > 0.9


def test_vl_model_ranks_images_paths_and_bytes(vl_model, images):
    raw = images["blue"].read_bytes()
    cands = [
        Candidate(text="red", image=images["red"]),
        Candidate(image=str(images["green"])),
        Candidate(image=raw, id="blue"),
        Candidate(text="just text"),
    ]
    from PIL import Image

    decoded = [
        Candidate(text="red", image=Image.open(images["red"]).convert("RGB")),
        Candidate(image=Image.open(images["green"]).convert("RGB")),
        Candidate(image=Image.open(images["blue"]).convert("RGB"), id="blue"),
        Candidate(text="just text"),
    ]
    for compression in ("icm", "none"):
        r = vl_model.rank(Query(text="", image=images["green"]), cands, compression=compression, reasoning_budget=4)
        assert len(r.scores) == 4 and math.isclose(sum(r.scores), 1, rel_tol=1e-5)
        assert r.candidates[2].id == "blue"
        # a Path, a str path and raw bytes are read as the very pixels they hold
        same = vl_model.rank(Query(text="", image=Image.open(images["green"]).convert("RGB")), decoded,
                             compression=compression, reasoning_budget=4)
        assert r.scores == pytest.approx(same.scores, abs=1e-6) and r.reasoning == same.reasoning
        # and the pixels are used: another image in place of candidate 1 gives other scores
        other = vl_model.rank(Query(text="", image=images["green"]), [cands[0], Candidate(image=str(images["red"])), *cands[2:]],
                              compression=compression, reasoning_budget=4)
        assert other.scores != pytest.approx(r.scores, abs=1e-6)


def test_images_in_other_modes_are_read_as_hugging_face_loaders_read_them(vl_model):
    """16-bit grey is scaled to 8 bits (it was clipped: almost all white), transparent
    pixels are white (they showed the colour they hide: a black-on-transparent logo was all
    black), and a photo's EXIF orientation is applied."""
    import io

    import numpy as np
    from PIL import Image

    from retrv_r1_plugin.types import load_image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")  # a 16-bit grey PNG, read as I;16
    grey = np.asarray(load_image(buf.getvalue()))[..., 0]
    assert grey.min() == 0 and grey.max() >= 250 and len(np.unique(grey)) > 200
    logo = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    logo.paste((0, 0, 0, 255), (14, 14, 42, 42))
    on_white = Image.new("RGB", (56, 56), "white")
    on_white.paste((0, 0, 0), (14, 14, 42, 42))
    assert np.array_equal(np.asarray(load_image(logo)), np.asarray(on_white))
    keyed = Image.new("P", (8, 8), 0)
    keyed.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    keyed.info["transparency"] = 0
    assert load_image(keyed).getpixel((0, 0)) == (255, 255, 255)
    photo = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).size == (20, 40)
    # the model reads what load_image makes
    as_logo = vl_model.rank("q", [Candidate(image=logo), "text"], reasoning_budget=0)
    assert as_logo.scores == vl_model.rank("q", [Candidate(image=on_white), "text"], reasoning_budget=0).scores


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_save_load_round_trip_gives_identical_scores(tmp_path, kind, images):
    model = make_text_model(seed=2) if kind == "text" else make_vl_model(seed=2)
    cands = TEXTS if kind == "text" else [Candidate(text="a", image=images["red"]), Candidate(text="b"), Candidate(image=images["blue"])]
    before = model.rank("query", cands, reasoning_budget=5)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = RetrvR1Model.from_pretrained(tmp_path / "ckpt")
    after = loaded.rank("query", cands, reasoning_budget=5)
    assert after.scores == before.scores
    assert after.reasoning == before.reasoning
    assert loaded.config.max_candidates == model.config.max_candidates
    assert loaded.content_signature == model.content_signature  # a content-token cache stays valid
    assert loaded.tokenizer.convert_tokens_to_ids("<cand_3>") == model.tokenizer.convert_tokens_to_ids("<cand_3>")


def test_saved_checkpoint_without_backbone_weights_references_source(tmp_path):
    """A checkpoint that references its backbone stores only ICM, tokenizer and added rows."""
    model = make_text_model(seed=3)
    model.backbone.model.save_pretrained(tmp_path / "base")
    model.backbone.tokenizer.save_pretrained(tmp_path / "base")
    model.config.backbone_source = str(tmp_path / "base")
    model.backbone_modified = False
    with torch.no_grad():  # train-like change to an added row: must survive without backbone/
        model.backbone.model.get_input_embeddings().weight[model.special.labels[0]] += 0.5
    before = model.rank("q", TEXTS, reasoning_budget=0)
    out = model.save_pretrained(tmp_path / "ckpt")
    assert not (out / "backbone").exists() and (out / "token_embeddings.safetensors").exists()
    after = RetrvR1Model.from_pretrained(out).rank("q", TEXTS, reasoning_budget=0)
    assert after.scores == pytest.approx(before.scores, abs=1e-6)


def test_checkpoint_without_icm_reads_full_tokens_and_refuses_compression(tmp_path):
    """A full-token model whose ICM never trained ships without it (drop_icm): it ranks as
    before in full tokens, and asking for the ICM is a named error, not random weights."""
    from retrv_r1_plugin.backbone import ModelLoadError

    model = make_text_model(seed=5)
    before = model.rank("q", TEXTS, reasoning_budget=3, compression="none")
    model.drop_icm()
    out = model.save_pretrained(tmp_path / "ckpt")
    assert not (out / "icm.safetensors").exists()
    loaded = RetrvR1Model.from_pretrained(out)
    assert loaded.config.compression == "none" and not loaded.icm_available
    after = loaded.rank("q", TEXTS, reasoning_budget=3)
    assert after.scores == before.scores and after.reasoning == before.reasoning
    for call in (lambda: loaded.rank("q", TEXTS, compression="icm"), lambda: loaded.encode_candidates(TEXTS)):
        with pytest.raises(ValueError, match="no trained ICM.*compression='none'"):
            call()
    with pytest.raises(ModelLoadError, match="no icm.safetensors.*compression='none'"):
        RetrvR1Model.from_pretrained(out, compression="icm")


def test_saving_over_another_checkpoint_leaves_none_of_its_files(tmp_path):
    """A checkpoint saved into a folder that holds another one is loaded as saved: the old
    backbone/ (loaded before backbone_source) and icm.safetensors (a dropped ICM) are gone."""
    out = tmp_path / "ckpt"
    make_text_model(seed=7).save_pretrained(out)  # built from config: backbone/ and an ICM
    assert (out / "backbone").is_dir() and (out / "icm.safetensors").is_file()
    model = make_text_model(seed=3)
    model.backbone.model.save_pretrained(tmp_path / "base")
    model.backbone.tokenizer.save_pretrained(tmp_path / "base")
    model.config.backbone_source = str(tmp_path / "base")
    model.backbone_modified = False
    model.drop_icm()
    before = model.rank("q", TEXTS, reasoning_budget=0)
    model.save_pretrained(out)
    assert not (out / "backbone").exists() and not (out / "icm.safetensors").exists()
    loaded = RetrvR1Model.from_pretrained(out)
    assert not loaded.icm_available and loaded.config.compression == "none"
    assert loaded.rank("q", TEXTS, reasoning_budget=0).scores == pytest.approx(before.scores, abs=1e-6)
    # and the other way round: a checkpoint with its backbone over one that referenced it
    again = make_text_model(seed=7)
    again.save_pretrained(out)
    assert not (out / "token_embeddings.safetensors").exists()
    assert RetrvR1Model.from_pretrained(out).rank("q", TEXTS, reasoning_budget=0).scores == again.rank("q", TEXTS, reasoning_budget=0).scores


def test_checkpoint_saved_with_fewer_candidates_keeps_all_its_labels(tmp_path):
    """Loading with a lower max_candidates and saving again loses no index label: the
    checkpoint can still be loaded with the original number."""
    from retrv_r1_plugin.model import TooManyCandidatesError

    model = make_text_model(seed=6, max_candidates=8)
    cands = [f"passage {i}" for i in range(8)]
    before = model.rank("q", cands, reasoning_budget=0)
    model.save_pretrained(tmp_path / "eight")
    fewer = RetrvR1Model.from_pretrained(tmp_path / "eight", max_candidates=4)
    fewer.save_pretrained(tmp_path / "four")
    assert RetrvR1Model.from_pretrained(tmp_path / "four").config.max_candidates == 4  # the saved setting
    again = RetrvR1Model.from_pretrained(tmp_path / "four", max_candidates=8)
    assert again.rank("q", cands, reasoning_budget=0).scores == before.scores
    with pytest.raises(TooManyCandidatesError, match="max_candidates=9 exceeds the 8 index labels"):
        RetrvR1Model.from_pretrained(tmp_path / "four", max_candidates=9)


def test_separate_compressor_round_trip(tmp_path):
    model = make_text_model(seed=4, icm={"share_compressor": False, "dim": 32, "num_heads": 4})
    assert model.icm.compress_relation is not model.icm.compress
    before = model.rank("q", TEXTS, reasoning_budget=0)
    model.save_pretrained(tmp_path / "c")
    after = RetrvR1Model.from_pretrained(tmp_path / "c").rank("q", TEXTS, reasoning_budget=0)
    assert after.scores == before.scores


def test_candidates_may_be_a_generator():
    """``rank`` reads the candidates twice (prompt, then result): a generator must not run dry."""
    model = boost_label(make_text_model(seed=2), 1)
    listed = model.rank("q", TEXTS, reasoning_budget=0)
    assert listed.answer == 1 and listed.fallback is None
    r = model.rank("q", (t for t in TEXTS), reasoning_budget=0)
    assert r.answer == 1 and r.fallback is None and not any("answer was" in n for n in r.notes)
    assert [c.text for c in r.candidates] == TEXTS and r.scores == listed.scores
    batch = model.rank_batch((q for q in ["q", "q"]), ((t for t in TEXTS) for _ in range(2)), reasoning_budget=0)
    assert [b.answer for b in batch] == [1, 1] and all(len(b.candidates) == len(TEXTS) for b in batch)


def test_rank_batch_equals_single_calls(text_model):
    queries = ["photosynthesis", Query(text="space travel")]
    lists = [TEXTS, TEXTS[:2]]
    batch = text_model.rank_batch(queries, lists, reasoning_budget=3)
    singles = [text_model.rank(q, c, reasoning_budget=3) for q, c in zip(queries, lists)]
    assert [b.scores for b in batch] == [s.scores for s in singles]
    with pytest.raises(ValueError, match="2 queries but 1"):
        text_model.rank_batch(queries, lists[:1])


def test_encode_candidates_refuses_image_only_candidates_on_a_text_backbone(text_model, images):
    """As rank() does: a blank's t_con cached in a store would be silently wrong scores later."""
    with pytest.raises(ValueError, match="candidate 1 is an image without text"):
        text_model.encode_candidates(["a cat", Candidate(image=images["red"])])
    assert len(text_model.encode_candidates(["a cat", Candidate(text="a red square", image=images["red"])])) == 2


def test_cached_content_tokens_are_used_and_match(text_model, monkeypatch):
    cached = text_model.encode_candidates(TEXTS)
    assert len(cached) == len(TEXTS) and cached[0].shape == (text_model.backbone.hidden_size,)
    fresh = text_model.rank("q", TEXTS, reasoning_budget=0)
    calls = []
    original = InformationCompressionModule.content
    monkeypatch.setattr(InformationCompressionModule, "content", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    cands = [Candidate(text=t, content_tokens=c) for t, c in zip(TEXTS, cached)]
    reused = text_model.rank("q", cands, reasoning_budget=0)
    assert calls == []  # t_con came from the cache
    assert reused.scores == pytest.approx(fresh.scores, abs=1e-5)
    # a wrong-shaped cache entry is recomputed, with a note
    cands[1] = Candidate(text=TEXTS[1], content_tokens=torch.zeros(3))
    mixed = text_model.rank("q", cands, reasoning_budget=0)
    assert calls and any("wrong shape" in n for n in mixed.notes)
    assert mixed.scores == pytest.approx(fresh.scores, abs=1e-5)


def test_content_signature_changes_with_weights():
    model = make_text_model(seed=5)
    sig = model.content_signature
    with torch.no_grad():
        model.icm.out_proj.weight.add_(1.0)
    assert model.content_signature == sig  # cached until invalidated
    model.invalidate_signature()
    assert model.content_signature != sig


def test_weights_changed_while_the_signature_is_hashed_are_not_hidden(monkeypatch):
    """Training in another thread may update weights and invalidate the signature while a
    hash is running: the hash of the older weights must not be kept as the current one."""
    import retrv_r1_plugin.model as model_module

    model = make_text_model(seed=5)
    original = model_module._hash_tensors
    state = {"first": True}

    def hash_during_an_update(h, named):
        original(h, named)
        if state.pop("first", False):  # the first tensor group is read, then the weights change
            with torch.no_grad():
                model.icm.out_proj.weight.add_(1.0)
            model.invalidate_signature()

    monkeypatch.setattr(model_module, "_hash_tensors", hash_during_an_update)
    stale = model.content_signature
    monkeypatch.setattr(model_module, "_hash_tensors", original)
    assert model.content_signature != stale


def test_content_signature_covers_everything_that_makes_content_tokens():
    """Each change below alters t_con, so a cache made before it must be refused."""
    base = make_text_model(seed=5).content_signature
    assert make_text_model(seed=5).content_signature == base  # same weights, same signature
    assert make_text_model(seed=5, max_candidate_tokens=7).content_signature != base
    model = make_text_model(seed=5)
    emb = model.backbone.model.get_input_embeddings().weight
    row = int(model.tokenizer("apple", add_special_tokens=False)["input_ids"][0])
    assert 64 <= row < emb.shape[0]  # an ordinary token's row, past the 64 rows once hashed
    before = model.encode_candidates(["apple"])[0]
    with torch.no_grad():  # a full fine-tune moves ordinary tokens' rows
        emb[row] += 0.5
    model.invalidate_signature()
    assert not torch.equal(model.encode_candidates(["apple"])[0], before)
    assert model.content_signature != base


def test_content_signature_covers_the_vision_tower(images):
    model = make_vl_model(seed=3)
    sig = model.content_signature
    cand = Candidate(image=images["red"])
    before = model.encode_candidates([cand])[0]
    with torch.no_grad():  # train_vision / a graft changes the tower's weights
        next(model.backbone.model.model.visual.parameters()).mul_(1.5)
    model.invalidate_signature()
    assert not torch.equal(model.encode_candidates([cand])[0], before)
    assert model.content_signature != sig


def test_reasoning_trace_and_usage_are_reported(text_model):
    r = text_model.rank("q", TEXTS, reasoning_budget=7)
    assert r.usage.generated_tokens >= 7
    assert r.reasoning  # the model's written tokens, decoded
    assert r.fallback == "forced_answer"  # a random model never opens <answer> by itself
    assert any("budget of 7" in n for n in r.notes)


def test_top_k_refuses_a_negative_k(text_model):
    """top_k(-1) sliced from the end: every candidate but the worst, as if they were a top."""
    result = text_model.rank("q", TEXTS, reasoning_budget=0)
    assert result.top_k(2) == [(i, result.scores[i]) for i in result.order[:2]]
    assert result.top_k(0) == [] and len(result.top_k(10)) == len(TEXTS)
    assert result.best == result.order[0]
    for k in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"k must be a non-negative int, got {k!r}"):
            result.top_k(k)


def test_reasoning_text_leaves_out_the_tokens_that_end_reasoning(text_model):
    """``result.reasoning`` is the model's words: not the ``</think><answer>`` that close them."""
    from retrv_r1_plugin.testing import scripted_generation

    with scripted_generation(text_model, [" looks like", "<inspection-index-start>", "<cand_2>", "<inspection-index-end>",
                                          " the second", "</think>", "<answer>"]):
        r = text_model.rank("q", TEXTS, reasoning_budget=64, max_inspections=1, compression="icm")
    assert r.fallback != "forced_answer" and r.inspected == [1]  # the script opened <answer> itself
    assert "</think>" not in r.reasoning and "<answer>" not in r.reasoning
    assert r.reasoning.startswith("looks like") and r.reasoning.endswith("[inspected candidate 1] the second")


def test_prompt_settings_changed_on_the_config_take_effect(tmp_path):
    """What save_pretrained writes (the config) is what the prompt uses, also after a change."""
    from retrv_r1_plugin.testing import build_tiny_text_backbone

    model = RetrvR1Model.from_backbone(build_tiny_text_backbone(), system_prompt="Rank them.")
    model.rank("q", ["a cat", "a dog"], reasoning_budget=0)  # builds the cached prompt prefix
    model.config.system_prompt = "Pick one."
    model.config.label_after_candidate = True
    prompt, _, _ = model.prepare("q", ["a cat", "a dog"], compression="none", think=False)
    text = model.tokenizer.decode(prompt.ids.tolist())
    assert "Pick one." in text and "Rank them." not in text and "<cand_1>: a cat <cand_1>" in text
    model.save_pretrained(tmp_path / "m")
    loaded = RetrvR1Model.from_pretrained(tmp_path / "m")
    assert loaded.rank("q", ["a cat", "a dog"], reasoning_budget=0).scores == pytest.approx(
        model.rank("q", ["a cat", "a dog"], reasoning_budget=0).scores)


def test_label_after_candidate_repeats_each_label_after_its_content(tmp_path):
    from retrv_r1_plugin.testing import build_tiny_text_backbone

    cands = ["a cat", "a dog <cand_1>"]  # untrusted text naming a label stays text
    plain = RetrvR1Model.from_backbone(build_tiny_text_backbone(), system_prompt="R.")
    after = RetrvR1Model.from_backbone(build_tiny_text_backbone(), system_prompt="R.", label_after_candidate=True)
    for model, per_candidate in ((plain, 1), (after, 2)):
        for mode in ("none", "icm"):
            prompt, _, _ = model.prepare("q", cands, compression=mode, think=False)
            ids = prompt.ids.tolist()
            assert [ids.count(t) for t in after.special.labels[:2]] == [per_candidate, per_candidate]
    prompt, _, _ = after.prepare("q", cands, compression="none", think=False)
    text = after.tokenizer.decode(prompt.ids.tolist())
    assert "<cand_1>: a cat <cand_1>\n" in text
    after.save_pretrained(tmp_path / "m")
    loaded = RetrvR1Model.from_pretrained(tmp_path / "m")
    assert loaded.config.label_after_candidate
    assert loaded.rank("q", cands, reasoning_budget=0).scores == after.rank("q", cands, reasoning_budget=0).scores


def test_query_after_candidates_repeats_the_query_before_the_answer(tmp_path, images):
    from retrv_r1_plugin.testing import build_tiny_vl_backbone

    model = RetrvR1Model.from_backbone(build_tiny_vl_backbone(), system_prompt="R.", query_after_candidates=True)
    prompt, _, _ = model.prepare("find the cat", ["a cat", "a dog"], compression="none", think=False)
    text = model.tokenizer.decode(prompt.ids.tolist())
    assert text.count("find the cat") == 2 and text.rstrip().endswith("Query: find the cat\n<|im_end|>\n<|im_start|>assistant\n<answer>".rstrip())
    # an image query is laid out twice too (its tokens and mRoPE grid each time)
    from retrv_r1_plugin.types import Query

    prompt, _, _ = model.prepare(Query(text="this", image=str(images["red"])), ["a cat", "a dog"], compression="none", think=False)
    assert len(prompt.grids) == 2
    model.save_pretrained(tmp_path / "m")
    loaded = RetrvR1Model.from_pretrained(tmp_path / "m")
    assert loaded.config.query_after_candidates
    assert loaded.rank("find the cat", ["a cat", "a dog"], reasoning_budget=0).scores == model.rank("find the cat", ["a cat", "a dog"], reasoning_budget=0).scores


def test_merge_lora_folds_adapters_into_the_weights_and_saves_the_merged_backbone(tmp_path):
    import peft

    from retrv_r1_plugin.model import lm_has_lora

    model = make_text_model(seed=3)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), model.lm)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # non-zero adapters: merging must really move the weights
    model.invalidate_signature()
    cands = ["apples are red", "the sky is blue", "grass is green", "coal is black"]
    before = model.rank("what colour is the sky?", cands, reasoning_budget=6)
    model.eval()
    adapted = sum(1 for n, _ in model.lm.named_modules() if n.endswith(("q_proj", "v_proj")))
    assert model.merge_lora() == adapted and not lm_has_lora(model.lm)
    assert not any(".lora_" in n for n, _ in model.lm.named_parameters())
    after = model.rank("what colour is the sky?", cands, reasoning_budget=6)
    assert after.reasoning == before.reasoning
    assert max(abs(a - b) for a, b in zip(before.scores, after.scores)) < 1e-5
    assert model.merge_lora() == 0  # nothing left to merge
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "backbone").is_dir() and not (tmp_path / "merged" / "adapter").exists()
    reloaded = RetrvR1Model.from_pretrained(tmp_path / "merged")
    again = reloaded.rank("what colour is the sky?", cands, reasoning_budget=6)
    assert again.scores == after.scores and not lm_has_lora(reloaded.lm)
