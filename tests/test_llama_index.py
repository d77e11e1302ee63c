"""LlamaIndex adapter: RetrvR1Reranker on real LlamaIndex objects, tiny models, real Qdrant."""

from __future__ import annotations

import base64
import importlib
import math
import sys
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any, List

import pytest
import torch
from PIL import Image

pytest.importorskip("llama_index.core")

from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.base.embeddings.base import Embedding  # noqa: E402
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler  # noqa: E402
from llama_index.core.embeddings import MultiModalEmbedding  # noqa: E402
from llama_index.core.indices import MultiModalVectorStoreIndex  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.schema import ImageDocument, ImageNode, MediaResource, MetadataMode, Node, NodeWithScore, QueryBundle, TextNode  # noqa: E402
from llama_index.vector_stores.qdrant import QdrantVectorStore  # noqa: E402
from qdrant_client import QdrantClient  # noqa: E402

from retrv_r1_plugin import RetrvR1Model  # noqa: E402
from retrv_r1_plugin._optional import MissingExtraError  # noqa: E402
from retrv_r1_plugin.integrations.llama_index import LocalSentenceTransformerEmbedding, RetrvR1Reranker  # noqa: E402
from retrv_r1_plugin.testing import scripted_generation  # noqa: E402
from retrv_r1_plugin.types import Candidate, ImageLoadError, NoAnswerError, Query  # noqa: E402

from conftest import boost_label, make_text_model, solid  # noqa: E402

TEXTS = ["plants turn light into sugar", "a rocket in the sky", "coffee in a white cup", "the cat sat on the mat"]
WINNER = 2  # the boosted label: candidate 2 wins wherever it comes from


def nodes_of(texts: list[str], scores: list[float] | None = None) -> list[NodeWithScore]:
    scores = scores or [1.0 - 0.1 * i for i in range(len(texts))]
    return [NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=s) for i, (t, s) in enumerate(zip(texts, scores))]


@pytest.fixture(scope="module")
def boosted_model():
    """A tiny text model whose label 3 (index 2) always gets the top probability."""
    model = make_text_model(seed=1)
    return boost_label(model, WINNER)


@pytest.fixture(scope="module")
def minilm() -> LocalSentenceTransformerEmbedding:
    return LocalSentenceTransformerEmbedding()


class Recorder(BaseEventHandler):
    """Collects instrumentation events."""

    events: List[Any] = []

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(event)


@pytest.fixture
def recorder():
    handler = Recorder(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


# ------------------------------------------------------------------ ranking


def test_order_and_scores_follow_the_model(boosted_model):
    reranker = RetrvR1Reranker(model=boosted_model, top_n=4, reasoning_budget=0)
    nodes = nodes_of(TEXTS)
    out = reranker.postprocess_nodes(nodes, query_str="photosynthesis")
    direct = boosted_model.rank("photosynthesis", TEXTS, reasoning_budget=0)
    assert out[0].node.node_id == f"n{WINNER}" and out[0].score > 0.9
    assert [n.node.node_id for n in out] == [f"n{i}" for i in direct.order]
    assert [n.score for n in out] == pytest.approx([direct.scores[i] for i in direct.order])
    assert math.isclose(sum(n.score for n in out), 1.0, rel_tol=1e-5)
    assert out[0].node.metadata["retrv_r1_fallback"] is None


def test_top_n_and_none(text_model):
    nodes = nodes_of(TEXTS)
    assert len(RetrvR1Reranker(model=text_model, top_n=2, reasoning_budget=0).postprocess_nodes(nodes, query_str="q")) == 2
    assert len(RetrvR1Reranker(model=text_model, top_n=None, reasoning_budget=0).postprocess_nodes(nodes, query_str="q")) == 4
    with pytest.raises(ValueError, match="top_n"):
        RetrvR1Reranker(model=text_model, top_n=0)
    # assignment is validated too (it used to return [] for 0 and drop the last node for -1)
    reranker = RetrvR1Reranker(model=text_model, top_n=2, reasoning_budget=0)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="top_n"):
            reranker.top_n = bad
    assert reranker.top_n == 2 and reranker.retrv_r1_model is text_model
    reranker.top_n = None
    assert len(reranker.postprocess_nodes(nodes, query_str="q")) == 4


@pytest.fixture(scope="module")
def small_boosted_model():
    """A tiny text model with only 4 index labels, preferring label 3 (index WINNER)."""
    return boost_label(make_text_model(seed=2, max_candidates=4), WINNER)


def test_more_nodes_than_max_candidates_rerank_the_first_and_append_the_rest(small_boosted_model, caplog):
    texts = TEXTS + ["bread from flour", "paris in france", "a mountain of snow"]  # 7 > 4 labels
    nodes = nodes_of(texts)
    # a caption-less image node beyond max_candidates is never converted (the text model would refuse it)
    nodes.append(NodeWithScore(node=ImageNode(image_path="/nonexistent/x.png", id_="img"), score=0.1))
    reranker = RetrvR1Reranker(model=small_boosted_model, top_n=None, reasoning_budget=0)
    with caplog.at_level("WARNING", logger="retrv_r1_plugin.integrations"):
        out = reranker.postprocess_nodes(nodes, query_str="photosynthesis")
        again = reranker.postprocess_nodes(nodes, query_str="photosynthesis")
    direct = small_boosted_model.rank("photosynthesis", TEXTS, reasoning_budget=0)
    ids = [n.node.node_id for n in out]
    assert ids == [f"n{i}" for i in direct.order] + ["n4", "n5", "n6", "img"]
    assert ids[0] == f"n{WINNER}" and [n.node.node_id for n in again] == ids
    scores = [n.score for n in out]
    assert scores[:4] == pytest.approx([direct.scores[i] for i in direct.order])
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert max(scores[4:]) < min(scores[:4])
    assert all(n.node.metadata["retrv_r1_fallback"] == "not_reranked" for n in out[4:])
    assert all(n.node.metadata["retrv_r1_inspected"] is False for n in out[4:])
    assert out[0].node.metadata["retrv_r1_fallback"] is None
    warnings = [r for r in caplog.records if "max_candidates" in r.getMessage()]
    assert len(warnings) == 1 and "RetrvR1Reranker got 8 items" in warnings[0].getMessage()
    # top_n cuts the merged order
    top = RetrvR1Reranker(model=small_boosted_model, top_n=5, reasoning_budget=0).postprocess_nodes(nodes, query_str="photosynthesis")
    assert [n.node.node_id for n in top] == ids[:5]


