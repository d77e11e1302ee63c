"""Retrv-R1 reasoning reranker for RAG pipelines."""
__version__ = "0.1.0"
