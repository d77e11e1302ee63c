"""A LangChain LCEL chain over embedded Qdrant, reranked by Retrv-R1.

Indexes the bundled sample corpus (text passages and captioned photos) into an embedded
Qdrant collection (temporary folder, offline MiniLM embedder), caches each candidate's
compressed content token ``t_con`` in the store when the model uses the ICM, and runs

    {question} -> RetrvR1Retriever (Qdrant first stage + Retrv-R1 rerank)
               -> format docs (scores, reasoning) -> PromptTemplate -> LLM -> answer

then shows the other way in: ``ContextualCompressionRetriever`` with ``RetrvR1Compressor``
reranking a plain langchain-qdrant retriever over the same collection.

    python examples/langchain_chain.py                          # bundled default model (see README)
    python examples/langchain_chain.py --model PATH             # any Retrv-R1 checkpoint or backbone folder
    python examples/langchain_chain.py --query "a photo of a cat" --query "coffee"

Everything runs offline. There is no offline chat LLM to generate the answer, so the "LLM"
of the chain is a stand-in that quotes the top-ranked passage; swap in any LangChain chat
model (``ChatOllama``, ``ChatOpenAI``, ...) for a generated answer. The point here is the
retrieval part.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from langchain_core.embeddings import Embeddings  # noqa: E402

from retrv_r1_plugin.cli import DEFAULT_MODEL  # noqa: E402  (the bundled text reranker)
SAMPLE = Path(__file__).resolve().parent.parent / "retrv_r1_plugin" / "data" / "sample"
COLLECTION = "langchain_chain"

PROMPT = """Answer the question using only the context. The context passages were reranked by
Retrv-R1; the first one is the model's best match.

Context:
{context}

Question: {question}
Answer:"""


def sample_queries() -> list[str]:
    with (SAMPLE / "queries.jsonl").open() as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


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


def format_docs(docs) -> str:
    """The reranked documents as numbered context lines with their scores."""
    lines = []
    for i, doc in enumerate(docs, 1):
        meta = doc.metadata
        kind = "[image] " if meta.get("image_path") or meta.get("image_b64") else ""
        first = meta.get("retrieval_score", math.nan)
        flag = " (inspected)" if meta.get("retrv_r1_inspected") else ""
        lines.append(f"[{i}] score {meta['relevance_score']:.3f} (first stage {first:.3f}){flag}  {kind}{doc.page_content}")
    return "\n".join(lines)


def reasoning_of(docs) -> str:
    """The model's reasoning for the query (the same trace is on every returned document)."""
    if not docs:
        return ""
    meta = docs[0].metadata
    text = " ".join(str(meta.get("retrv_r1_reasoning") or "").split())
    if meta.get("retrv_r1_fallback"):
        text = f"[fallback: {meta['retrv_r1_fallback']}] {text}".strip()
    return text


def extractive_llm(prompt_value) -> str:
    """Offline stand-in for a chat model: answers with the top-ranked context passage.

    No chat LLM runs offline here (and a 135M model would not answer well anyway); what this
    example demonstrates is the retrieval and reranking that feed the prompt. Replace this
    ``RunnableLambda`` with any LangChain LLM or chat model: the rest of the chain is unchanged.
    """
    text = prompt_value.to_string()
    match = re.search(r"^\[1\] score [^\n]*?\)\s+(?:\(inspected\)\s+)?(?:\[image\]\s+)?(.*)$", text, flags=re.MULTILINE)
    if match is None:
        return "I found nothing relevant in the context."
    return f"According to the best-ranked passage: {match.group(1).strip()}"


