"""LangChain adapters: RetrvR1Retriever (standard suite) and RetrvR1Compressor, real Qdrant + MiniLM."""

from __future__ import annotations

import base64
import functools
import importlib
import json
import math
import sys
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("langchain_core")

from langchain_classic.retrievers import ContextualCompressionRetriever  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402
from langchain_tests.integration_tests import RetrieversIntegrationTests  # noqa: E402

from retrv_r1_plugin import RetrvR1Model  # noqa: E402
from retrv_r1_plugin._optional import MissingExtraError  # noqa: E402
from retrv_r1_plugin.integrations.langchain import (  # noqa: E402
    RetrvR1Compressor,
    RetrvR1Retriever,
    candidate_to_document,
    document_to_candidate,
)
from retrv_r1_plugin.store import QdrantCandidateStore, TextEmbedder  # noqa: E402
from retrv_r1_plugin.testing import scripted_generation  # noqa: E402
from retrv_r1_plugin.types import Candidate, ImageLoadError, NoAnswerError, Query  # noqa: E402

from conftest import boost_label, make_text_model, make_vl_model  # noqa: E402

CORPUS = [
    ("photo", "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar."),
    ("rocket", "The rocket launched from the pad and climbed into the blue sky."),
    ("chloro", "Chlorophyll in leaves absorbs light for photosynthesis."),
    ("coffee", "A cup of coffee is served in a white mug."),
    ("grow", "Plants need light to grow and produce oxygen."),
    ("cat", "The cat slept on the sofa all afternoon."),
    ("paris", "Paris is the capital and largest city of France."),
    ("bread", "Bread is baked from a dough of flour and water."),
]
QUESTION = "how do plants make sugar from light?"
WINNER = 2  # the boosted label: the 3rd first-stage candidate wins


@functools.cache
def minilm() -> TextEmbedder:
    return TextEmbedder()


@functools.cache
def text_store() -> QdrantCandidateStore:
    store = QdrantCandidateStore(minilm(), location=":memory:", collection_name="lc_docs")
    store.add([Candidate(text, id=cid, metadata={"source": "corpus"}) for cid, text in CORPUS], show_progress=False)
    return store


@functools.cache
def tiny_text_model():
    return make_text_model(seed=0, max_candidates=16)


@functools.cache
def boosted_model():
    model = make_text_model(seed=1, max_candidates=16)
    return boost_label(model, WINNER)


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 (the offline bundled model) as LangChain embeddings."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return minilm().embed_texts(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return minilm().embed_queries([text])[0].tolist()


@functools.cache
def vector_store() -> InMemoryVectorStore:
    vs = InMemoryVectorStore(MiniLMEmbeddings())
    vs.add_documents([Document(page_content=text, id=cid, metadata={"source": "corpus"}) for cid, text in CORPUS])
    return vs


# ------------------------------------------------------------------ the standard suite


class TestRetrvR1RetrieverStandard(RetrieversIntegrationTests):
    """langchain-tests==1.1.9 standard retriever tests, on a real in-memory Qdrant store."""

    @property
    def retriever_constructor(self) -> type[RetrvR1Retriever]:
        return RetrvR1Retriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"model": tiny_text_model(), "store": text_store(), "k": 2, "reasoning_budget": 2}

    @property
    def retriever_query_example(self) -> str:
        return QUESTION

    @property
    def num_results_arg_name(self) -> str:
        return "k"


class TestRetrvR1RetrieverStandardOverBaseRetriever(TestRetrvR1RetrieverStandard):
    """The same suite with candidates from another LangChain retriever."""

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        base = vector_store().as_retriever(search_kwargs={"k": 6})
        return {"model": tiny_text_model(), "base_retriever": base, "k": 2, "reasoning_budget": 2}


# ------------------------------------------------------------------ retriever


def test_documents_are_ordered_by_the_models_scores():
    model = boosted_model()
    retriever = RetrvR1Retriever(model=model, store=text_store(), k=4, first_stage_k=5, reasoning_budget=3)
    docs = retriever.invoke(QUESTION)
    first_stage = text_store().search(QUESTION, top_k=5)
    direct = model.rank(QUESTION, first_stage, reasoning_budget=3)
    assert len(docs) == 4
    assert docs[0].id == first_stage[WINNER].id and docs[0].metadata["relevance_score"] > 0.9
    assert [d.id for d in docs] == [first_stage[i].id for i in direct.order[:4]]
    assert [d.metadata["relevance_score"] for d in docs] == pytest.approx([direct.scores[i] for i in direct.order[:4]])
    scores = [d.metadata["relevance_score"] for d in docs]
    assert scores == sorted(scores, reverse=True)