def test_window_step_reranks_every_node_in_sliding_windows(small_boosted_model):
    texts = TEXTS + ["bread from flour", "paris in france", "a mountain of snow", "rain in spain"]  # 8 > 4 labels
    nodes = nodes_of(texts)
    reranker = RetrvR1Reranker(model=small_boosted_model, top_n=None, reasoning_budget=0, window_step=2)
    out = reranker.postprocess_nodes(nodes, query_str="photosynthesis")
    direct = small_boosted_model.rank_windowed("photosynthesis", texts, step=2, reasoning_budget=0)
    assert [n.node.node_id for n in out] == [f"n{i}" for i in direct.order]
    assert [n.score for n in out] == pytest.approx([direct.scores[i] for i in direct.order])
    assert all(n.node.metadata["retrv_r1_fallback"] != "not_reranked" for n in out)
    # the windows reorder beyond the first max_candidates: the plain reranker keeps n4..n7 in place
    plain = RetrvR1Reranker(model=small_boosted_model, top_n=None, reasoning_budget=0).postprocess_nodes(nodes, query_str="photosynthesis")
    assert [n.node.node_id for n in out] != [n.node.node_id for n in plain]
    for bad in (4, 0):
        with pytest.raises(ValueError, match="step|window_step"):
            RetrvR1Reranker(model=small_boosted_model, window_step=bad)
    reranker.window_step = 9  # checked against the model when the nodes come
    with pytest.raises(ValueError, match="step must be between 1 and window - 1 \\(3\\)"):
        reranker.postprocess_nodes(nodes, query_str="photosynthesis")



@pytest.mark.parametrize("bad", [True, 2.0])
def test_window_step_must_be_an_int_after_construction_too(small_boosted_model, bad):
    # the constructor refuses a bool or float step (as the core does); assignment must too, not turn
    # True into step 1 (the most model calls) or 2.0 into 2
    with pytest.raises(TypeError, match="step must be an int"):
        RetrvR1Reranker(model=small_boosted_model, window_step=bad)
    reranker = RetrvR1Reranker(model=small_boosted_model, window_step=2)
    with pytest.raises(ValueError, match="window_step"):
        reranker.window_step = bad
    assert reranker.window_step == 2


def test_fields_and_serialisation(text_model):
    reranker = RetrvR1Reranker(model=text_model, top_n=3, reasoning_budget=2, compression="none")
    assert RetrvR1Reranker.class_name() == "RetrvR1Reranker"
    assert reranker.device == "cpu" and reranker.retrv_r1_model is text_model
    data = reranker.to_dict()
    assert data["class_name"] == "RetrvR1Reranker" and data["top_n"] == 3 and isinstance(data["model"], str)
    for name in ("top_n", "model", "device", "keep_retrieval_score", "reasoning_budget", "max_inspections",
                 "return_reasoning", "compression", "strict", "allow_image_urls"):
        assert RetrvR1Reranker.model_fields[name].description


def test_model_and_device_cannot_be_reassigned(tmp_path, text_model):
    # assigning them changed nothing but what to_dict/pickle name: the reranker kept ranking with
    # the model it was built with, and a from_dict/pickled copy would load the other one
    make_text_model(seed=4).save_pretrained(tmp_path / "ckpt")
    reranker = RetrvR1Reranker(model=text_model, top_n=2, reasoning_budget=0)
    before = reranker.to_dict()
    for field, value in (("model", str(tmp_path / "ckpt")), ("device", "meta")):
        with pytest.raises(ValueError, match=f"{field}\n.*frozen"):
            setattr(reranker, field, value)
    assert reranker.to_dict() == before and reranker.retrv_r1_model is text_model and str(text_model.device) == "cpu"
    reranker.top_n = 3  # the other settings are still assignable
    assert len(reranker.postprocess_nodes(nodes_of(TEXTS), query_str="q")) == 3
    rebuilt = RetrvR1Reranker.from_dict({**before, "model": str(tmp_path / "ckpt")})  # a new reranker is the way
    assert rebuilt.model == str(tmp_path / "ckpt") and rebuilt.retrv_r1_model is not text_model


