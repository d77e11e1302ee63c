"""Model output faults, forced through ``scripted_generation``, end in a flagged fallback.

Each scenario runs the real decoding, splicing and scoring path with a forced model output
(no answer tag, an answer out of range, an answer before any thinking, endless or repeated
inspections, the token cap, garbage and unknown tokens, an inspection left open at the
budget, an inspection that would overflow the context) and checks: a well-formed ranking,
the documented ``fallback`` and note, the same flag in the LlamaIndex and LangChain
metadata (``retrv_r1_fallback``), and ``NoAnswerError`` only when strict mode is asked for.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from retrv_r1_plugin.testing import scripted_generation
from retrv_r1_plugin.tokens import STRUCTURAL_TOKENS
from retrv_r1_plugin.types import NoAnswerError, RankResult

from conftest import make_text_model

pytest.importorskip("llama_index.core")
pytest.importorskip("langchain_core")

from langchain_core.documents import Document  # noqa: E402
from llama_index.core.schema import NodeWithScore, TextNode  # noqa: E402

from retrv_r1_plugin.integrations.langchain import RetrvR1Compressor  # noqa: E402
from retrv_r1_plugin.integrations.llama_index import RetrvR1Reranker  # noqa: E402

#: Hypothesis examples per test in this file (counted with tests/test_properties.py).
FAULT_EXAMPLES = {"random_model_output": 300}

QUERY = "which passage explains photosynthesis?"
TEXTS = ["plants turn light into sugar", "a rocket climbs into the sky", "coffee in a white cup"]


def req(i: int) -> list[str]:
    return ["<inspection-index-start>", f"<cand_{i}>", "<inspection-index-end>"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return make_text_model(seed=0, max_candidates=16)


@contextlib.contextmanager
def boosted(model, token_id: int, amount: float = 100.0):
    """Make ``token_id`` the model's argmax at every position (a hook on the LM head)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_id] += amount
        return output

    handle = model.backbone.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def label_id(model, i: int) -> int:
    return model.special.labels[i]


def plain_token_id(model) -> int:
    return model.tokenizer("~", add_special_tokens=False)["input_ids"][0]  # in no prompt here


@dataclass
class Fault:
    name: str
    script: list
    kwargs: dict
    fallback: str | None
    note: str | None = None  # regex one of the notes must match
    boost: str | None = "label2"  # the answer argmax: "label2" (a valid one), "label9" (of 3), "plain" (no label)
    inspected: list[int] | None = None
    generated: int | None = None  # usage.generated_tokens (written + forced)
    extra: dict = field(default_factory=dict)


def unknown_ids(model) -> list[int]:
    """Ids the model can emit but the tokenizer does not know (the padded vocab rows)."""
    vocab = model.backbone.lm_head.weight.shape[0]
    return [len(model.tokenizer), len(model.tokenizer) + 7, vocab - 1]


def garbage(model) -> list:
    return [
        *unknown_ids(model), "<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|im_start|>", "</answer>",
        "<inspected>", "</inspected>", "<|cand_content|>", "<|cand_relation|>", "<think>", "<inspection-index-end>",
        "\x00", "\u202e", "🙂", "<cand_16>",
    ]


FAULTS = [
    Fault("no_answer_tag_output_ends", ["some", " words"], dict(reasoning_budget=30), "forced_answer", "scripted output ended"),
    Fault("no_answer_tag_eos", ["some", " words", "<|im_end|>"], dict(reasoning_budget=30), "forced_answer", "ended its output without an answer"),
    # </think> written earlier: only the missing <answer> is appended (1 forced token)
    Fault("closed_think_then_eos", ["</think>", "<|im_end|>"], dict(reasoning_budget=30), "forced_answer", "without an answer", generated=3),
    Fault("answer_out_of_range_direct", [], dict(reasoning_budget=0), "answer_out_of_range", r"answer was label 9, not one of the 3", boost="label9"),
    Fault("answer_out_of_range_after_thinking", ["hmm", "</think>", "<answer>"], dict(reasoning_budget=20), "answer_out_of_range", "label 9", boost="label9"),
    Fault("answer_is_not_a_label", [], dict(reasoning_budget=0), "answer_out_of_range", r"answer was token .*not one of the 3", boost="plain"),
    # an answer before any thinking is still the model's own answer (README: not a fallback)
    Fault("answer_before_thinking", ["<answer>"], dict(reasoning_budget=20), None, None, generated=1),
    Fault("answer_before_thinking_out_of_range", ["<answer>"], dict(reasoning_budget=20), "answer_out_of_range", "label 9", boost="label9"),
    Fault("endless_inspections_hit_the_cap", (req(1) + req(2) + req(3)) * 20, dict(reasoning_budget=500, max_inspections=2), "forced_answer", "inspection cap of 2", inspected=[0, 1]),
    Fault("endless_inspections_hit_the_budget", (req(1) + req(2) + req(3)) * 20, dict(reasoning_budget=25, max_inspections=10), "forced_answer", "budget of 25", inspected=[0, 1, 2], generated=27),
    Fault("same_candidate_twice_then_answer", req(2) + req(2) + ["</think>", "<answer>"], dict(reasoning_budget=50), None, "candidate 1 was already inspected", inspected=[1]),
    Fault("same_candidate_twice_no_answer", req(2) + req(2), dict(reasoning_budget=50), "forced_answer", "candidate 1 was already inspected", inspected=[1]),
    Fault("token_cap", ["word"] * 100, dict(reasoning_budget=10), "forced_answer", "reasoning stopped at the budget of 10", generated=12),
    Fault("garbage_tokens", "garbage", dict(reasoning_budget=60), "forced_answer", "scripted output ended"),
    Fault("garbage_tokens_then_answer", "garbage+answer", dict(reasoning_budget=60), None, None),
    Fault("inspection_left_open_at_budget", ["<inspection-index-start>", "<cand_1>"], dict(reasoning_budget=2), "forced_answer", "budget of 2", inspected=[], generated=4),
    Fault("inspection_left_open_then_eos", ["<inspection-index-start>", "<cand_2>", "<|im_end|>"], dict(reasoning_budget=20), "forced_answer", "without an answer", inspected=[]),
    Fault("inspection_of_a_missing_label", req(9) + ["</think>", "<answer>"], dict(reasoning_budget=20), None, "named no valid candidate", inspected=[]),
    Fault("inspection_naming_two_labels", ["<inspection-index-start>", "<cand_1>", "<cand_2>", "<inspection-index-end>", "<answer>"], dict(reasoning_budget=20), None, "named no valid candidate", inspected=[]),
    Fault("no_inspection_in_full_token_mode", req(1) + ["<|im_end|>"], dict(reasoning_budget=20, compression="none"), "forced_answer", "inspection request ignored", inspected=[]),
]


