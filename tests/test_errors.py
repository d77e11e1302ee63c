"""Bad input gives clear errors or flagged fallbacks, never a crash deep in torch."""

import io
import os

import pytest
import torch

from retrv_r1_plugin.backbone import ModelLoadError
from retrv_r1_plugin.model import ContextOverflowError, RetrvR1Model, TooManyCandidatesError
from retrv_r1_plugin.testing import scripted_generation
from retrv_r1_plugin.types import Candidate, EmptyCandidatesError, ImageLoadError, NoAnswerError, Query

from conftest import make_text_model, make_vl_model, solid

TEXTS = ["alpha beta", "gamma delta", "epsilon"]


def test_empty_candidate_list(text_model):
    with pytest.raises(EmptyCandidatesError, match="no candidates"):
        text_model.rank("q", [])


def test_a_lone_string_is_not_split_into_one_character_candidates(text_model):
    """A str is iterable: given where a list belongs, it used to be ranked letter by letter."""
    calls = [
        (lambda: text_model.rank("q", "abc"), "candidates must be a list .*got a single str 'abc'"),
        (lambda: text_model.rank("q", Candidate(text="abc")), "candidates must be a list .*got a single Candidate"),
        (lambda: text_model.rank_windowed("q", "abc"), "candidates must be a list .*got a single str 'abc'"),
        (lambda: text_model.encode_candidates("abc"), "candidates must be a list .*got a single str 'abc'"),
        (lambda: text_model.rank_batch("qr", [["a"], ["b"]]), "queries must be a list of queries, got a single str"),
        (lambda: text_model.rank_batch(["q", "r"], ["ab", "cd"]), r"candidates\[0\] must be a list .*got a single str 'ab'"),
    ]
    for call, message in calls:
        with pytest.raises(TypeError, match=message):
            call()
    results = text_model.rank_batch((q for q in ["q", "r"]), (c for c in [["ab"], ("cd", "e")]), reasoning_budget=0)
    assert [len(r.scores) for r in results] == [1, 2]


def test_too_many_candidates_names_the_limit(text_model):
    with pytest.raises(TooManyCandidatesError, match="17 candidates exceed this model's 16"):
        text_model.rank("q", ["x"] * 17)