def test_metadata():
    retriever = RetrvR1Retriever(model=tiny_text_model(), store=text_store(), k=3, reasoning_budget=4)
    docs = retriever.invoke(QUESTION)
    texts = dict(CORPUS)
    # the default first stage is every stored document (8 < min(20, max_candidates)); rank it directly
    first_stage = text_store().search(QUESTION, top_k=16)
    direct = tiny_text_model().rank(QUESTION, first_stage, reasoning_budget=4)
    position = {c.id: i for i, c in enumerate(first_stage)}
    assert len(first_stage) == len(CORPUS) and [d.id for d in docs] == [first_stage[i].id for i in direct.order[:3]]
    assert direct.reasoning and direct.fallback == "forced_answer"  # a random model never answers by itself
    for doc in docs:
        assert doc.page_content == texts[doc.id]
        meta = doc.metadata
        i = position[doc.id]
        assert meta["source"] == "corpus"
        assert isinstance(meta["relevance_score"], float) and meta["relevance_score"] == pytest.approx(direct.scores[i])
        # the first-stage (cosine) score, kept
        assert isinstance(meta["retrieval_score"], float) and meta["retrieval_score"] == pytest.approx(first_stage[i].metadata["retrieval_score"])
        assert meta["retrv_r1_reasoning"] == direct.reasoning
        assert meta["retrv_r1_inspected"] is False
        assert meta["retrv_r1_fallback"] == direct.fallback
    quiet = RetrvR1Retriever(model=tiny_text_model(), store=text_store(), k=2, reasoning_budget=0, return_reasoning=False)
    assert all("retrv_r1_reasoning" not in d.metadata for d in quiet.invoke(QUESTION))


def test_inspection_and_fallback_flags_and_strict():
    model = make_text_model(seed=4)
    retriever = RetrvR1Retriever(model=model, store=text_store(), k=3, first_stage_k=3, reasoning_budget=40)
    script = ["<inspection-index-start>", "<cand_1>", "<inspection-index-end>", "<answer>"]
    with scripted_generation(model, script):
        docs = retriever.invoke(QUESTION)
    first_id = text_store().search(QUESTION, top_k=3)[0].id
    assert {d.id: d.metadata["retrv_r1_inspected"] for d in docs} == {d.id: d.id == first_id for d in docs}
    with scripted_generation(model, ["some", "<|im_end|>"]):
        docs = retriever.invoke(QUESTION)
    assert all(d.metadata["retrv_r1_fallback"] == "forced_answer" for d in docs)
    strict = RetrvR1Retriever(model=model, store=text_store(), k=3, first_stage_k=3, reasoning_budget=40, strict=True)
    with scripted_generation(model, ["some", "<|im_end|>"]), pytest.raises(NoAnswerError):
        strict.invoke(QUESTION)


def test_k_and_first_stage_k_overrides():
    model = tiny_text_model()
    retriever = RetrvR1Retriever(model=model, store=text_store(), k=4, reasoning_budget=0)
    assert len(retriever.invoke(QUESTION)) == 4
    assert len(retriever.invoke(QUESTION, k=1)) == 1
    assert len(retriever.invoke(QUESTION, k=6)) == 6
    assert len(retriever.invoke(QUESTION, k=6, first_stage_k=3)) == 3  # only 3 candidates to rerank
    # the reranked set is exactly the first stage's first_stage_k
    got = {d.id for d in retriever.invoke(QUESTION, k=10, first_stage_k=5)}
    assert got == {c.id for c in text_store().search(QUESTION, top_k=5)}
    with pytest.raises(ValueError, match="first_stage_k"):
        retriever.invoke(QUESTION, first_stage_k=17)
    with pytest.raises(ValueError, match="k must be"):
        retriever.invoke(QUESTION, k=0)