def test_loads_a_checkpoint_path(tmp_path):
    model = make_text_model(seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    reranker = RetrvR1Reranker(model=str(tmp_path / "ckpt"), device="cpu", top_n=4, reasoning_budget=2)
    assert reranker.model == str(tmp_path / "ckpt") and reranker.device == "cpu"
    out = reranker.postprocess_nodes(nodes_of(TEXTS), query_str="q")
    expected = model.rank("q", TEXTS, reasoning_budget=2)
    assert [n.score for n in out] == pytest.approx([expected.scores[i] for i in expected.order])


def test_a_reranker_over_a_loaded_checkpoint_round_trips_through_to_dict(tmp_path):
    """Serialised settings must name what loads the model again, not a description of it."""
    make_text_model(seed=4).save_pretrained(tmp_path / "ckpt")
    loaded = RetrvR1Model.from_pretrained(tmp_path / "ckpt")
    assert loaded.name_or_path == str(tmp_path / "ckpt")
    reranker = RetrvR1Reranker(model=loaded, top_n=2, reasoning_budget=0)
    rebuilt = RetrvR1Reranker.from_dict(reranker.to_dict())
    assert rebuilt.model == str(tmp_path / "ckpt") and rebuilt.top_n == 2 and rebuilt.retrv_r1_model is not loaded
    nodes = nodes_of(TEXTS)
    assert [n.score for n in rebuilt.postprocess_nodes(nodes, query_str="q")] == pytest.approx(
        [n.score for n in reranker.postprocess_nodes(nodes_of(TEXTS), query_str="q")])


def test_keep_retrieval_score_and_no_leaks(text_model):
    reranker = RetrvR1Reranker(model=text_model, top_n=4, keep_retrieval_score=True, reasoning_budget=3)
    nodes = nodes_of(TEXTS, [0.9, 0.8, 0.7, 0.6])
    for n in nodes:
        n.node.metadata["source"] = "wiki"
    before = [dict(n.node.metadata) for n in nodes]
    out = reranker.postprocess_nodes(nodes, query_str="photosynthesis")
    by_id = {n.node.node_id: n for n in out}
    for i, n in enumerate(nodes):
        got = by_id[n.node.node_id]
        assert got.node.metadata["retrieval_score"] == n.score
        assert got.node.metadata["source"] == "wiki"
        assert got.node is not n.node
    # the caller's nodes are untouched, and a second query does not see the first one's data
    assert [dict(n.node.metadata) for n in nodes] == before
    assert [n.score for n in nodes] == [0.9, 0.8, 0.7, 0.6]
    second = reranker.postprocess_nodes(nodes, query_str="rocket")
    assert all(n.node.metadata["retrieval_score"] in (0.9, 0.8, 0.7, 0.6) for n in second)
    # what the reranker adds is hidden from the LLM and embedding views of the node
    llm_text = out[0].node.get_content(metadata_mode=MetadataMode.LLM)
    assert "retrv_r1" not in llm_text and "retrieval_score" not in llm_text and "source: wiki" in llm_text
    assert "retrv_r1" not in out[0].node.get_content(metadata_mode=MetadataMode.EMBED)
    without = RetrvR1Reranker(model=text_model, top_n=1, reasoning_budget=0).postprocess_nodes(nodes, query_str="q")
    assert "retrieval_score" not in without[0].node.metadata


def test_reasoning_inspection_and_fallback_metadata(text_model):
    nodes = nodes_of(TEXTS[:3])
    reranker = RetrvR1Reranker(model=text_model, top_n=3, reasoning_budget=40, max_inspections=2)
    script = ["<think>", "look", "<inspection-index-start>", "<cand_2>", "<inspection-index-end>", "ok", "<answer>"]
    with scripted_generation(text_model, script):
        out = reranker.postprocess_nodes(nodes, query_str="q")
    with scripted_generation(text_model, script):
        direct = text_model.rank("q", TEXTS[:3], reasoning_budget=40, max_inspections=2)
    assert direct.inspected == [1]
    meta = {n.node.node_id: n.node.metadata for n in out}
    assert meta["n1"]["retrv_r1_inspected"] is True
    assert meta["n0"]["retrv_r1_inspected"] is False and meta["n2"]["retrv_r1_inspected"] is False
    assert all(m["retrv_r1_reasoning"] == direct.reasoning and "[inspected candidate 1]" in m["retrv_r1_reasoning"] for m in meta.values())
    assert all(m["retrv_r1_fallback"] == direct.fallback for m in meta.values())

    quiet = RetrvR1Reranker(model=text_model, top_n=3, reasoning_budget=5, return_reasoning=False)
    assert all("retrv_r1_reasoning" not in n.node.metadata for n in quiet.postprocess_nodes(nodes, query_str="q"))

    # a model output without an answer: flagged, not raised ...
    with scripted_generation(text_model, ["some", " words", "<|im_end|>"]):
        out = reranker.postprocess_nodes(nodes, query_str="q")
    assert all(n.node.metadata["retrv_r1_fallback"] == "forced_answer" for n in out)
    assert math.isclose(sum(n.score for n in out), 1.0, rel_tol=1e-5)
    # ... unless strict
    strict = RetrvR1Reranker(model=text_model, top_n=3, reasoning_budget=40, strict=True)
    with scripted_generation(text_model, ["some", "<|im_end|>"]), pytest.raises(NoAnswerError):
        strict.postprocess_nodes(nodes, query_str="q")


def test_empty_nodes_return_empty_without_a_model_call(text_model, monkeypatch, recorder):
    reranker = RetrvR1Reranker(model=text_model, reasoning_budget=0)

    def boom(*a, **k):
        raise AssertionError("the model must not be called")

    monkeypatch.setattr(text_model, "rank", boom)
    assert reranker.postprocess_nodes([], query_str="q") == []
    assert not [e for e in recorder.events if isinstance(e, (ReRankStartEvent, ReRankEndEvent))]


def test_missing_query_is_an_error(text_model):
    reranker = RetrvR1Reranker(model=text_model, reasoning_budget=0)
    with pytest.raises(ValueError, match="query bundle"):
        reranker.postprocess_nodes(nodes_of(TEXTS))
    with pytest.raises(ValueError, match="empty query"):
        reranker.postprocess_nodes(nodes_of(TEXTS), query_bundle=QueryBundle(query_str=""))


# ------------------------------------------------------------------ events / callbacks


def test_instrumentation_events_and_callbacks(text_model, recorder):
    debug = LlamaDebugHandler()
    reranker = RetrvR1Reranker(model=text_model, top_n=2, reasoning_budget=2, callback_manager=CallbackManager([debug]))
    nodes = nodes_of(TEXTS)
    bundle = QueryBundle("photosynthesis")
    out = reranker.postprocess_nodes(nodes, query_bundle=bundle)

    starts = [e for e in recorder.events if isinstance(e, ReRankStartEvent)]
    ends = [e for e in recorder.events if isinstance(e, ReRankEndEvent)]
    assert len(starts) == 1 and len(ends) == 1
    assert starts[0].query == bundle and starts[0].top_n == 2 and starts[0].model_name == reranker.model
    assert [n.node.node_id for n in starts[0].nodes] == [n.node.node_id for n in nodes]
    assert [n.node.node_id for n in ends[0].nodes] == [n.node.node_id for n in out]

    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 1
    start, end = pairs[0]
    assert start.payload[EventPayload.QUERY_STR] == "photosynthesis"
    assert start.payload[EventPayload.MODEL_NAME] == reranker.model
    assert start.payload[EventPayload.TOP_K] == 2
    assert start.payload[EventPayload.NODES] == nodes
    assert [n.node.node_id for n in end.payload[EventPayload.NODES]] == [n.node.node_id for n in out]


async def test_apostprocess_nodes(text_model):
    reranker = RetrvR1Reranker(model=text_model, top_n=3, reasoning_budget=3)
    nodes = nodes_of(TEXTS)
    got = await reranker.apostprocess_nodes(nodes, query_str="photosynthesis")
    want = reranker.postprocess_nodes(nodes, query_str="photosynthesis")
    assert [(n.node.node_id, n.score) for n in got] == [(n.node.node_id, n.score) for n in want]
    assert await reranker.apostprocess_nodes([], query_str="q") == []


# ------------------------------------------------------------------ images


def image_nodes(images: dict[str, Path]) -> list[NodeWithScore]:
    b64 = base64.b64encode(images["green"].read_bytes()).decode()
    return [
        NodeWithScore(node=ImageNode(image_path=str(images["red"]), text="a red square", id_="by_path"), score=0.5),
        NodeWithScore(node=ImageNode(image=b64, id_="by_base64"), score=0.4),
        NodeWithScore(node=ImageNode(metadata={"file_path": str(images["blue"])}, id_="by_file_path"), score=0.3),
        NodeWithScore(node=TextNode(text="plain text about the sky", id_="text"), score=0.2),
    ]


def core_ranking(model, query: str, nodes: list[NodeWithScore], images: dict[str, Path], **kwargs):
    """The core's ranking of four nodes: the red, green and blue images with their nodes'
    text as the reranker sees it, then a text-only node."""
    texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    cands = [Candidate(texts[0], images["red"]), Candidate(texts[1], images["green"]),
             Candidate(texts[2], images["blue"]), Candidate(texts[3])]
    return model.rank(query, cands, **kwargs)


def test_image_nodes_on_the_vl_model(vl_model, images):
    nodes = image_nodes(images)
    reranker = RetrvR1Reranker(model=vl_model, top_n=None, reasoning_budget=3)
    out = reranker.postprocess_nodes(nodes, query_str="a green picture")
    assert {n.node.node_id for n in out} == {"by_path", "by_base64", "by_file_path", "text"}
    assert isinstance({n.node.node_id: n.node for n in out}["by_base64"], ImageNode)
    # the same ranking as the core with the same images: every image source was read
    expected = core_ranking(vl_model, "a green picture", nodes, images, reasoning_budget=3)
    by_id = {n.node.node_id: n.score for n in out}
    assert [by_id[i] for i in ("by_path", "by_base64", "by_file_path", "text")] == pytest.approx(expected.scores)
    # and the images matter: other pixels, other scores
    swapped = image_nodes({"red": images["blue"], "green": images["red"], "blue": images["green"]})
    other = {n.node.node_id: n.score for n in reranker.postprocess_nodes(swapped, query_str="a green picture")}
    assert other != pytest.approx(by_id)


def test_image_query_with_empty_query_str(vl_model, images):
    nodes = image_nodes(images)
    reranker = RetrvR1Reranker(model=vl_model, top_n=4, reasoning_budget=0)
    out = reranker.postprocess_nodes(nodes, query_bundle=QueryBundle(query_str="", image_path=str(images["green"])))
    assert len(out) == 4 and math.isclose(sum(n.score for n in out), 1.0, rel_tol=1e-5)
    texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    expected = vl_model.rank(
        Query(text="", image=images["green"]),
        [Candidate(texts[0], images["red"]), Candidate(texts[1], images["green"]),
         Candidate(texts[2], images["blue"]), Candidate(texts[3])],
        reasoning_budget=0,
    )
    assert [n.score for n in out] == pytest.approx([expected.scores[i] for i in expected.order])


def test_line_wrapped_base64_image_is_read(vl_model, images):
    # ImageNode.resolve_image reads MIME-style base64 (a line break every 76 characters); the
    # reranker refused it as "not valid base64"
    wrapped = base64.encodebytes(images["green"].read_bytes()).decode()
    assert "\n" in wrapped
    reranker = RetrvR1Reranker(model=vl_model, top_n=None, reasoning_budget=0)
    nodes = image_nodes(images)
    nodes[1] = NodeWithScore(node=ImageNode(image=wrapped, id_="by_base64"), score=0.4)
    got = reranker.postprocess_nodes(nodes, query_str="green")
    want = reranker.postprocess_nodes(image_nodes(images), query_str="green")
    assert [n.node.node_id for n in got] == [n.node.node_id for n in want]
    assert [n.score for n in got] == pytest.approx([n.score for n in want])


def test_bad_images_name_the_node(vl_model, images, tmp_path):
    reranker = RetrvR1Reranker(model=vl_model, reasoning_budget=0)
    good = image_nodes(images)
    gone = NodeWithScore(node=ImageNode(image_path=str(tmp_path / "gone.png"), id_="gone-node"))
    with pytest.raises(ImageLoadError, match="gone-node.*not found"):
        reranker.postprocess_nodes([*good, gone], query_str="q")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageLoadError, match="corrupt-node"):
        reranker.postprocess_nodes([NodeWithScore(node=ImageNode(image_path=str(corrupt), id_="corrupt-node"))], query_str="q")
    with pytest.raises(ImageLoadError, match="b64-node.*base64"):
        reranker.postprocess_nodes([NodeWithScore(node=ImageNode(image="%%%not base64", id_="b64-node"))], query_str="q")
    url_only = NodeWithScore(node=ImageNode(image_url="https://example.invalid/cat.png", id_="url-node"))
    with pytest.raises(ImageLoadError, match="url-node.*allow_image_urls=True"):
        reranker.postprocess_nodes([url_only], query_str="q")
    with pytest.raises(ImageLoadError, match="query image"):
        reranker.postprocess_nodes(good, query_bundle=QueryBundle("", image_path=str(tmp_path / "nope.png")))