def test_missing_and_corrupt_images_name_the_source(vl_model, tmp_path):
    with pytest.raises(ImageLoadError, match="not found.*nope.png"):
        vl_model.rank("q", [Candidate(image=tmp_path / "nope.png"), "b"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageLoadError, match="bad.png"):
        vl_model.rank("q", [Candidate(image=bad)])
    buf = io.BytesIO()
    solid((1, 2, 3)).save(buf, format="PNG")
    with pytest.raises(ImageLoadError, match="bytes"):
        vl_model.rank("q", [Candidate(image=buf.getvalue()[:40])])
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.txt"):
        vl_model.rank(Query(text="q", image=text_file), ["a"])
    # a FIFO (or a device) would block or never end: refused before it is opened
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file.*pipe.png"):
        vl_model.rank("q", [Candidate(image=fifo), "b"])
    with pytest.raises(ImageLoadError, match="not a regular file.*/dev/zero"):
        vl_model.rank("q", [Candidate(image="/dev/zero"), "b"])
    with pytest.raises(ImageLoadError, match="not a regular file"):
        vl_model.rank("q", [Candidate(image=tmp_path), "b"])


def test_undecodable_images_name_the_candidate_or_the_query(vl_model):
    with pytest.raises(ImageLoadError, match=r"^candidate 1: cannot decode image <10 bytes>"):
        vl_model.rank("q", ["a", Candidate(image=b"notanimage")])
    buf = io.BytesIO()
    solid((1, 2, 3), (64, 64)).save(buf, format="PNG")
    from PIL import Image

    lazy = Image.open(io.BytesIO(buf.getvalue()[:-30]))  # header fine, pixel data cut short
    with pytest.raises(ImageLoadError, match=r"^candidate 2: cannot decode image"):
        vl_model.rank("q", ["a", "b", Candidate(text="c", image=lazy)])
    with pytest.raises(ImageLoadError, match=r"^the query: cannot decode image <2 bytes>"):
        vl_model.rank(Query(text="q", image=b"xy"), ["a"])


def test_text_backbone_refuses_image_only_candidates_but_uses_captions(text_model, tmp_path):
    with pytest.raises(ValueError, match="text-only"):
        text_model.rank("q", [Candidate(image=solid((0, 0, 0)))])
    r = text_model.rank("q", [Candidate(text="a caption", image=solid((0, 0, 0))), "b"], reasoning_budget=0)
    assert any("image ignored" in n for n in r.notes)
    # the caption is what gets ranked: the same scores as the caption alone, not those of a blank
    assert r.scores == text_model.rank("q", ["a caption", "b"], reasoning_budget=0).scores
    assert r.scores != pytest.approx(text_model.rank("q", ["", "b"], reasoning_budget=0).scores)


def test_unknown_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="no model directory"):
        RetrvR1Model.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(ModelLoadError, match="cannot load a model from 'nobody/no-such-model'"):
        RetrvR1Model.from_pretrained("nobody/no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError):
        RetrvR1Model.from_pretrained(empty)


def test_damaged_checkpoints_and_bad_overrides_are_named(tmp_path):
    import json
    import shutil

    ok = make_text_model(max_candidates=8).save_pretrained(tmp_path / "ok")
    corrupt = shutil.copytree(ok, tmp_path / "corrupt")
    (corrupt / "retrv_r1.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config .*corrupt.retrv_r1\.json: Expecting property name"):
        RetrvR1Model.from_pretrained(corrupt)
    keyless = shutil.copytree(ok, tmp_path / "keyless")
    data = json.loads((ok / "retrv_r1.json").read_text())
    del data["icm"]
    (keyless / "retrv_r1.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"keyless.retrv_r1\.json: missing key\(s\) 'icm'"):
        RetrvR1Model.from_pretrained(keyless)
    (keyless / "retrv_r1.json").write_text(json.dumps({**data, "icm": {}, "max_candidates": "8"}))
    with pytest.raises(ModelLoadError, match="keyless"):
        RetrvR1Model.from_pretrained(keyless)
    # overrides go through the same validation as a new config
    with pytest.raises(ValueError, match="compression must be 'icm' or 'none', got 'ICM'"):
        RetrvR1Model.from_pretrained(ok, compression="ICM")
    with pytest.raises(ValueError, match="max_candidate_tokens must be an int >= 1, got 0"):
        RetrvR1Model.from_pretrained(ok, max_candidate_tokens=0)
    with pytest.raises(TooManyCandidatesError, match="max_candidates=16 exceeds the 8 index labels"):
        RetrvR1Model.from_pretrained(ok, max_candidates=16)
    with pytest.raises(TypeError, match="unknown RetrvR1Config field.*'bogus'"):
        RetrvR1Model.from_pretrained(ok, bogus=1)
    fewer = RetrvR1Model.from_pretrained(ok, max_candidates=4, reasoning_budget=0)
    assert fewer.config.max_candidates == 4 and fewer.config.reasoning_budget == 0
    with pytest.raises(TooManyCandidatesError, match="5 candidates exceed this model's 4"):
        fewer.rank("q", ["a"] * 5)


def test_transformers_loading_keywords_are_honoured_or_refused_by_name(tmp_path):
    """Keywords a Hugging Face user passes by habit: torch_dtype and a one-device device_map
    are honoured (checkpoint and plain backbone alike), the rest refused naming the keyword,
    before any weights are read."""
    model = make_text_model(seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    model.lm.save_pretrained(tmp_path / "plain")
    model.tokenizer.save_pretrained(tmp_path / "plain")
    for source in (tmp_path / "ckpt", tmp_path / "plain"):
        loaded = RetrvR1Model.from_pretrained(source, torch_dtype=torch.bfloat16, device_map="cpu")
        assert loaded.backbone.dtype == torch.bfloat16 and loaded.device == torch.device("cpu")
        with pytest.raises(TypeError, match="dtype=torch.float16 and torch_dtype=torch.bfloat16 disagree"):
            RetrvR1Model.from_pretrained(source, dtype=torch.float16, torch_dtype=torch.bfloat16)
        for device_map in ("auto", {"": 0}):
            with pytest.raises(ValueError, match=r"device_map=.* is not supported.*pass device="):
                RetrvR1Model.from_pretrained(source, device_map=device_map)
        with pytest.raises(TypeError, match="transformers' loading option.*'trust_remote_code'"):
            RetrvR1Model.from_pretrained(source, trust_remote_code=True)
        with pytest.raises(TypeError, match="unknown RetrvR1Config field.*'max_candidate'"):
            RetrvR1Model.from_pretrained(source, max_candidate=4)


@pytest.mark.parametrize("damaged", ["icm.safetensors", "token_embeddings.safetensors", "backbone/model.safetensors"])
def test_corrupt_weight_files_are_named(tmp_path, damaged):
    import shutil

    model = make_text_model(max_candidates=8)
    model.save_pretrained(tmp_path / "ok", save_backbone=True)
    if damaged == "token_embeddings.safetensors":  # written only when the backbone is not
        model.backbone.model.save_pretrained(tmp_path / "base")
        model.backbone.tokenizer.save_pretrained(tmp_path / "base")
        model.config.backbone_source = str(tmp_path / "base")
        shutil.rmtree(tmp_path / "ok")
        model.save_pretrained(tmp_path / "ok", save_backbone=False)
    (tmp_path / "ok" / damaged).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"ok.*(icm|token_embeddings|backbone)") as info:
        RetrvR1Model.from_pretrained(tmp_path / "ok")
    assert "hub ids" not in str(info.value)  # a local folder: the offline hint would mislead


def test_mistyped_bundled_name_lists_the_bundled_checkpoints():
    with pytest.raises(ModelLoadError, match=r"did you mean 'retrv-r1-smollm2-wordnet'\?.*bundled checkpoints: .*retrv-r1-smollm2-wordnet"):
        RetrvR1Model.from_pretrained("retrv-r1-smollm2-wordnett")


def test_long_candidates_are_truncated_with_a_note():
    model = make_text_model(max_candidate_tokens=12)
    r = model.rank("q", ["word " * 200, "short"], reasoning_budget=0)
    assert any("candidate 0 truncated from" in n and "to 12 tokens" in n for n in r.notes)
    assert not any("candidate 1" in n for n in r.notes)


def test_full_token_prompt_is_fitted_to_the_context():
    model = make_text_model(max_context_tokens=400, max_candidate_tokens=4000)
    r = model.rank("q", ["word " * 300] * 4, compression="none", reasoning_budget=0)
    assert r.usage.prompt_tokens <= 400
    assert any("capped at" in n for n in r.notes)
    with pytest.raises(ContextOverflowError, match="context limit of 400.*lower reasoning_budget to at most"):
        model.rank("q", ["w"] * 4, compression="icm", reasoning_budget=390)
    prompt, _, _ = model.prepare("q", ["w"] * 4, compression="icm", think=True)
    over_by_one = 400 - 2 - len(prompt) + 1  # the candidates' 8 ICM tokens are what does not fit
    with pytest.raises(ContextOverflowError, match="context limit of 400.*pass fewer candidates"):
        model.rank("q", ["w"] * 4, compression="icm", reasoning_budget=over_by_one)
    # when the query alone is too long, fewer candidates would not help: the error says so
    long_query = make_text_model(max_context_tokens=400, max_query_tokens=4000)
    with pytest.raises(ContextOverflowError, match="without any candidate text already takes .*shorten the query"):
        long_query.rank("word " * 300, ["w"] * 4, compression="icm", reasoning_budget=100)


def test_full_token_prompt_with_images_is_fitted_to_the_context():
    """Image tokens are not shrunk, so the text cap leaves room for them."""
    model = make_vl_model(max_context_tokens=700, max_candidate_tokens=4000, system_prompt="Rank.")
    cands = [Candidate(text="word " * 300, image=solid((200, 10, 10), (224, 224))) for _ in range(3)]
    calls = []
    encode_images = model.backbone.encode_images
    model.backbone.encode_images = lambda images: calls.append(len(images)) or encode_images(images)
    r = model.rank("q", cands, compression="none", reasoning_budget=0)
    assert r.usage.prompt_tokens <= 700
    assert any("capped at" in n for n in r.notes)
    assert calls == [3]  # capping the text re-encodes it, not the images
    model.backbone.encode_images = encode_images
    short = [Candidate(text="word " * 20, image=c.image) for c in cands]
    fitted_prompt, _, _ = model.prepare("q", cands, compression="none", think=False)
    assert int((fitted_prompt.ids == model.backbone.image_token_id).sum()) == 3 * int(
        (model.prepare("q", short[:1], compression="none", think=False)[0].ids == model.backbone.image_token_id).sum())


def test_budget_and_closing_tokens_fit_the_context_limit():
    """A model that reasons to the end of its budget without answering gets </think><answer>
    appended: those two tokens must fit under max_context_tokens too."""
    model = make_text_model()
    budget = 10
    prompt, _, _ = model.prepare("q", TEXTS, think=True, reasoning_budget=budget)
    model.config.max_context_tokens = len(prompt) + budget + 1
    with pytest.raises(ContextOverflowError, match="and 2 closing tokens"):
        with scripted_generation(model, [" word"] * budget):
            model.rank("q", TEXTS, reasoning_budget=budget)
    model.config.max_context_tokens = len(prompt) + budget + 2
    with scripted_generation(model, [" word"] * budget):
        r = model.rank("q", TEXTS, reasoning_budget=budget)
    assert r.fallback == "forced_answer" and r.usage.context_tokens <= model.config.max_context_tokens


def test_full_token_prompt_with_the_query_repeated_is_fitted_to_the_context():
    model = make_text_model(max_context_tokens=700, max_candidate_tokens=4000, query_after_candidates=True, system_prompt="Rank.")
    r = model.rank("word " * 120, ["word " * 300] * 4, compression="none", reasoning_budget=0)
    assert r.usage.prompt_tokens <= 700
    assert any("capped at" in n for n in r.notes)


def test_full_token_prompt_with_labels_after_candidates_is_fitted_to_the_context():
    """With ``label_after_candidate`` each candidate's line carries 6 structural tokens
    (``<cand_i>: ... <cand_i>\n``); fitting reserved 4 and refused 64 candidates that fit
    with their text capped at 10 tokens. The cap is now the largest that fits."""
    model = make_text_model(max_candidates=64, label_after_candidate=True, max_candidate_tokens=4000)
    cands = ["The quick brown fox jumps over the lazy dog " * 3] * 64
    prompt, encoded, _ = model.prepare("q", cands, compression="none", think=True, reasoning_budget=16)
    fixed = len(prompt) - sum(len(e.chunk) for e in encoded)  # all but the candidates' own tokens
    for cap in (1, 10):
        model.config.max_context_tokens = fixed + 64 * cap + 16 + 2
        prompt, encoded, notes = model.prepare("q", cands, compression="none", think=True, reasoning_budget=16)
        assert [len(e.chunk) for e in encoded] == [cap] * 64, notes
        assert len(prompt) + 16 + 2 == model.config.max_context_tokens


def test_full_token_fitting_gives_the_room_of_short_candidates_to_long_ones():
    """One long candidate among short ones keeps as much text as fits, not an even share."""
    model = make_text_model(max_candidate_tokens=4000)
    cands = ["plants"] * 7 + ["word " * 300]
    prompt, encoded, _ = model.prepare("q", cands, compression="none", think=True, reasoning_budget=16)
    fixed = len(prompt) - sum(len(e.chunk) for e in encoded)
    short = sum(len(e.chunk) for e in encoded[:7])
    model.config.max_context_tokens = fixed + short + 100 + 16 + 2  # room for 100 tokens of the long one
    prompt, encoded, notes = model.prepare("q", cands, compression="none", think=True, reasoning_budget=16)
    assert [len(e.chunk) for e in encoded[:7]] == [len(e.chunk) for e in model.prepare("q", cands[:7], compression="none")[1]]
    assert len(encoded[7].chunk) == 100  # an even share would have been (short + 100) // 8
    assert len(prompt) + 16 + 2 == model.config.max_context_tokens
    assert any("capped at 100 tokens" in n for n in notes)
    assert model.rank("q", cands, compression="none", reasoning_budget=16).usage.context_tokens <= model.config.max_context_tokens


@pytest.mark.parametrize("mode", ["icm", "none"])
def test_the_largest_reasoning_budget_advised_fits(mode):
    """The advised budget counted each candidate as one token; in ICM mode each takes two,
    so the advice failed again. When even one token a candidate cannot fit, the advice is
    fewer candidates, never a negative budget."""
    import re

    model = make_text_model(max_context_tokens=400)
    cands = ["word " * 50] * 16
    with pytest.raises(ContextOverflowError, match="lower reasoning_budget to at most") as err:
        model.rank("q", cands, compression=mode, reasoning_budget=390)
    best = int(re.search(r"at most (-?\d+)", str(err.value)).group(1))
    assert model.rank("q", cands, compression=mode, reasoning_budget=best).scores
    with pytest.raises(ContextOverflowError):
        model.rank("q", cands, compression=mode, reasoning_budget=best + 1)
    prompt, _, _ = model.prepare("q", cands, compression="icm", think=True)
    fixed = len(prompt) - 2 * 16  # all but the candidates
    least = 2 * 16 if mode == "icm" else 16  # two ICM tokens, or one text token, a candidate
    model.config.max_context_tokens = fixed + 2 + least - 1  # one token short even with no reasoning
    with pytest.raises(ContextOverflowError, match=f"take at least {least} tokens.*pass fewer candidates"):
        model.rank("q", cands, compression=mode, reasoning_budget=1)


def test_no_answer_falls_back_and_strict_mode_raises(text_model):
    with scripted_generation(text_model, ["some", " words", "<|im_end|>"]):
        r = text_model.rank("q", TEXTS, reasoning_budget=30)
    assert r.fallback == "forced_answer" and any("without an answer" in n for n in r.notes)
    assert len(r.scores) == 3 and abs(sum(r.scores) - 1) < 1e-5
    with scripted_generation(text_model, ["some", "<|im_end|>"]):
        with pytest.raises(NoAnswerError, match="forced_answer"):
            text_model.rank("q", TEXTS, reasoning_budget=30, strict=True)


def test_answer_out_of_range_is_flagged():
    model = make_text_model(seed=7)
    with torch.no_grad():  # the model now always "answers" label 9 of 3 candidates
        model.backbone.lm_head.weight[model.special.labels[8]] *= 50
    r = model.rank("q", TEXTS, reasoning_budget=0)
    assert r.fallback == "answer_out_of_range" and r.answer is None
    assert any("label 9" in n for n in r.notes)
    assert abs(sum(r.scores) - 1) < 1e-5
    with pytest.raises(NoAnswerError):
        model.rank("q", TEXTS, reasoning_budget=0, strict=True)


def test_endless_and_repeated_inspections_end_cleanly(text_model):
    req = lambda i: ["<inspection-index-start>", f"<cand_{i}>", "<inspection-index-end>"]  # noqa: E731
    with scripted_generation(text_model, req(1) * 50):
        r = text_model.rank("q", TEXTS, reasoning_budget=500, max_inspections=2)
    assert r.inspected == [0]
    assert sum("already inspected" in n for n in r.notes) >= 2
    with scripted_generation(text_model, req(1) + req(2) + req(3) + ["<answer>"]):
        r = text_model.rank("q", TEXTS, reasoning_budget=500, max_inspections=2)
    assert r.inspected == [0, 1] and r.fallback == "forced_answer"
    assert any("inspection cap of 2" in n for n in r.notes)


def test_type_errors_are_clear(text_model):
    with pytest.raises(TypeError, match="Candidate or str"):
        text_model.rank("q", [3])
    with pytest.raises(TypeError, match="Query or str"):
        text_model.rank(42, ["a"])
    with pytest.raises(ValueError, match="compression"):
        text_model.rank("q", ["a"], compression="zip")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reasoning_budget=-1), "reasoning_budget must be a non-negative int, got -1"),
        (dict(max_inspections=-2), "max_inspections must be a non-negative int, got -2"),
        (dict(reasoning_budget=2.5), "reasoning_budget"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(do_sample=True, top_p=-0.5), "top_p"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(do_sample=True, temperature=-1.0), "temperature must be >= 0, got -1.0"),
        (dict(compression=""), "compression must be 'icm' or 'none', got ''"),  # was the default
        (dict(icm_batch_size=0), "icm_batch_size must be a positive int, got 0"),
    ],
)
def test_bad_generation_arguments_are_refused(text_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        text_model.rank("q", TEXTS, **kwargs)


def test_batch_sizes_are_checked_and_numpy_ints_are_ints(text_model):
    """encode_candidates(batch_size=-1) returned no content tokens at all; a numpy int (e.g.
    from a config array) was refused as icm_batch_size although reasoning_budget took it."""
    import numpy as np

    for bad in (-1, 0):
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bad}"):
            text_model.encode_candidates(TEXTS, batch_size=bad)
    assert len(text_model.encode_candidates(TEXTS, batch_size=np.int64(2))) == len(TEXTS)
    assert text_model.rank("q", TEXTS, icm_batch_size=np.int64(2), reasoning_budget=0).scores == \
        text_model.rank("q", TEXTS, icm_batch_size=2, reasoning_budget=0).scores


def test_direct_scoring_has_no_budget_note(text_model):
    r = text_model.rank("q", TEXTS, reasoning_budget=0)
    assert not any("budget" in n for n in r.notes), r.notes
    r = text_model.rank("q", TEXTS, reasoning_budget=3)
    assert any("budget of 3" in n for n in r.notes)
