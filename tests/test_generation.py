"""Inspection-aware decoding: KV-cache splices, scripted outputs, the state machine."""

import re
import warnings

import pytest
import torch

from retrv_r1_plugin.context import cat_chunks
from retrv_r1_plugin.generation import InspectionMachine, SamplingConfig, assemble_trace
from retrv_r1_plugin.testing import scripted_generation
from retrv_r1_plugin.types import Candidate, Query

from conftest import make_text_model, make_vl_model, solid

INSPECT_2 = ["<inspection-index-start>", "<cand_2>", "<inspection-index-end>"]


def _record_runs(model):
    """Wrap the decoder so every chunk run and the logits it returned are recorded."""
    runs = []
    original = model.decoder._run

    def run(chunk, state):
        logits = original(chunk, state)
        runs.append((len(chunk), chunk.role, logits.clone()))
        return logits

    model.decoder._run = run
    return runs


def _fresh_logits(model, chunks):
    """One forward over the whole concatenated sequence, positions computed from scratch."""
    full = cat_chunks(chunks)
    bb = model.backbone
    pos, _ = bb.positions(full.ids, full.grids, 0)
    deep = mask = None
    if full.deepstack is not None:
        deep, mask = full.deepstack, (full.ids == bb.image_token_id).unsqueeze(0)
    with torch.inference_mode():
        logits, _ = bb.forward(full.embeds.unsqueeze(0), pos, None, deepstack=deep, visual_mask=mask, logits="all")
    return logits[0].float()


def _candidates(with_images: bool):
    if not with_images:
        return ["plants turn light into sugar", "a rocket in the sky", "coffee in a white cup"]
    return [
        Candidate(text="a red square", image=solid((220, 20, 20))),
        Candidate(image=solid((20, 220, 20), (84, 56))),
        Candidate(text="blue", image=solid((20, 20, 220), (56, 112))),
    ]


@pytest.mark.parametrize(
    "kind",
    ["text", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"],
)
def test_logits_after_splice_equal_fresh_forward(kind):
    model = make_text_model() if kind == "text" else make_vl_model(kind)
    vision = kind != "text"
    query = Query(text="which one is green?", image=solid((20, 200, 20)) if vision else None)
    runs = _record_runs(model)
    script = ["the", " cat"] + INSPECT_2 + ["ok"] + ["<inspection-index-start>", "<cand_1>", "<inspection-index-end>", "<answer>"]
    with scripted_generation(model, script), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.rank(query, _candidates(vision), reasoning_budget=50, max_inspections=3)
    # the KV cache goes in under the decoder's current name (``cache``, not the deprecated
    # ``past_key_values``); the step-by-step comparison below shows it is really used
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert result.inspected == [1, 0]
    assert result.fallback != "forced_answer"  # the script opened <answer> itself
    # Rebuild the exact sequence the decoder ran and compare every recorded step.
    prompt, encoded, _ = model.prepare(query, _candidates(vision), think=True, reasoning_budget=50)
    seq, machine = assemble_trace(
        model.builder, model.special, prompt, encoded,
        scripted_generation(model, script).ids, reasoning_budget=50, max_inspections=3,
    )
    assert [c.role for c in seq].count("spliced") == 2
    assert sum(n for n, _, _ in runs) == sum(len(c) for c in seq)
    fresh = _fresh_logits(model, seq)
    end = 0
    for n, role, logits in runs:
        end += n
        torch.testing.assert_close(logits, fresh[end - 1], atol=2e-4, rtol=2e-4, msg=f"after a {role} chunk")
    # the splice carried the candidate's full tokens, images included
    spliced = [c for c in seq if c.role == "spliced"]
    if vision:
        assert spliced[0].grids and spliced[1].grids
    assert result.usage.inspection_tokens == sum(len(c) for c in spliced)


def test_cache_keyword_follows_the_forward_signature():
    from retrv_r1_plugin.backbone import _cache_kwarg

    class Old:
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None, **kwargs):
            pass

    class New:
        def forward(self, inputs_embeds=None, cache=None, use_cache=None, **kwargs):
            pass

    assert _cache_kwarg(Old) == "past_key_values" and _cache_kwarg(New) == "cache"


def test_text_and_vl_models_inspect_with_icm_only():
    model = make_text_model()
    with scripted_generation(model, INSPECT_2 + ["<answer>"]):
        full = model.rank("q", _candidates(False), compression="none", reasoning_budget=20)
    assert full.inspected == []
    assert any("already in full tokens" in n for n in full.notes)


def test_greedy_decoding_is_deterministic_and_sampling_is_seeded(text_model):
    a = text_model.rank("q", _candidates(False), reasoning_budget=8)
    b = text_model.rank("q", _candidates(False), reasoning_budget=8)
    assert a.scores == b.scores and a.reasoning == b.reasoning
    s1 = text_model.rank("q", _candidates(False), reasoning_budget=8, do_sample=True, seed=3)
    s2 = text_model.rank("q", _candidates(False), reasoning_budget=8, do_sample=True, seed=3)
    s3 = text_model.rank("q", _candidates(False), reasoning_budget=8, do_sample=True, seed=4)
    assert s1.reasoning == s2.reasoning
    assert s1.reasoning != s3.reasoning