@pytest.fixture
def image_server(images):
    """A real HTTP server on localhost serving the ``images`` folder; ``.requests`` lists the
    paths asked for (a missing file is a real 404)."""
    import functools
    import http.server
    import threading

    requests_seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests_seen.append(self.path)
            return super().do_GET()

        def log_message(self, *args):
            pass

    folder = next(iter(images.values())).parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base = f"http://127.0.0.1:{server.server_port}"  # type: ignore[attr-defined]
    server.requests = requests_seen  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


def test_image_url_is_fetched_only_when_allowed(vl_model, images, image_server):
    url = f"{image_server.base}/red.png"
    node = NodeWithScore(node=ImageNode(image_url=url, id_="url-node"))
    allowed = RetrvR1Reranker(model=vl_model, reasoning_budget=0, allow_image_urls=True)
    out = allowed.postprocess_nodes([node, *image_nodes(images)], query_str="red")
    assert image_server.requests == ["/red.png"] and len(out) == 5
    # the downloaded pixels are what was ranked: the same score as the red image given by path
    by_path = NodeWithScore(node=ImageNode(image_path=str(images["red"]), id_="url-node"))
    same = RetrvR1Reranker(model=vl_model, reasoning_budget=0, top_n=None).postprocess_nodes([by_path, *image_nodes(images)], query_str="red")
    assert {n.node.node_id: n.score for n in out} == pytest.approx({n.node.node_id: n.score for n in same})
    # without allow_image_urls nothing is downloaded: the node is refused by name
    with pytest.raises(ImageLoadError, match="url-node.*allow_image_urls=True"):
        RetrvR1Reranker(model=vl_model, reasoning_budget=0).postprocess_nodes([node, *image_nodes(images)], query_str="red")
    assert image_server.requests == ["/red.png"]