def script_of(model, fault: Fault) -> list:
    if fault.script == "garbage":
        return garbage(model)
    if fault.script == "garbage+answer":
        return garbage(model) + ["<answer>"]
    return fault.script


@contextlib.contextmanager
def fault_setup(model, fault: Fault):
    boost = contextlib.nullcontext()
    if fault.boost == "label2":
        boost = boosted(model, label_id(model, 1))
    elif fault.boost == "label9":
        boost = boosted(model, label_id(model, 8))
    elif fault.boost == "plain":
        boost = boosted(model, plain_token_id(model))
    with boost, scripted_generation(model, script_of(model, fault)):
        yield


def check_ranking(result: RankResult, k: int) -> None:
    assert len(result.scores) == k and len(result.candidates) == k
    assert all(math.isfinite(s) and 0 <= s <= 1 for s in result.scores)
    assert math.isclose(sum(result.scores), 1.0, abs_tol=1e-5)
    assert result.order == sorted(range(k), key=lambda i: (-result.scores[i], i))
    assert (result.answer is None) == (result.fallback is not None)
    assert isinstance(result.reasoning, str)
    assert len(set(result.inspected)) == len(result.inspected) and all(0 <= i < k for i in result.inspected)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_ends_in_the_documented_fallback(model, fault):
    with fault_setup(model, fault):
        result = model.rank(QUERY, TEXTS, **fault.kwargs)
        again = model.rank(QUERY, TEXTS, **fault.kwargs)
    check_ranking(result, len(TEXTS))
    assert result.fallback == fault.fallback, result.notes
    if fault.note:
        assert any(re.search(fault.note, n) for n in result.notes), result.notes
    if fault.inspected is not None:
        assert result.inspected == fault.inspected
    if fault.generated is not None:
        assert result.usage.generated_tokens == fault.generated
    if fault.fallback is None:
        assert result.answer == result.order[0] == 1  # the boosted label
    assert again.scores == result.scores and again.notes == result.notes  # greedy: reproducible
    assert again.reasoning == result.reasoning and again.fallback == result.fallback and again.inspected == result.inspected


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_strict_mode_raises_only_on_a_fallback(model, fault):
    with fault_setup(model, fault):
        if fault.fallback is None:
            assert model.rank(QUERY, TEXTS, strict=True, **fault.kwargs).fallback is None
        else:
            with pytest.raises(NoAnswerError, match=fault.fallback):
                model.rank(QUERY, TEXTS, strict=True, **fault.kwargs)