async def test_ainvoke_with_k():
    for source in ({"store": text_store()}, {"base_retriever": vector_store().as_retriever(search_kwargs={"k": 5})}):
        retriever = RetrvR1Retriever(model=tiny_text_model(), k=4, reasoning_budget=2, **source)
        got = await retriever.ainvoke(QUESTION, k=2)
        want = retriever.invoke(QUESTION, k=2)
        assert [(d.id, d.metadata["relevance_score"]) for d in got] == [(d.id, d.metadata["relevance_score"]) for d in want]


def test_base_retriever_source_and_child_callbacks():
    starts: list[str] = []

    class Starts(BaseCallbackHandler):
        def on_retriever_start(self, serialized: Any, query: str, **kwargs: Any) -> None:
            starts.append(query)

    model = boosted_model()
    base = vector_store().as_retriever(search_kwargs={"k": 8})
    retriever = RetrvR1Retriever(model=model, base_retriever=base, k=3, first_stage_k=5, reasoning_budget=2)
    docs = retriever.invoke(QUESTION, config={"callbacks": [Starts()]})
    first = base.invoke(QUESTION)[:5]
    assert docs[0].id == first[WINNER].id and len(docs) == 3
    assert starts == [QUESTION, QUESTION]  # ours, then the base retriever's as a child run
    assert all(d.metadata["source"] == "corpus" for d in docs)


def test_empty_first_stage_returns_empty(monkeypatch):
    model = make_text_model(seed=5)

    def boom(*a, **k):
        raise AssertionError("the model must not be called")

    monkeypatch.setattr(model, "rank", boom)
    empty_store = QdrantCandidateStore(minilm(), location=":memory:", collection_name="empty")
    assert RetrvR1Retriever(model=model, store=empty_store).invoke(QUESTION) == []
    empty_vs = InMemoryVectorStore(MiniLMEmbeddings())
    assert RetrvR1Retriever(model=model, base_retriever=empty_vs.as_retriever()).invoke(QUESTION) == []
    assert RetrvR1Retriever(model=model, store=lambda q, top_k: []).invoke(QUESTION) == []
    assert RetrvR1Compressor(model=model).compress_documents([], QUESTION) == []


def test_constructor_validation():
    model = tiny_text_model()
    with pytest.raises(ValueError, match="exactly one"):
        RetrvR1Retriever(model=model)
    with pytest.raises(ValueError, match="exactly one"):
        RetrvR1Retriever(model=model, store=text_store(), base_retriever=vector_store().as_retriever())
    with pytest.raises(ValueError, match="max_candidates"):
        RetrvR1Retriever(model=model, store=text_store(), first_stage_k=100)
    with pytest.raises(TypeError, match="search"):
        RetrvR1Retriever(model=model, store=object())
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        RetrvR1Retriever(model=model, store=text_store(), k=0)
    retriever = RetrvR1Retriever(model=model, store=text_store(), k=2, reasoning_budget=0)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        retriever.k = 0
    with pytest.raises(ValueError, match="max_candidates"):
        retriever.first_stage_k = 100
    retriever.k, retriever.first_stage_k = 3, 5
    assert retriever.model is model and len(retriever.invoke(QUESTION)) == 3


def test_callable_store_and_checkpoint_path(tmp_path):
    model = make_text_model(seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    calls = []

    def search(query: Query, top_k: int) -> list[Candidate]:
        calls.append((query.text, top_k))
        return [Candidate(text, id=cid) for cid, text in CORPUS[:top_k]]

    retriever = RetrvR1Retriever(model=str(tmp_path / "ckpt"), device="cpu", store=search, k=2, first_stage_k=4, reasoning_budget=2)
    docs = retriever.invoke(QUESTION)
    assert calls == [(QUESTION, 4)] and len(docs) == 2
    direct = model.rank(QUESTION, [t for _, t in CORPUS[:4]], reasoning_budget=2)
    assert [d.metadata["relevance_score"] for d in docs] == pytest.approx([direct.scores[i] for i in direct.order[:2]])


# ------------------------------------------------------------------ compressor


def test_contextual_compression_retriever_end_to_end():
    model = boosted_model()
    base = vector_store().as_retriever(search_kwargs={"k": 5})
    compressor = RetrvR1Compressor(model=model, top_n=2, reasoning_budget=2)
    pipeline = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base)
    docs = pipeline.invoke(QUESTION)
    first = base.invoke(QUESTION)
    assert len(docs) == 2 and docs[0].id == first[WINNER].id
    assert docs[0].metadata["relevance_score"] > 0.9 >= docs[1].metadata["relevance_score"]
    assert "retrv_r1_reasoning" in docs[0].metadata
    # the input documents are not modified
    assert all("relevance_score" not in d.metadata for d in base.invoke(QUESTION))


