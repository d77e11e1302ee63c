"""Load and determinism: concurrent calls equal sequential ones; out-of-memory batches split.

* Many concurrent rerank calls (threads, and asyncio through the LlamaIndex and LangChain
  adapters) give exactly the results of the same calls made one by one (greedy decoding).
* A batch that does not fit in memory is split in halves rather than failing: an OOM is
  injected into the ICM (and the vision tower) when a batch is larger than N, and the
  results must equal the unsplit ones, with the split recorded in ``notes``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from retrv_r1_plugin.context import is_out_of_memory, map_batches
from retrv_r1_plugin.icm import AttentionStack
from retrv_r1_plugin.types import Candidate, Query, RankResult

from conftest import make_text_model, make_vl_model, solid

TEXTS = [
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
    "The rocket launched from the pad and climbed into the blue sky.",
    "Chlorophyll in leaves absorbs light for photosynthesis.",
    "A cup of coffee is served in a white mug.",
    "Plants need light to grow and produce oxygen.",
    "The cat slept on the sofa all afternoon.",
    "Paris is the capital and largest city of France.",
    "Bread is baked from a dough of flour and water.",
]
QUERIES = ["how do plants make sugar?", "space launch", "hot drinks", "where is the capital of France?", "pets at home", "baking"]


def calls(n: int = 24) -> list[tuple[str, list[str], dict]]:
    """Varied rerank calls: different queries, candidate counts, modes and budgets."""
    out = []
    for i in range(n):
        k = 2 + i % 6
        cands = [TEXTS[(i + j) % len(TEXTS)] for j in range(k)]
        kwargs = dict(reasoning_budget=[0, 3, 6][i % 3], compression="none" if i % 4 == 3 else "icm", max_inspections=1)
        out.append((QUERIES[i % len(QUERIES)], cands, kwargs))
    return out


def signature(r: RankResult) -> tuple:
    """Everything a caller sees of a ranking, for exact comparison."""
    return (r.order, r.scores, r.reasoning, r.inspected, r.answer, r.fallback, r.notes, r.usage, [c.text for c in r.candidates])


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: intra-op threads only add contention on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return make_text_model(seed=0, max_candidates=16)


# ====================================================================== threads
def test_threaded_rerank_equals_sequential(model):
    jobs = calls(24)
    sequential = [signature(model.rank(q, c, **kw)) for q, c, kw in jobs]
    assert len({s[1][0] for s in sequential}) > 1  # the calls really differ
    barrier = threading.Barrier(8)

    def run(index):
        q, c, kw = jobs[index]
        if index < 8:
            barrier.wait(timeout=60)  # the first eight start together
        return signature(model.rank(q, c, **kw))

    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(run, range(len(jobs))))
    assert concurrent == sequential


def test_threads_over_two_models_and_seeded_sampling(model):
    """Two models running at once (separate locks) and seeded sampling stay reproducible."""
    other = make_text_model(seed=3, max_candidates=16)
    jobs = [(m, q, c, dict(kw, do_sample=True, temperature=1.3, seed=i)) for i, (q, c, kw) in enumerate(calls(16)) for m in (model, other)]
    sequential = [signature(m.rank(q, c, **kw)) for m, q, c, kw in jobs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(lambda job: signature(job[0].rank(job[1], job[2], **job[3])), jobs))
    assert concurrent == sequential
    assert sequential[0] != sequential[1]  # the two models really differ


def test_threaded_vl_rerank_equals_sequential():
    vl = make_vl_model(seed=1, max_candidates=8)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    jobs = []
    for i in range(8):
        cands = [Candidate(text=f"swatch {j}", image=solid(colors[(i + j) % 4], (28 + 14 * j, 28))) for j in range(2 + i % 3)]
        query = Query(text="a red square", image=solid(colors[i % 4])) if i % 2 else "a green square"
        jobs.append((query, cands, dict(reasoning_budget=i % 3, compression="icm" if i % 2 else "none")))
    sequential = [signature(vl.rank(q, c, **kw)) for q, c, kw in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda job: signature(vl.rank(job[0], job[1], **job[2])), jobs))
    assert concurrent == sequential


# ====================================================================== asyncio through the adapters
def _node_view(nodes) -> list[tuple]:
    return [(n.node.node_id, n.score, n.node.metadata["retrv_r1_fallback"], n.node.metadata["retrv_r1_reasoning"]) for n in nodes]


async def test_llama_index_apostprocess_nodes_concurrently(model):
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeWithScore, TextNode

    from retrv_r1_plugin.integrations.llama_index import RetrvR1Reranker

    reranker = RetrvR1Reranker(model=model, top_n=4, reasoning_budget=4, metadata_mode="none")
    jobs = []
    for q, cands, _ in calls(20):
        nodes = [NodeWithScore(node=TextNode(text=t, id_=f"{q[:6]}-{j}"), score=1.0 / (j + 1)) for j, t in enumerate(cands)]
        jobs.append((q, nodes))
    sequential = [_node_view(reranker.postprocess_nodes(nodes, query_str=q)) for q, nodes in jobs]
    concurrent = await asyncio.gather(*(reranker.apostprocess_nodes(nodes, query_str=q) for q, nodes in jobs))
    assert [_node_view(r) for r in concurrent] == sequential


async def test_langchain_ainvoke_and_acompress_concurrently(model):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from retrv_r1_plugin.integrations.langchain import RetrvR1Compressor, RetrvR1Retriever

    def search(query: Query, top_k: int) -> list[Candidate]:
        offset = sum(map(ord, query.text)) % len(TEXTS)
        return [Candidate(TEXTS[(offset + j) % len(TEXTS)], id=f"doc{(offset + j) % len(TEXTS)}") for j in range(top_k)]

    retriever = RetrvR1Retriever(model=model, store=search, k=3, first_stage_k=5, reasoning_budget=4)
    queries = [q + suffix for q in QUERIES for suffix in ("", "?", " now")]

    def view(docs):
        return [(d.id, d.metadata["relevance_score"], d.metadata["retrv_r1_fallback"], d.metadata["retrv_r1_reasoning"]) for d in docs]

    sequential = [view(retriever.invoke(q)) for q in queries]
    concurrent = await asyncio.gather(*(retriever.ainvoke(q) for q in queries))
    assert [view(d) for d in concurrent] == sequential

    compressor = RetrvR1Compressor(model=model, top_n=None, reasoning_budget=2)
    batches = [[Document(page_content=t, id=f"d{j}") for j, t in enumerate(c)] for _, c, _ in calls(12)]
    sequential = [view(compressor.compress_documents(docs, QUERIES[i % 6])) for i, docs in enumerate(batches)]
    concurrent = await asyncio.gather(*(compressor.acompress_documents(docs, QUERIES[i % 6]) for i, docs in enumerate(batches)))
    assert [view(d) for d in concurrent] == sequential


# ====================================================================== out of memory: split, same results
class InjectedOOM:
    """Make every ICM attention stack raise an OOM when its batch is larger than ``limit``."""

    def __init__(self, monkeypatch, limit: int, error=None) -> None:
        self.limit, self.sizes, self.raised = limit, [], 0
        self.error = error or (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        original = AttentionStack.forward

        def forward(stack, q, kv, kv_mask):
            self.sizes.append(q.shape[0])
            if q.shape[0] > self.limit:
                self.raised += 1
                raise self.error()
            return original(stack, q, kv, kv_mask)

        monkeypatch.setattr(AttentionStack, "forward", forward)


def test_is_out_of_memory_recognises_accelerator_and_cpu_allocation_failures():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only runtime errors are allocation failures


def test_map_batches_halves_on_oom_and_keeps_order():
    seen = []

    def fn(batch):
        seen.append(len(batch))
        if len(batch) > 3:
            raise torch.OutOfMemoryError("out of memory")
        return [x * 10 for x in batch]

    notes: list[str] = []
    assert map_batches(fn, list(range(11)), 16, what="test", notes=notes) == [x * 10 for x in range(11)]
    assert seen[:3] == [11, 5, 2] and all(s <= 3 for s in seen[2:])
    assert notes == ["test: a batch of 11 ran out of memory; split into batches of 5", "test: a batch of 5 ran out of memory; split into batches of 2"]
    with pytest.raises(torch.OutOfMemoryError):  # one item that does not fit: nothing left to split
        map_batches(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")), [1, 2], 2, what="t")


@pytest.mark.parametrize("kind", ["accelerator", "cpu"])
@pytest.mark.parametrize("budget", [0, 4])
def test_icm_oom_is_split_and_gives_the_unsplit_results(model, monkeypatch, kind, budget):
    cands = TEXTS[:7]
    expected = model.rank("how do plants make sugar?", cands, reasoning_budget=budget)
    error = None
    if kind == "cpu":
        error = lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes")  # noqa: E731
    oom = InjectedOOM(monkeypatch, limit=2, error=error)
    got = model.rank("how do plants make sugar?", cands, reasoning_budget=budget)
    assert oom.raised >= 4 and sorted(set(oom.sizes)) == [1, 3, 7]  # 7 fails, 3 fails, then one by one
    assert got.scores == pytest.approx(expected.scores, rel=1e-5, abs=1e-7)
    assert got.order == expected.order and got.reasoning == expected.reasoning
    split_notes = [n for n in got.notes if "ran out of memory" in n]
    assert "ICM content tokens: a batch of 7 ran out of memory; split into batches of 3" in split_notes
    assert "ICM relation tokens: a batch of 3 ran out of memory; split into batches of 1" in split_notes
    assert [n for n in got.notes if n not in split_notes] == expected.notes


def test_other_errors_and_single_candidate_oom_are_not_swallowed(model, monkeypatch):
    InjectedOOM(monkeypatch, limit=0)  # even one candidate does not fit
    with pytest.raises(torch.OutOfMemoryError):
        model.rank("q", TEXTS[:3], reasoning_budget=0)
    monkeypatch.undo()
    InjectedOOM(monkeypatch, limit=1, error=lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model.rank("q", TEXTS[:3], reasoning_budget=0)


def test_icm_batch_size_bounds_every_icm_forward(model, monkeypatch):
    expected = model.rank("plants", TEXTS, reasoning_budget=0)
    oom = InjectedOOM(monkeypatch, limit=10**6)  # records batch sizes, never raises
    got = model.rank("plants", TEXTS, reasoning_budget=0, icm_batch_size=3)
    assert oom.sizes and max(oom.sizes) == 3 and oom.raised == 0
    assert got.scores == pytest.approx(expected.scores, rel=1e-5, abs=1e-7) and got.notes == expected.notes
    oom.sizes.clear()
    monkeypatch.setitem(model.config.extra, "icm_batch_size", 2)
    assert model.rank("plants", TEXTS, reasoning_budget=0).scores == pytest.approx(expected.scores, rel=1e-5, abs=1e-7)
    assert max(oom.sizes) == 2
    with pytest.raises(ValueError, match="icm_batch_size must be a positive int"):
        model.rank("plants", TEXTS, reasoning_budget=0, icm_batch_size=0)


def test_encode_candidates_and_rank_batch_split_on_oom(model, monkeypatch, caplog):
    queries = ["plants", Query(text="space"), "coffee"]
    lists = [TEXTS[:7], TEXTS[2:8], TEXTS[:4]]
    tokens = model.encode_candidates(TEXTS, batch_size=8)
    batch = model.rank_batch(queries, lists, reasoning_budget=3)
    oom = InjectedOOM(monkeypatch, limit=2)
    with caplog.at_level(logging.WARNING, logger="retrv_r1_plugin.context"):
        split_tokens = model.encode_candidates(TEXTS, batch_size=8)
    assert oom.raised and any("ICM content tokens: a batch of 8 ran out of memory" in r.getMessage() for r in caplog.records)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(split_tokens, tokens)) and len(split_tokens) == len(TEXTS)
    split_batch = model.rank_batch(queries, lists, reasoning_budget=3)
    for got, want in zip(split_batch, batch):
        assert got.scores == pytest.approx(want.scores, rel=1e-5, abs=1e-7) and got.order == want.order
        assert any("ran out of memory" in n for n in got.notes)


def test_vision_tower_oom_is_split_and_gives_the_unsplit_results(monkeypatch):
    vl = make_vl_model(seed=2, max_candidates=8)
    cands = [Candidate(text=f"img {i}", image=solid(c, (28 * (i + 1), 28))) for i, c in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250), (9, 9, 9)])]
    expected = vl.rank("which one is red?", cands, reasoning_budget=0)
    original = vl.backbone.encode_images
    sizes = []

    def encode_images(images):
        sizes.append(len(images))
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(images)

    monkeypatch.setattr(vl.backbone, "encode_images", encode_images)
    got = vl.rank("which one is red?", cands, reasoning_budget=0)
    assert sizes[:3] == [4, 2, 1] and max(sizes[2:]) == 1
    assert got.scores == pytest.approx(expected.scores, rel=1e-4, abs=1e-6) and got.order == expected.order
    assert "vision encoder: a batch of 4 ran out of memory; split into batches of 2" in got.notes
