"""First-stage candidate store (Qdrant) and its embedders.

Example::

    from retrv_r1_plugin.store import QdrantCandidateStore
    from retrv_r1_plugin.types import Candidate

    with QdrantCandidateStore(location=":memory:") as store:
        store.add([Candidate("Paris is the capital of France.", id="p1")])
        hits = store.search("capital of France", top_k=5)  # list[Candidate]
"""

from .embedders import (
    DEFAULT_TEXT_MODEL,
    ImageTextEmbedder,
    SentenceTransformerImageTextEmbedder,
    TextEmbedder,
    TextEmbedderProtocol,
    default_text_model_path,
)
from .qdrant import (
    CollectionMismatchError,
    ImageEmbedderRequiredError,
    QdrantCandidateStore,
    StoreLockedError,
    StoreUnavailableError,
    UnknownCandidateError,
    default_store_path,
    first_stage_query,
    point_id,
)

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "CollectionMismatchError",
    "ImageEmbedderRequiredError",
    "ImageTextEmbedder",
    "QdrantCandidateStore",
    "SentenceTransformerImageTextEmbedder",
    "StoreLockedError",
    "StoreUnavailableError",
    "TextEmbedder",
    "TextEmbedderProtocol",
    "UnknownCandidateError",
    "default_store_path",
    "first_stage_query",
    "default_text_model_path",
    "point_id",
]