def _adapter_kwargs(fault: Fault) -> dict:
    return {k: v for k, v in fault.kwargs.items() if k in ("reasoning_budget", "max_inspections", "compression")}


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_llama_index_metadata_flags_the_fallback(model, fault):
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=1.0 - i / 10) for i, t in enumerate(TEXTS)]
    reranker = RetrvR1Reranker(model=model, top_n=None, metadata_mode="none", **_adapter_kwargs(fault))
    with fault_setup(model, fault):
        direct = model.rank(QUERY, TEXTS, **fault.kwargs)
        out = reranker.postprocess_nodes(nodes, query_str=QUERY)  # never raises without strict
    assert [n.node.node_id for n in out] == [f"n{i}" for i in direct.order]
    for n in out:
        i = int(n.node.node_id[1:])
        assert n.score == direct.scores[i]
        assert n.node.metadata["retrv_r1_fallback"] == fault.fallback
        assert n.node.metadata["retrv_r1_inspected"] == (i in direct.inspected)
    strict = RetrvR1Reranker(model=model, top_n=None, strict=True, metadata_mode="none", **_adapter_kwargs(fault))
    with fault_setup(model, fault):
        if fault.fallback is None:
            assert len(strict.postprocess_nodes(nodes, query_str=QUERY)) == len(TEXTS)
        else:
            with pytest.raises(NoAnswerError, match=fault.fallback):
                strict.postprocess_nodes(nodes, query_str=QUERY)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_langchain_metadata_flags_the_fallback(model, fault):
    docs = [Document(page_content=t, id=f"d{i}", metadata={"source": "test"}) for i, t in enumerate(TEXTS)]
    compressor = RetrvR1Compressor(model=model, top_n=None, **_adapter_kwargs(fault))
    with fault_setup(model, fault):
        direct = model.rank(QUERY, TEXTS, **fault.kwargs)
        out = compressor.compress_documents(docs, QUERY)  # never raises without strict
    assert [d.id for d in out] == [f"d{i}" for i in direct.order]
    for d in out:
        i = int(d.id[1:])
        assert d.metadata["relevance_score"] == direct.scores[i] and d.metadata["source"] == "test"
        assert d.metadata["retrv_r1_fallback"] == fault.fallback
        assert d.metadata["retrv_r1_inspected"] == (i in direct.inspected)
    strict = RetrvR1Compressor(model=model, top_n=None, strict=True, **_adapter_kwargs(fault))
    with fault_setup(model, fault):
        if fault.fallback is None:
            assert len(strict.compress_documents(docs, QUERY)) == len(TEXTS)
        else:
            with pytest.raises(NoAnswerError, match=fault.fallback):
                strict.compress_documents(docs, QUERY)


def test_inspection_that_would_overflow_the_context_is_not_spliced():
    """A splice may not push the context past the limit: reasoning stops, flagged."""
    model = make_text_model(seed=2, max_context_tokens=320, max_candidate_tokens=200)
    long_texts = ["word " * 150, "grain " * 150, "short"]
    with scripted_generation(model, req(3) + req(1) + ["<answer>"]):
        result = model.rank(QUERY, long_texts, reasoning_budget=20, max_inspections=3)
    check_ranking(result, 3)
    assert result.inspected == [2]  # the short one fits, the long one would not
    assert result.fallback == "forced_answer"
    assert any("inspecting candidate 0 would exceed the context limit of 320" in n for n in result.notes)
    assert result.usage.context_tokens <= 320
    with scripted_generation(model, req(3) + req(1) + ["<answer>"]):
        with pytest.raises(NoAnswerError, match="forced_answer"):
            model.rank(QUERY, long_texts, reasoning_budget=20, max_inspections=3, strict=True)


# ------------------------------------------------------------------ arbitrary model output
def _token_pool(model) -> list[int]:
    tok = model.tokenizer
    added = tok.get_added_vocab()
    ids = [added[t] for t in STRUCTURAL_TOKENS] + list(model.special.labels) + list(model.special.eos)
    ids += [added[t] for t in ("<|im_start|>", "<|image_pad|>", "<|vision_start|>", "<|endoftext|>")]
    ids += unknown_ids(model) + tok("plants light sugar", add_special_tokens=False)["input_ids"]
    return sorted(set(ids))


@settings(
    max_examples=FAULT_EXAMPLES["random_model_output"],
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)
@given(data=st.data(), budget=st.integers(0, 20), max_inspections=st.integers(0, 3), k=st.integers(1, 5), strict=st.booleans())
def test_arbitrary_model_output_never_breaks_ranking(model, data, budget, max_inspections, k, strict):
    pool = _token_pool(model)
    vocab = model.backbone.lm_head.weight.shape[0]
    script = data.draw(st.lists(st.one_of(st.sampled_from(pool), st.integers(0, vocab - 1)), max_size=30), label="script")
    texts = [f"candidate {i} " + "about plants " * i for i in range(k)]
    sp = model.special
    with scripted_generation(model, script):
        if strict:
            try:
                result = model.rank(QUERY, texts, reasoning_budget=budget, max_inspections=max_inspections, strict=True)
            except NoAnswerError as exc:
                assert re.search("forced_answer|answer_out_of_range", str(exc))
                return
            assert result.fallback is None
        else:
            result = model.rank(QUERY, texts, reasoning_budget=budget, max_inspections=max_inspections)
    check_ranking(result, k)
    assert len(result.inspected) <= max_inspections
    requested = {sp.label_index(t) for t in script if sp.label_index(t) is not None}
    assert set(result.inspected) <= requested
    assert result.usage.generated_tokens <= budget + 2
    consumed = script[:budget]
    if budget == 0:
        assert result.fallback in (None, "answer_out_of_range") and result.usage.generated_tokens == 0
    elif sp.answer_start not in consumed:
        assert result.fallback == "forced_answer"
    elif consumed[0] == sp.answer_start:
        assert result.fallback != "forced_answer" and result.usage.generated_tokens == 1
    if result.fallback == "forced_answer":
        assert result.notes