def test_image_url_errors_name_the_url_and_status_and_data_urls_are_read(vl_model, images, image_server):
    # a 404 page used to be taken for the image: "cannot decode image <335 bytes>", no URL, no status
    gone = f"{image_server.base}/gone.png"
    allowed = RetrvR1Reranker(model=vl_model, reasoning_budget=0, allow_image_urls=True)
    with pytest.raises(ImageLoadError, match=f"gone-node: cannot download {gone}: 404"):
        allowed.postprocess_nodes([NodeWithScore(node=ImageNode(image_url=gone, id_="gone-node"))], query_str="red")
    # a URL that answers with something other than an image is named too
    (images["red"].parent / "page.html").write_text("<html>not an image</html>")
    page = f"{image_server.base}/page.html"
    with pytest.raises(ImageLoadError, match=f"page-node: the image_url {page} is not a readable image"):
        allowed.postprocess_nodes([NodeWithScore(node=ImageNode(image_url=page, id_="page-node"))], query_str="red")
    # a data: URL holds the image itself: read without allow_image_urls, the same pixels as the file
    data_url = "data:image/png;base64," + base64.b64encode(images["red"].read_bytes()).decode()
    inline = NodeWithScore(node=ImageNode(image_url=data_url, id_="same"))
    by_path = NodeWithScore(node=ImageNode(image_path=str(images["red"]), id_="same"))
    plain = RetrvR1Reranker(model=vl_model, reasoning_budget=0, top_n=None)
    got = plain.postprocess_nodes([inline, *image_nodes(images)], query_str="red")
    want = plain.postprocess_nodes([by_path, *image_nodes(images)], query_str="red")
    assert [n.node.node_id for n in got] == [n.node.node_id for n in want]
    assert [n.score for n in got] == pytest.approx([n.score for n in want])