async def test_compressor_async_and_top_n_none():
    compressor = RetrvR1Compressor(model=tiny_text_model(), top_n=None, reasoning_budget=0)
    docs = [Document(page_content=t, id=cid) for cid, t in CORPUS[:5]]
    got = await compressor.acompress_documents(docs, QUESTION)
    assert len(got) == 5 and math.isclose(sum(d.metadata["relevance_score"] for d in got), 1.0, rel_tol=1e-5)
    want = compressor.compress_documents(docs, QUESTION)  # async is the same ranking as sync
    assert [(d.id, d.metadata["relevance_score"]) for d in got] == [(d.id, d.metadata["relevance_score"]) for d in want]
    assert compressor.top_n is None and RetrvR1Compressor(model=tiny_text_model()).top_n == 3


def test_prior_relevance_score_moves_to_retrieval_score():
    compressor = RetrvR1Compressor(model=tiny_text_model(), top_n=2, reasoning_budget=0)
    docs = [Document(page_content=t, id=cid, metadata={"relevance_score": 0.5 + i / 10}) for i, (cid, t) in enumerate(CORPUS[:3])]
    out = compressor.compress_documents(docs, QUESTION)
    olds = {d.id: d.metadata["relevance_score"] for d in docs}
    assert all(d.metadata["retrieval_score"] == olds[d.id] for d in out)
    assert [d.metadata["relevance_score"] for d in docs] == [0.5, 0.6, 0.7]


def test_compressor_top_n_is_validated():
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"top_n must be >= 1 or None, got {bad}"):
            RetrvR1Compressor(model=tiny_text_model(), top_n=bad)
    docs = [Document(page_content=t, id=cid) for cid, t in CORPUS[:3]]
    compressor = RetrvR1Compressor(model=tiny_text_model(), top_n=1, reasoning_budget=0)
    assert len(compressor.compress_documents(docs, QUESTION)) == 1
    # assignment is validated too (it used to return [] for 0 and drop the last document for -1)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"top_n must be >= 1 or None, got {bad}"):
            compressor.top_n = bad
    assert compressor.top_n == 1 and compressor.model is tiny_text_model()
    compressor.top_n = None
    assert len(compressor.compress_documents(docs, QUESTION)) == 3


@functools.cache
def small_boosted_model():
    """A model with only 4 index labels, preferring label 3 (WINNER)."""
    return boost_label(make_text_model(seed=2, max_candidates=4), WINNER)


def test_compressor_reranks_the_first_max_candidates_and_appends_the_rest(caplog):
    model = small_boosted_model()
    compressor = RetrvR1Compressor(model=model, top_n=None, reasoning_budget=0)
    docs = [Document(page_content=t, id=cid, metadata={"rank": i}) for i, (cid, t) in enumerate(CORPUS)]  # 8 > 4
    with caplog.at_level("WARNING", logger="retrv_r1_plugin.integrations"):
        out = compressor.compress_documents(docs, QUESTION)
        again = compressor.compress_documents(docs, QUESTION)
    direct = model.rank(QUESTION, [t for _, t in CORPUS[:4]], reasoning_budget=0)
    assert [d.id for d in out] == [CORPUS[i][0] for i in direct.order] + [cid for cid, _ in CORPUS[4:]]
    assert out[0].id == CORPUS[WINNER][0]
    scores = [d.metadata["relevance_score"] for d in out]
    assert scores[:4] == pytest.approx([direct.scores[i] for i in direct.order])
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert max(scores[4:]) < min(scores[:4])
    assert all(d.metadata["retrv_r1_fallback"] == "not_reranked" and d.metadata["retrv_r1_inspected"] is False for d in out[4:])
    assert all(d.metadata["retrv_r1_fallback"] != "not_reranked" for d in out[:4])
    assert [d.id for d in again] == [d.id for d in out]
    warnings = [r for r in caplog.records if "max_candidates" in r.getMessage()]
    assert len(warnings) == 1 and "RetrvR1Compressor got 8 items" in warnings[0].getMessage()
    # top_n cuts the merged order; the tail documents' images are never read
    broken = docs + [Document(page_content="x", id="broken", metadata={"image_path": "/nonexistent/x.png"})]
    assert [d.id for d in RetrvR1Compressor(model=model, top_n=6, reasoning_budget=0).compress_documents(broken, QUESTION)] == [d.id for d in out[:6]]