class StoreEmbeddings(Embeddings):
    """LangChain ``Embeddings`` over the store's embedder (so langchain-qdrant can share the collection)."""

    def __init__(self, embedder) -> None:
        self.embedder = embedder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [[float(x) for x in v] for v in self.embedder.embed_texts(list(texts))]

    def embed_query(self, text: str) -> list[float]:
        embed = getattr(self.embedder, "embed_queries", None) or self.embedder.embed_texts
        return [float(x) for x in embed([text])[0]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Retrv-R1 checkpoint path or bundled name")
    parser.add_argument("--query", action="append", help="question to ask (repeatable; default: the sample queries)")
    parser.add_argument("--store", help="embedded Qdrant folder (default: a temporary folder)")
    parser.add_argument("--reasoning-budget", type=int, default=None, help="reasoning tokens per query (default: the model's)")
    parser.add_argument("--first-stage-k", type=int, default=8, help="first-stage candidates reranked")
    parser.add_argument("--k", type=int, default=3, help="documents kept after reranking")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import PromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough
    from langchain_qdrant import QdrantVectorStore

    from retrv_r1_plugin.cli import read_corpus
    from retrv_r1_plugin.integrations.langchain import RetrvR1Compressor, RetrvR1Retriever
    from retrv_r1_plugin.store import QdrantCandidateStore

    started = time.perf_counter()
    queries = args.query or sample_queries()
    store_dir = args.store or temporary_folder("retrv-r1-langchain-")
    model, description = load_reranker_model(args.model)
    print(f"reranker: {description}")
    print(f"  backbone {model.backbone.model_type}, compression={model.config.compression}, max_candidates={model.config.max_candidates}")

    with QdrantCandidateStore(path=store_dir, collection_name=COLLECTION) as store:
        corpus = read_corpus(SAMPLE / "corpus.jsonl")
        ids = store.add(corpus, show_progress=False)
        print(f"indexed {len(ids)} candidates ({sum(c.image is not None for c in corpus)} images) into embedded Qdrant at {store_dir}")
        if model.config.compression == "icm":
            # t_con is query-independent: compute it once at indexing time; the retriever
            # asks the store for it (with_content_tokens=model.content_signature).
            store.put_content_tokens(ids, model.encode_candidates(corpus), model.content_signature, contents=corpus)
            print(f"cached content tokens t_con for {len(ids)} candidates (signature {model.content_signature})")

        first_stage_k = min(args.first_stage_k, model.config.max_candidates)
        retriever = RetrvR1Retriever(
            model=model, store=store, k=args.k, first_stage_k=first_stage_k, reasoning_budget=args.reasoning_budget
        )
        llm = RunnableLambda(extractive_llm)  # stand-in for a chat model, see extractive_llm
        prompt = PromptTemplate.from_template(PROMPT)
        chain = (
            RunnableParallel(docs=retriever, question=RunnablePassthrough())
            .assign(context=lambda x: format_docs(x["docs"]), reasoning=lambda x: reasoning_of(x["docs"]))
            .assign(answer=prompt | llm | StrOutputParser())
        )

        print(f"\n== LCEL chain: RetrvR1Retriever (top {first_stage_k} from Qdrant -> best {args.k}) | prompt | LLM ==")
        for question in queries:
            out = chain.invoke(question)
            print(f"\nQ: {question}")
            print("\n".join("  " + line for line in out["context"].splitlines()))
            if out["reasoning"]:
                print(f"  reasoning: {out['reasoning'][:300]}")
            print(f"  A: {out['answer']}")

        # The other way in: rerank any LangChain retriever's results. langchain-qdrant reads
        # the same collection (the store writes its page_content/metadata payload layout).
        print(f"\n== ContextualCompressionRetriever(RetrvR1Compressor, langchain-qdrant top {first_stage_k}) ==")
        vectorstore = QdrantVectorStore(client=store.client, collection_name=COLLECTION, embedding=StoreEmbeddings(store.embedder))
        compression = ContextualCompressionRetriever(
            base_compressor=RetrvR1Compressor(model=model, top_n=args.k, reasoning_budget=args.reasoning_budget),
            base_retriever=vectorstore.as_retriever(search_kwargs={"k": first_stage_k}),
        )
        for question in queries:
            docs = compression.invoke(question)
            print(f"\nQ: {question}")
            for rank, doc in enumerate(docs, 1):
                meta = doc.metadata
                kind = "[image] " if meta.get("image_path") else ""
                print(f"  {rank}. score {meta['relevance_score']:.3f}  {kind}{doc.page_content[:90]}")

    print(f"\ndone in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