def test_image_documents_and_multimodal_nodes_are_read(vl_model, text_model, images):
    """ImageDocument (what SimpleDirectoryReader makes of image files) and Node keep their image
    in image_resource, not in ImageNode fields: the reranker must read it, not rank ''."""
    b64 = base64.b64encode(images["green"].read_bytes()).decode()
    nodes = [
        NodeWithScore(node=ImageDocument(image_path=str(images["red"]), id_="doc_path"), score=0.5),
        NodeWithScore(node=ImageDocument(image=b64, id_="doc_b64"), score=0.4),
        NodeWithScore(node=Node(image_resource=MediaResource(path=images["blue"]),
                                text_resource=MediaResource(text="a blue square"), id_="node"), score=0.3),
        NodeWithScore(node=TextNode(text="plain text about the sky", id_="text"), score=0.2),
    ]
    out = RetrvR1Reranker(model=vl_model, top_n=None, reasoning_budget=0).postprocess_nodes(nodes, query_str="green")
    expected = core_ranking(vl_model, "green", nodes, images, reasoning_budget=0)
    by_id = {n.node.node_id: n.score for n in out}
    assert [by_id[i] for i in ("doc_path", "doc_b64", "node", "text")] == pytest.approx(expected.scores)
    assert isinstance({n.node.node_id: n.node for n in out}["doc_b64"], ImageDocument)
    # a text-only model refuses an image document without text instead of ranking ''
    with pytest.raises(ValueError, match="doc_path.*text-only"):
        RetrvR1Reranker(model=text_model, reasoning_budget=0).postprocess_nodes(nodes, query_str="green")
    captioned = RetrvR1Reranker(model=text_model, top_n=None, reasoning_budget=0).postprocess_nodes(nodes[2:], query_str="blue")
    assert {n.node.node_id for n in captioned} == {"node", "text"}


def test_text_model_reads_image_node_text_only(text_model, images, image_server):
    reranker = RetrvR1Reranker(model=text_model, top_n=None, reasoning_budget=0, allow_image_urls=True)
    captioned = NodeWithScore(node=ImageNode(image_path=str(images["red"]), text="a red square", id_="img"))
    url_captioned = NodeWithScore(node=ImageNode(image_url=f"{image_server.base}/blue.png", text="a cat", id_="url"))
    out = reranker.postprocess_nodes([captioned, url_captioned, *nodes_of(TEXTS[:2])], query_str="red")
    assert image_server.requests == []  # no URL fetched
    # ranked on their text alone, exactly as the core ranks the captions (no image, no "image ignored" note)
    expected = text_model.rank("red", ["a red square", "a cat", *TEXTS[:2]], reasoning_budget=0)
    by_id = {n.node.node_id: n.score for n in out}
    assert [by_id[i] for i in ("img", "url", "n0", "n1")] == pytest.approx(expected.scores)
    assert [n.node.node_id for n in out] == [["img", "url", "n0", "n1"][i] for i in expected.order]
    bare = NodeWithScore(node=ImageNode(image_path=str(images["red"]), id_="bare-image"))
    with pytest.raises(ValueError, match="bare-image.*text-only"):
        reranker.postprocess_nodes([bare], query_str="red")


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_index.core", None)
    monkeypatch.delitem(sys.modules, "retrv_r1_plugin.integrations.llama_index")
    with pytest.raises(MissingExtraError, match=r"pip install 'retrv-r1-plugin\[llama-index\]'"):
        importlib.import_module("retrv_r1_plugin.integrations.llama_index")


# ------------------------------------------------------------------ pipelines

CORPUS = [
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
    "The rocket launched from the pad and climbed into the blue sky.",
    "Chlorophyll in leaves absorbs light for photosynthesis.",
    "A cup of coffee is served in a white mug.",
    "Plants need light to grow and produce oxygen.",
    "The cat slept on the sofa all afternoon.",
]


def test_local_embedding_is_a_real_embedding(minilm):
    q = minilm.get_query_embedding("how do plants make sugar?")
    docs = minilm.get_text_embedding_batch([CORPUS[0], CORPUS[3]])
    assert len(q) == 384
    sims = [sum(a * b for a, b in zip(q, d)) for d in docs]
    assert sims[0] > sims[1] + 0.2


def test_query_engine_over_qdrant(boosted_model, minilm):
    client = QdrantClient(":memory:")
    store = QdrantVectorStore(collection_name="docs", client=client)
    index = VectorStoreIndex.from_documents(
        [Document(text=t, metadata={"i": i}) for i, t in enumerate(CORPUS)],
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=minilm,
    )
    question = "how do plants use light?"
    retrieved = index.as_retriever(similarity_top_k=4).retrieve(question)
    assert len(retrieved) == 4
    reranker = RetrvR1Reranker(model=boosted_model, top_n=2, reasoning_budget=4, keep_retrieval_score=True)
    engine = index.as_query_engine(similarity_top_k=4, node_postprocessors=[reranker], llm=MockLLM())
    response = engine.query(question)
    sources = response.source_nodes
    assert len(sources) == 2
    # the model's favourite (the 3rd first-stage hit) is first, whatever its retrieval rank
    assert sources[0].node.node_id == retrieved[WINNER].node.node_id
    assert sources[0].score > 0.9 and sources[0].score >= sources[1].score
    assert sources[0].node.metadata["retrieval_score"] == pytest.approx(retrieved[WINNER].score)
    assert "retrv_r1_reasoning" in sources[0].node.metadata and sources[0].node.metadata["i"] == retrieved[WINNER].node.metadata["i"]
    assert str(response)  # the (mock) synthesizer ran over the reranked nodes