def test_window_step_reranks_every_document():
    model = small_boosted_model()
    docs = [Document(page_content=t, id=cid) for cid, t in CORPUS]  # 8 > 4
    out = RetrvR1Compressor(model=model, top_n=None, reasoning_budget=0, window_step=3).compress_documents(docs, QUESTION)
    direct = model.rank_windowed(QUESTION, [t for _, t in CORPUS], step=3, reasoning_budget=0)
    assert [d.id for d in out] == [CORPUS[i][0] for i in direct.order]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx([direct.scores[i] for i in direct.order])
    assert all(d.metadata["retrv_r1_fallback"] != "not_reranked" for d in out)
    with pytest.raises(ValueError, match="step must be between 1 and window - 1"):
        RetrvR1Compressor(model=model, window_step=4)
    # the retriever may fetch more than max_candidates when it reranks in windows
    with pytest.raises(ValueError, match="set window_step"):
        RetrvR1Retriever(model=model, store=text_store(), first_stage_k=8)
    retriever = RetrvR1Retriever(model=model, store=text_store(), first_stage_k=8, k=8, window_step=2, reasoning_budget=0)
    got = retriever.invoke(QUESTION)
    assert len(got) == 8 and all(d.metadata["retrv_r1_fallback"] != "not_reranked" for d in got)



def test_retriever_returns_k_documents_when_k_is_above_the_default_first_stage(caplog):
    # invoke(q, k=6) over a 4-label model returned 4 documents (the default first_stage_k was
    # min(20, max_candidates)) although the store holds 8; and window_step without first_stage_k
    # never used the windows. Now k documents come back, as from the compressor: the first
    # max_candidates reranked, the others after them in first-stage order, flagged
    model = small_boosted_model()
    first_stage = [c.id for c in text_store().search(QUESTION, top_k=8)]
    for source in ({"store": text_store()}, {"base_retriever": vector_store().as_retriever(search_kwargs={"k": 8})}):
        retriever = RetrvR1Retriever(model=model, k=2, reasoning_budget=0, **source)
        assert len(retriever.invoke(QUESTION)) == 2
        with caplog.at_level("WARNING", logger="retrv_r1_plugin.integrations"):
            docs = retriever.invoke(QUESTION, k=6)
        assert len(docs) == 6 and "RetrvR1Retriever got 6 items" in caplog.text
        assert all(d.metadata["retrv_r1_fallback"] == "not_reranked" for d in docs[4:])
        assert all(d.metadata["retrv_r1_fallback"] != "not_reranked" for d in docs[:4])
        if "store" in source:
            assert docs[0].id == first_stage[WINNER] and [d.id for d in docs[4:]] == first_stage[4:6]
            from_store = docs
        caplog.clear()
    compressed = RetrvR1Compressor(model=model, top_n=6, reasoning_budget=0).compress_documents(
        [Document(page_content=c.text, id=c.id) for c in text_store().search(QUESTION, top_k=6)], QUESTION)
    assert [d.id for d in from_store] == [d.id for d in compressed]
    # with window_step (and no first_stage_k) the default first stage exceeds max_candidates
    windowed = RetrvR1Retriever(model=model, store=text_store(), k=8, window_step=2, reasoning_budget=0).invoke(QUESTION)
    assert len(windowed) == 8 and all(d.metadata["retrv_r1_fallback"] != "not_reranked" for d in windowed)
    # an explicit first_stage_k is still what is reranked
    assert len(RetrvR1Retriever(model=model, store=text_store(), k=6, first_stage_k=3, reasoning_budget=0).invoke(QUESTION)) == 3


def test_retriever_keeps_window_step_while_first_stage_k_needs_it():
    # first_stage_k above max_candidates is valid only with window_step: dropping window_step later
    # is refused like RetrvR1Retriever(first_stage_k=8) is, and leaves the old value
    model = small_boosted_model()
    retriever = RetrvR1Retriever(model=model, store=text_store(), first_stage_k=8, k=8, window_step=2, reasoning_budget=0)
    with pytest.raises(ValueError, match="first_stage_k must be between 1 and the model's max_candidates \\(4\\), got 8"):
        retriever.window_step = None
    assert retriever.window_step == 2 and len(retriever.invoke(QUESTION)) == 8
    retriever.first_stage_k = 4
    retriever.window_step = None  # fine once first_stage_k fits
    assert len(retriever.invoke(QUESTION)) == 4