def test_unseeded_sampling_draws_from_the_global_rng(text_model):
    """Without seed=, samples differ from call to call (they were all seed 0's) and follow
    torch.manual_seed; a seed that is not an int is refused by name."""
    draws = {text_model.rank("q", _candidates(False), reasoning_budget=8, do_sample=True).reasoning for _ in range(3)}
    assert len(draws) > 1
    torch.manual_seed(11)
    first = text_model.rank("q", _candidates(False), reasoning_budget=8, do_sample=True)
    torch.manual_seed(11)
    again = text_model.rank("q", _candidates(False), reasoning_budget=8, do_sample=True)
    assert first.reasoning == again.reasoning and first.scores == again.scores
    for seed in ("7", 1.5, True, 2**70):
        with pytest.raises(ValueError, match=f"seed must be None or an int.*got {re.escape(repr(seed))}"):
            text_model.rank("q", _candidates(False), reasoning_budget=8, do_sample=True, seed=seed)


def test_tiny_top_p_samples_the_top_token(text_model):
    """A nucleus smaller than the top token's probability keeps that token: sampling is greedy."""
    greedy = text_model.rank("q", _candidates(False), reasoning_budget=8)
    for seed in (0, 1):
        nucleus = text_model.rank("q", _candidates(False), reasoning_budget=8, do_sample=True, top_p=1e-6, seed=seed)
        assert nucleus.reasoning == greedy.reasoning
    free = text_model.rank("q", _candidates(False), reasoning_budget=8, do_sample=True, top_p=1.0, seed=0)
    assert free.reasoning != greedy.reasoning  # the check above is not vacuous


def test_pick_keeps_the_top_token_even_with_an_empty_nucleus(text_model):
    sampling = SamplingConfig(do_sample=True, top_p=0.5)
    sampling.top_p = 0.0  # bypasses validation: the sampler itself must still not crash
    logits = torch.tensor([0.0, 3.0, 1.0])
    tok, logp = text_model.decoder._pick(logits, sampling, torch.Generator().manual_seed(0))
    assert tok == 1 and logp < 0


class TestInspectionMachine:
    @pytest.fixture
    def special(self, text_model):
        return text_model.special

    def test_valid_request_splices_once(self, special):
        m = InspectionMachine(special, num_candidates=3, budget=100, max_inspections=2)
        out = [m.step(t) for t in [special.inspect_start, special.labels[2], special.inspect_end]]
        assert out == [None, None, 2] and m.inspected == [2]
        out = [m.step(t) for t in [special.inspect_start, special.labels[2], special.inspect_end]]
        assert out[-1] is None and "already inspected" in m.notes[-1]

    def test_out_of_range_and_garbage_requests_are_ignored(self, special):
        m = InspectionMachine(special, num_candidates=3, budget=100, max_inspections=2)
        assert m.step(special.inspect_start) is None
        assert m.step(special.labels[7]) is None
        assert m.step(special.inspect_end) is None
        assert m.inspected == [] and "no valid candidate" in m.notes[-1]
        m.step(special.inspect_start)
        m.step(special.labels[0])
        m.step(special.labels[1])
        assert m.step(special.inspect_end) is None and m.inspected == []

    def test_cap_stops_reasoning(self, special):
        m = InspectionMachine(special, num_candidates=3, budget=100, max_inspections=1)
        for label in (0, 1):
            for t in [special.inspect_start, special.labels[label], special.inspect_end]:
                m.step(t)
        assert m.inspected == [0] and m.done and m.stop_reason == "inspection_cap"

    def test_budget_and_answer(self, special):
        m = InspectionMachine(special, num_candidates=3, budget=2, max_inspections=1)
        m.step(special.think_end)
        assert not m.done
        m.step(special.inspect_start)
        assert m.done and m.stop_reason == "reasoning_budget"
        m0 = InspectionMachine(special, num_candidates=3, budget=0, max_inspections=1)
        assert m0.done and m0.notes == []  # direct scoring: nothing was cut short
        with pytest.raises(ValueError, match="reasoning_budget"):
            InspectionMachine(special, num_candidates=3, budget=-1, max_inspections=1)
        m2 = InspectionMachine(special, num_candidates=3, budget=5, max_inspections=1)
        m2.step(special.answer_start)
        assert m2.done and m2.wrote_answer


def test_sampling_config_defaults_are_greedy():
    assert SamplingConfig().do_sample is False