def test_query_engine_with_similarity_top_k_above_max_candidates(small_boosted_model, minilm):
    client = QdrantClient(":memory:")
    index = VectorStoreIndex.from_documents(
        [Document(text=t) for t in CORPUS],
        storage_context=StorageContext.from_defaults(vector_store=QdrantVectorStore(collection_name="many", client=client)),
        embed_model=minilm,
    )
    question = "how do plants use light?"
    retrieved = index.as_retriever(similarity_top_k=6).retrieve(question)
    reranker = RetrvR1Reranker(model=small_boosted_model, top_n=5, reasoning_budget=0)
    engine = index.as_query_engine(similarity_top_k=6, node_postprocessors=[reranker], llm=MockLLM())
    sources = engine.query(question).source_nodes
    assert len(sources) == 5 and sources[0].node.node_id == retrieved[WINNER].node.node_id
    assert {n.node.node_id for n in sources[:4]} == {n.node.node_id for n in retrieved[:4]}
    assert sources[4].node.node_id == retrieved[4].node.node_id and sources[4].score < sources[3].score


def uid(name: str) -> str:
    """Qdrant wants UUID point ids."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


class ColorEmbedding(MultiModalEmbedding):
    """A 3-d image-text embedding: mean RGB of an image; colour words of a text."""

    @classmethod
    def class_name(cls) -> str:
        return "ColorEmbedding"

    def _image(self, source: Any) -> Embedding:
        with Image.open(source) as img:
            r, g, b = (sum(c) / len(c) for c in zip(*img.convert("RGB").getdata()))
        norm = math.sqrt(r * r + g * g + b * b) or 1.0
        return [r / norm, g / norm, b / norm]

    def _text(self, text: str) -> Embedding:
        words = text.lower()
        vec = [float("red" in words), float("green" in words), float("blue" in words)]
        norm = math.sqrt(sum(v * v for v in vec))
        return [v / norm for v in vec] if norm else [1 / math.sqrt(3)] * 3

    def _get_image_embedding(self, img_file_path: Any) -> Embedding:
        return self._image(img_file_path)

    async def _aget_image_embedding(self, img_file_path: Any) -> Embedding:
        return self._image(img_file_path)

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._text(query)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return self._text(query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._text(text)


def test_multimodal_index_mixed_text_and_image_hits(vl_model, minilm, tmp_path):
    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    image_docs = []
    for name, rgb in colors.items():
        path = tmp_path / f"{name}.png"
        solid(rgb).save(path)
        image_docs.append(ImageNode(image_path=str(path), metadata={"name": f"img-{name}"}, id_=uid(f"img-{name}")))
    text_docs = [TextNode(text=t, metadata={"name": f"txt-{i}"}, id_=uid(f"txt-{i}")) for i, t in enumerate(
        ["A red apple on a table.", "The sky is blue today.", "Green leaves in spring.", "Coffee in a white cup."])]
    client = QdrantClient(":memory:")
    index = MultiModalVectorStoreIndex(
        [*text_docs, *image_docs],
        storage_context=StorageContext.from_defaults(vector_store=QdrantVectorStore("mm_text", client=client)),
        image_vector_store=QdrantVectorStore("mm_images", client=client),
        embed_model=minilm,
        image_embed_model=ColorEmbedding(),
    )
    hits = index.as_retriever(similarity_top_k=2, image_similarity_top_k=2).retrieve("something red")
    kinds = {type(h.node).__name__ for h in hits}
    assert kinds == {"TextNode", "ImageNode"} and len(hits) == 4
    assert any(h.node.metadata["name"] == "img-red" for h in hits)

    reranker = RetrvR1Reranker(model=vl_model, top_n=3, reasoning_budget=2, keep_retrieval_score=True)
    out = reranker.postprocess_nodes(hits, query_str="something red")
    assert len(out) == 3
    assert [n.score for n in out] == sorted((n.score for n in out), reverse=True)
    all_scores = reranker.postprocess_nodes(hits, query_bundle=QueryBundle("something red"))
    assert [(n.node.node_id, n.score) for n in all_scores] == [(n.node.node_id, n.score) for n in out]  # query_str or bundle: same
    # first-stage text and image scores (not comparable) are kept aside; the new ones are one distribution
    full = RetrvR1Reranker(model=vl_model, top_n=None, reasoning_budget=2).postprocess_nodes(hits, query_str="something red")
    assert math.isclose(sum(n.score for n in full), 1.0, rel_tol=1e-5)
    assert {n.node.node_id for n in full} == {h.node.node_id for h in hits}
    first_stage = {h.node.node_id: h.score for h in hits}
    assert all(n.node.metadata["retrieval_score"] == first_stage[n.node.node_id] for n in out)


def test_image_to_image_retrieval_then_rerank(vl_model, tmp_path):
    paths = {}
    for name, rgb in {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}.items():
        paths[name] = tmp_path / f"{name}.png"
        solid(rgb).save(paths[name])
    index = MultiModalVectorStoreIndex(
        [ImageNode(image_path=str(p), metadata={"name": f"img-{n}"}, id_=uid(f"img-{n}")) for n, p in paths.items()],
        image_vector_store=QdrantVectorStore("i2i", client=QdrantClient(":memory:")),
        image_embed_model=ColorEmbedding(),
        embed_model=LocalSentenceTransformerEmbedding(),
        is_text_vector_store_empty=True,
    )
    retriever = index.as_retriever(image_similarity_top_k=3)
    hits = retriever.image_to_image_retrieve(str(paths["red"]))
    assert hits[0].node.node_id == uid("img-red") and len(hits) == 3
    bundle = QueryBundle(query_str="", image_path=str(paths["red"]))
    out = RetrvR1Reranker(model=vl_model, top_n=2, reasoning_budget=0).postprocess_nodes(hits, query_bundle=bundle)
    assert len(out) == 2 and all(isinstance(n.node, ImageNode) for n in out)
    # the best two of the core's ranking of the same query image and node images, in its order
    texts = [h.node.get_content(metadata_mode=MetadataMode.EMBED) for h in hits]
    expected = vl_model.rank(Query(text="", image=paths["red"]),
                             [Candidate(t, h.node.image_path) for t, h in zip(texts, hits)], reasoning_budget=0)
    assert [n.node.node_id for n in out] == [hits[i].node.node_id for i in expected.order[:2]]
    assert [n.score for n in out] == pytest.approx([expected.scores[i] for i in expected.order[:2]])


def test_pickling_reloads_the_model_from_its_checkpoint(tmp_path, text_model, caplog):
    """A pickled reranker (multiprocessing) must work when unpickled, or refuse to be pickled:
    LlamaIndex's BaseComponent used to drop the model silently, leaving a reranker without one."""
    import pickle

    make_text_model(seed=4).save_pretrained(tmp_path / "ckpt")
    for model in (str(tmp_path / "ckpt"), RetrvR1Model.from_pretrained(tmp_path / "ckpt")):
        reranker = RetrvR1Reranker(model=model, top_n=2, reasoning_budget=0, device="cpu")
        with caplog.at_level("WARNING"):
            data = pickle.dumps(reranker)
        assert not [r for r in caplog.records if "unpickleable" in r.getMessage()]
        assert len(data) < 10_000  # settings only, not the weights
        copy = pickle.loads(data)
        assert copy.to_dict() == reranker.to_dict() and copy.retrv_r1_model is not reranker.retrv_r1_model
        got = copy.postprocess_nodes(nodes_of(TEXTS), query_str="q")
        want = reranker.postprocess_nodes(nodes_of(TEXTS), query_str="q")
        assert [n.node.node_id for n in got] == [n.node.node_id for n in want]
        assert [n.score for n in got] == pytest.approx([n.score for n in want])
    with pytest.raises(TypeError, match="built in memory.*save_pretrained"):
        pickle.dumps(RetrvR1Reranker(model=text_model))