@pytest.mark.parametrize("bad", [True, 2.0, "2"])
def test_window_step_must_be_an_int_like_in_the_core(bad):
    # True would otherwise become step 1 (the most model calls), 2.0 a silent 2; the core refuses both
    model = small_boosted_model()
    with pytest.raises(TypeError, match="step must be an int"):
        model.rank_windowed(QUESTION, [t for _, t in CORPUS], step=bad)
    with pytest.raises(ValueError, match="window_step"):
        RetrvR1Compressor(model=model, window_step=bad)
    compressor = RetrvR1Compressor(model=model, window_step=2)
    with pytest.raises(ValueError, match="window_step"):
        compressor.window_step = bad
    assert compressor.window_step == 2
    with pytest.raises(ValueError, match="window_step"):
        RetrvR1Retriever(model=model, store=text_store(), first_stage_k=8, window_step=bad)


def test_contextual_compression_over_more_documents_than_max_candidates():
    base = vector_store().as_retriever(search_kwargs={"k": len(CORPUS)})
    pipeline = ContextualCompressionRetriever(
        base_compressor=RetrvR1Compressor(model=small_boosted_model(), top_n=5, reasoning_budget=0), base_retriever=base
    )
    first = base.invoke(QUESTION)
    docs = pipeline.invoke(QUESTION)
    assert len(docs) == 5 and docs[0].id == first[WINNER].id
    assert {d.id for d in docs[:4]} == {d.id for d in first[:4]} and docs[4].id == first[4].id


# ------------------------------------------------------------------ images


class ColorEmbedder:
    """A 3-d image-text embedder (mean RGB / colour words), to make images first-stage searchable."""

    name = "test-color"
    dim = 3

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        rows = [[float(c in t.lower()) for c in ("red", "green", "blue")] for t in texts]
        return np.array([r if any(r) else [1.0, 1.0, 1.0] for r in rows], dtype=np.float32)

    def embed_images(self, images: list[Any]) -> np.ndarray:
        return np.array([np.asarray(im.convert("RGB"), dtype=np.float32).mean(axis=(0, 1)) for im in images], dtype=np.float32)


def test_image_query_on_the_vl_model(images):
    model = make_vl_model(seed=0)
    captions = {"red": "a red square", "green": "a green rectangle", "blue": "a blue rectangle"}
    cands = [Candidate(captions[n], image=str(p), id=n) for n, p in images.items()]
    cands.append(Candidate("a text about the sky", id="sky"))

    # text-only first stage: searched by the query text, reranked with the query image
    with QdrantCandidateStore(minilm(), location=":memory:", collection_name="captions") as store:
        store.add(cands, show_progress=False)
        retriever = RetrvR1Retriever(model=model, store=store, k=4, reasoning_budget=2)
        docs = retriever.invoke("which one is red?", image=images["red"])
        assert len(docs) == 4 and {d.id for d in docs} == {"red", "green", "blue", "sky"}
        assert {d.id: d.metadata.get("image_path") for d in docs}["green"] == str(images["green"])
        first = store.search("which one is red?", top_k=4)
        direct = model.rank(Query("which one is red?", images["red"]), first, reasoning_budget=2)
        assert [d.metadata["relevance_score"] for d in docs] == pytest.approx([direct.scores[i] for i in direct.order])
        # the image matters to the reranker
        blue = retriever.invoke("which one is red?", image=images["blue"])
        assert {d.id: d.metadata["relevance_score"] for d in blue} != pytest.approx({d.id: d.metadata["relevance_score"] for d in docs})
        with pytest.raises(ValueError, match="image-only query"):
            retriever.invoke("", image=images["red"])

    # image-capable first stage: an image-only query
    with QdrantCandidateStore(ColorEmbedder(), location=":memory:", collection_name="colors") as store:
        store.add(cands, show_progress=False)
        retriever = RetrvR1Retriever(model=model, store=store, k=2, first_stage_k=3, reasoning_budget=0)
        docs = retriever.invoke("", image=images["green"])
        assert len(docs) == 2
        first = store.search(Query(image=images["green"]), top_k=3)
        assert first[0].id == "green"
        # the reranked pair is the core's best two of that image-searched first stage, ranked with the query image
        direct = model.rank(Query(text="", image=images["green"]), first, reasoning_budget=0)
        assert [d.id for d in docs] == [first[i].id for i in direct.order[:2]]
        assert [d.metadata["relevance_score"] for d in docs] == pytest.approx([direct.scores[i] for i in direct.order[:2]])

    # bad images name the document
    bad = Document(page_content="x", id="broken-doc", metadata={"image_path": "/nonexistent/x.png"})
    with pytest.raises(ImageLoadError, match="broken-doc"):
        RetrvR1Compressor(model=model).compress_documents([bad], "q")