@pytest.mark.parametrize("kind", ["text", "qwen2_5_vl"])
def test_shared_prompt_prefix_is_prefilled_once_and_changes_nothing(kind):
    model = make_text_model() if kind == "text" else make_vl_model(kind)
    vision = kind != "text"
    queries = [Query(text="which one is green?", image=solid((20, 200, 20)) if vision else None), Query(text="a rocket")]
    runs = _record_runs(model)
    cached = [model.rank(q, _candidates(vision), reasoning_budget=4, max_inspections=1) for q in queries]
    prefix_len = len(model.builder.shared_prefix())
    prompt_runs = [n for n, role, _ in runs if role == "prompt"]
    assert prompt_runs.count(prefix_len) == 1  # the prefix ran once, for the first query only
    model.decoder.prefix_caching = False
    fresh = [model.rank(q, _candidates(vision), reasoning_budget=4, max_inspections=1) for q in queries]
    for a, b in zip(cached, fresh):
        assert a.order == b.order and a.reasoning == b.reasoning
        torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), atol=1e-4, rtol=1e-4)
        assert a.usage.prompt_tokens == b.usage.prompt_tokens  # usage counts the whole prompt


def test_prefix_cache_is_dropped_when_weights_change():
    model = make_text_model()
    cands = _candidates(False)
    model.rank("plants", cands, reasoning_budget=0)
    assert model.decoder._prefix is not None
    with torch.no_grad():
        model.backbone.model.get_input_embeddings().weight.mul_(1.5)  # weights changed in place...
    model.invalidate_signature()  # ...and announced, as training does after every step
    assert model.decoder._prefix is None
    after = model.rank("plants", cands, reasoning_budget=0).scores
    model.decoder.prefix_caching = False
    torch.testing.assert_close(torch.tensor(after), torch.tensor(model.rank("plants", cands, reasoning_budget=0).scores), atol=1e-5, rtol=1e-5)


def test_no_prefix_cache_while_training():
    model = make_text_model()
    model.backbone.model.train()
    try:
        model.rank("plants", _candidates(False), reasoning_budget=0)
    finally:
        model.backbone.model.eval()
    assert model.decoder._prefix is None


@pytest.mark.parametrize("move", ["model", "lm"])
def test_prefix_cache_follows_a_dtype_change(move):
    """The prefix KV cache of a float32 model is not reused once the model is cast (or moved):
    its keys and values would not match the new dtype (a crash) or device."""
    model = make_text_model()
    cands = _candidates(False)
    model.rank("plants", cands, reasoning_budget=2)
    signature = model.content_signature
    (model if move == "model" else model.lm).to(torch.bfloat16)
    cast = model.rank("plants", cands, reasoning_budget=2)
    model.decoder.prefix_caching = False
    fresh = model.rank("plants", cands, reasoning_budget=2)
    assert cast.scores == fresh.scores and cast.reasoning == fresh.reasoning
    if move == "model":  # the signature hashes the dtype: cached content tokens are stale
        assert model.content_signature != signature


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_the_model_never_writes_image_placeholders(kind, do_sample):
    """``<|image_pad|>`` / ``<|video_pad|>`` stand for vision-tower embeddings that only the
    system places. A written one has no image behind it: the decoder ran it at 1-D positions,
    while mRoPE positions over the whole sequence (training's forward, the fresh forward
    below) could not be computed at all (``get_rope_index`` ran out of image grids)."""
    model = make_vl_model(kind)
    cfg = model.backbone.config
    pads = [cfg.image_token_id, cfg.video_token_id]

    def prefer_pads(module, inputs, logits):  # the model wants a placeholder at every position
        logits = logits.clone()
        logits[..., pads[0]] += 50.0
        logits[..., pads[1]] += 49.0
        return logits

    model.backbone.lm_head.register_forward_hook(prefer_pads)
    query = Query(text="which one is green?", image=solid((20, 200, 20)))
    runs = _record_runs(model)
    result = model.rank(query, _candidates(True), reasoning_budget=4, do_sample=do_sample, seed=1)
    prompt, encoded, _ = model.prepare(query, _candidates(True), think=True, reasoning_budget=4)
    assert [role for _, role, _ in runs].count("generated") == 4
    with torch.inference_mode():
        trace = model.decoder.decode(prompt, encoded, reasoning_budget=4, max_inspections=1,
                                     sampling=SamplingConfig(do_sample=do_sample, seed=1))
    assert len(trace.generated_ids) == 4 and not set(trace.generated_ids) & set(pads)
    assert result.usage.generated_tokens == 4 + 2  # four written, then the forced </think><answer>
    fresh = _fresh_logits(model, trace.chunks)  # positions over the whole sequence can be computed
    torch.testing.assert_close(trace.answer_logits, fresh[-1], atol=2e-4, rtol=2e-4)



@pytest.mark.parametrize("first", [False, True], ids=["plain_first", "autocast_first"])
def test_prefix_cache_follows_autocast(first):
    """Training under ``mixed_precision: bf16`` samples rollouts under autocast: a prefix KV
    cache computed without it (or under it, then reused by a plain ``rank``) holds other keys
    and values (~1e-4 apart in the scores here), and the sampled log-probs would no longer be
    those training recomputes."""
    model = make_text_model()
    cands = _candidates(False)

    def rank(autocast: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return torch.tensor(model.rank("plants", cands, reasoning_budget=2).scores)

    rank(first)  # the prefix KV cache is computed in this mode
    cached = {mode: rank(mode) for mode in (not first, first)}
    model.decoder.prefix_caching = False
    for mode, scores in cached.items():
        torch.testing.assert_close(scores, rank(mode), atol=1e-6, rtol=0)