@pytest.fixture
def redirect_server(image_server):
    """``/to?url=U`` answers 302 to ``U``; ``/endless`` streams bytes with no Content-Length."""
    import http.server
    import threading
    from urllib.parse import parse_qs, urlsplit

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            parts = urlsplit(self.path)
            if parts.path == "/to":
                self.send_response(302)
                self.send_header("Location", parse_qs(parts.query)["url"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:  # HTTP/1.0, body delimited by closing the connection: no length to check up front
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(100):
                        self.wfile.write(b"\0" * 10_000)
                except OSError:
                    pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base = f"http://127.0.0.1:{server.server_port}"  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


def test_image_url_downloads_are_capped_and_never_reach_metadata_addresses(vl_model, images, image_server, redirect_server):
    from retrv_r1_plugin.integrations.llama_index import fetch_image_url

    allowed = RetrvR1Reranker(model=vl_model, reasoning_budget=0, allow_image_urls=True, max_image_url_bytes=1000)

    def fetch(url: str, node_id: str = "n") -> None:
        allowed.postprocess_nodes([NodeWithScore(node=ImageNode(image_url=url, id_=node_id))], query_str="red")

    (images["red"].parent / "big.png").write_bytes(b"\0" * 5000)
    with pytest.raises(ImageLoadError, match="big-node: cannot download .*5000 bytes, above the limit of 1000"):
        fetch(f"{image_server.base}/big.png", "big-node")
    with pytest.raises(ImageLoadError, match="more than 1000 bytes"):  # no Content-Length: counted as it arrives
        fetch(f"{redirect_server.base}/endless")
    for url in ("http://169.254.169.254/latest/meta-data/", f"{redirect_server.base}/to?url=http://169.254.169.254/x",
                "http://[fe80::1]/x", "http://0.0.0.0/x"):
        with pytest.raises(ImageLoadError, match="link-local, unspecified or multicast"):
            fetch(url)
    for url in ("file:///etc/passwd", f"{redirect_server.base}/to?url=file:///etc/passwd", "ftp://host/x.png"):
        with pytest.raises(ImageLoadError, match="only http:// and https://"):
            fetch(url)
    with pytest.raises(ImageLoadError, match="more than 5 redirects"):
        fetch(f"{redirect_server.base}/to?url={redirect_server.base}/to%3Furl%3D{redirect_server.base}/to%253Furl%253D"
              f"{redirect_server.base}/to%25253Furl%25253D{redirect_server.base}/to%2525253Furl%2525253D"
              f"{redirect_server.base}/to%252525253Furl%252525253D{redirect_server.base}/big.png")
    # a redirect to an ordinary address is followed; the bytes are the file's
    red = images["red"].read_bytes()
    assert fetch_image_url(f"{redirect_server.base}/to?url={image_server.base}/red.png") == red
    with pytest.raises(TimeoutError):
        fetch_image_url(f"{redirect_server.base}/endless", timeout=1e-9)