def test_document_candidate_round_trip(images):
    raw = images["red"].read_bytes()
    for cand in (Candidate("t", image=str(images["red"]), id="a", metadata={"x": 1}), Candidate("t", image=raw, id="b")):
        doc = candidate_to_document(cand)
        back = document_to_candidate(doc, load_images=False)
        assert (back.text, back.id, back.image) == (cand.text, cand.id, cand.image)
    assert document_to_candidate(candidate_to_document(Candidate("t", image=raw))).image.size == (56, 56)
    # an in-memory PIL image is kept too, PNG-encoded like the store does
    pil = Image.open(images["green"])
    doc = candidate_to_document(Candidate("t", image=pil, id="c", metadata={"x": 1}))
    assert doc.metadata["x"] == 1 and set(doc.metadata) == {"x", "image_b64"}
    back = document_to_candidate(doc)
    assert back.image.size == pil.size and np.array_equal(np.asarray(back.image), np.asarray(pil.convert("RGB")))
    with QdrantCandidateStore(minilm(), location=":memory:", collection_name="pil") as store:
        store.add([Candidate("t", image=pil, id="c")], show_progress=False)
        assert doc.metadata["image_b64"] == candidate_to_document(store.get(["c"])[0]).metadata["image_b64"]


def test_line_wrapped_base64_images_are_read(images):
    # MIME-style base64 (base64.encodebytes: a line break every 76 characters) was refused as
    # "not valid base64"; other characters outside the alphabet still are
    raw = images["red"].read_bytes()
    wrapped = Document(page_content="t", id="wrapped", metadata={"image_b64": base64.encodebytes(raw).decode()})
    assert "\n" in wrapped.metadata["image_b64"]
    assert document_to_candidate(wrapped, load_images=False).image == raw
    assert document_to_candidate(wrapped).image.size == (56, 56)
    bad = Document(page_content="t", id="bad-b64", metadata={"image_b64": "%%% not base64"})
    with pytest.raises(ImageLoadError, match="bad-b64.*not valid base64"):
        document_to_candidate(bad)


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "langchain_core", None)
    monkeypatch.delitem(sys.modules, "retrv_r1_plugin.integrations.langchain")
    with pytest.raises(MissingExtraError, match=r"pip install 'retrv-r1-plugin\[langchain\]'"):
        importlib.import_module("retrv_r1_plugin.integrations.langchain")


async def test_async_retrieval_decodes_the_query_image_off_the_event_loop(images, monkeypatch):
    """Decoding an image file is blocking work: ainvoke must not do it on the event loop."""
    import threading

    import retrv_r1_plugin.integrations.langchain as lc

    threads: list[threading.Thread] = []
    real = lc.load_image

    def recording(source):
        threads.append(threading.current_thread())
        return real(source)

    monkeypatch.setattr(lc, "load_image", recording)
    model = make_vl_model(seed=0)
    cands = [Candidate(f"a {n} shape", image=str(p), id=n) for n, p in images.items()]
    with QdrantCandidateStore(minilm(), location=":memory:", collection_name="async-images") as store:
        store.add(cands, show_progress=False)
        retriever = RetrvR1Retriever(model=model, store=store, k=2, reasoning_budget=0)
        got = await retriever.ainvoke("which one is red?", image=str(images["red"]))
        want = retriever.invoke("which one is red?", image=str(images["red"]))
    assert [d.id for d in got] == [d.id for d in want]
    assert [d.metadata["relevance_score"] for d in got] == pytest.approx([d.metadata["relevance_score"] for d in want])
    assert threads and threads[0] is not threading.main_thread()


