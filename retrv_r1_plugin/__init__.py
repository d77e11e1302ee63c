"""Retrv-R1 reasoning reranker for RAG pipelines.

The framework-free core is importable from here; framework adapters live in
``retrv_r1_plugin.integrations`` (LlamaIndex, LangChain) behind pip extras, and the
Qdrant candidate store in ``retrv_r1_plugin.store``.
"""

from .backbone import ModelLoadError, smollm2_source
from .config import RetrvR1Config
from .icm import ICMConfig, InformationCompressionModule
from .model import ContextOverflowError, RetrvR1Model, TooManyCandidatesError
from .types import (
    Candidate,
    EmptyCandidatesError,
    ImageLoadError,
    NoAnswerError,
    Query,
    RankResult,
    RetrvR1Error,
    TokenUsage,
    load_image,
)

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "ContextOverflowError",
    "EmptyCandidatesError",
    "ICMConfig",
    "ImageLoadError",
    "InformationCompressionModule",
    "ModelLoadError",
    "NoAnswerError",
    "Query",
    "RankResult",
    "RetrvR1Config",
    "RetrvR1Error",
    "RetrvR1Model",
    "TokenUsage",
    "TooManyCandidatesError",
    "load_image",
    "smollm2_source",
]