def test_image_only_document_on_a_text_model_is_named(images):
    """The error must name the document, not a candidate position the user never saw."""
    docs = [Document(page_content="a text", id="t1"),
            Document(page_content="", id="photo-7", metadata={"image_path": str(images["red"])})]
    with pytest.raises(ValueError, match="document photo-7 is an image without text"):
        RetrvR1Compressor(model=tiny_text_model()).compress_documents(docs, "which is red?")


def test_a_callable_stores_candidates_are_not_modified(images):
    """The retriever decodes the images of the store's candidates for the model, on copies: a store
    that returns its own Candidate objects must get them back with their paths, not PIL images."""
    cands = [Candidate("a red square", image=str(images["red"]), id="red"), Candidate("the sky", id="sky")]
    retriever = RetrvR1Retriever(model=make_vl_model(seed=0), store=lambda q, top_k: cands[:top_k], k=2, first_stage_k=2, reasoning_budget=0)
    first = retriever.invoke("which one is red?")
    assert cands[0].image == str(images["red"]) and cands[1].image is None
    assert [d.id for d in retriever.invoke("which one is red?")] == [d.id for d in first]
    assert {d.id: d.metadata.get("image_path") for d in first}["red"] == str(images["red"])


def corpus_store(query: Query, top_k: int) -> list[Candidate]:
    """A picklable callable store over CORPUS."""
    return [Candidate(text, id=cid) for cid, text in CORPUS[:top_k]]


def test_compressor_json_round_trip(tmp_path):
    # model_dump_json() raised PydanticSerializationError on the RetrvR1Model
    make_text_model(seed=4).save_pretrained(tmp_path / "ckpt")
    compressor = RetrvR1Compressor(model=str(tmp_path / "ckpt"), device="cpu", top_n=2, reasoning_budget=0, window_step=3)
    data = json.loads(compressor.model_dump_json())
    assert data["model"] == str(tmp_path / "ckpt") and data["top_n"] == 2 and data["window_step"] == 3
    copy = RetrvR1Compressor.model_validate_json(compressor.model_dump_json())
    assert copy.model is not compressor.model and copy.model.name_or_path == str(tmp_path / "ckpt")
    docs = [Document(page_content=t, id=cid) for cid, t in CORPUS[:4]]
    got, want = copy.compress_documents(docs, QUESTION), compressor.compress_documents(docs, QUESTION)
    assert [(d.id, d.metadata["relevance_score"]) for d in got] == [(d.id, d.metadata["relevance_score"]) for d in want]
    assert compressor.model_dump()["model"] is compressor.model  # python mode keeps the loaded model
    # a model built in memory is described; loading the description fails naming it
    described = json.loads(RetrvR1Compressor(model=tiny_text_model()).model_dump_json())["model"]
    assert described.startswith("RetrvR1Model(")
    with pytest.raises(Exception, match="no model directory"):
        RetrvR1Compressor.model_validate({"model": described})


def test_pickled_retriever_and_compressor_load_the_model_again(tmp_path):
    """Pickling (multiprocessing) used to fail on the model's lock, after copying its weights."""
    import pickle

    model = make_text_model(seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    docs = [Document(page_content=t, id=cid) for cid, t in CORPUS[:5]]
    for given in (str(tmp_path / "ckpt"), RetrvR1Model.from_pretrained(tmp_path / "ckpt")):
        compressor = RetrvR1Compressor(model=given, top_n=3, reasoning_budget=0)
        retriever = RetrvR1Retriever(model=given, store=corpus_store, k=2, first_stage_k=4, reasoning_budget=0)
        for obj, run in ((compressor, lambda c: c.compress_documents(docs, QUESTION)), (retriever, lambda r: r.invoke(QUESTION))):
            data = pickle.dumps(obj)
            assert len(data) < 20_000  # settings, not the weights
            copy = pickle.loads(data)
            assert copy.model is not obj.model and str(copy.model.device) == str(obj.model.device)
            got, want = run(copy), run(obj)
            assert [d.id for d in got] == [d.id for d in want]
            assert [d.metadata["relevance_score"] for d in got] == pytest.approx([d.metadata["relevance_score"] for d in want])
    for obj in (RetrvR1Compressor(model=tiny_text_model()), RetrvR1Retriever(model=tiny_text_model(), store=corpus_store)):
        with pytest.raises(TypeError, match="built in memory.*save_pretrained"):
            pickle.dumps(obj)
