"""Special tokens of the Retrv-R1 prompt, and safe tokenization of untrusted text.

Every structural token the model reads or writes (reasoning tags, inspection tags,
candidate slots and index labels) is an *added* token. Query and candidate text is
untrusted: it is tokenized with ``split_special_tokens=True`` so that a literal
``"<answer>"`` in a passage becomes ordinary characters, and the result is checked
against the ids of every added token as a second line of defence.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .types import _SURROGATES, replace_surrogates  # noqa: F401  (_SURROGATES: re-exported)

THINK_START = "<think>"
THINK_END = "</think>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
INSPECT_START = "<inspection-index-start>"
INSPECT_END = "<inspection-index-end>"
INSPECTED_START = "<inspected>"
INSPECTED_END = "</inspected>"
CONTENT_SLOT = "<|cand_content|>"
RELATION_SLOT = "<|cand_relation|>"

STRUCTURAL_TOKENS = (
    THINK_START,
    THINK_END,
    ANSWER_START,
    ANSWER_END,
    INSPECT_START,
    INSPECT_END,
    INSPECTED_START,
    INSPECTED_END,
    CONTENT_SLOT,
    RELATION_SLOT,
)


#: transformers switches special-token splitting with a flag on the (shared) backend tokenizer
#: for every call, so a trusted call in another thread could flip it in the middle of an
#: untrusted one: every tokenization here holds this lock.
_TOKENIZE_LOCK = threading.Lock()


def label_token(index: int) -> str:
    """The single-token label of candidate ``index`` (0-based), shown to the model as 1-based."""
    return f"<cand_{index + 1}>"


@dataclass
class SpecialTokenIds:
    """Resolved ids of the structural tokens for one tokenizer."""

    think_start: int
    think_end: int
    answer_start: int
    answer_end: int
    inspect_start: int
    inspect_end: int
    inspected_start: int
    inspected_end: int
    content_slot: int
    relation_slot: int
    labels: list[int]
    eos: list[int]
    forbidden_in_untrusted: frozenset[int] = field(default_factory=frozenset)

    def label_index(self, token_id: int) -> int | None:
        """The 0-based candidate index of a label token id, or ``None``."""
        return self._label_lookup.get(token_id)

    def __post_init__(self) -> None:
        self._label_lookup = {tid: i for i, tid in enumerate(self.labels)}


def add_special_tokens(tokenizer, max_candidates: int) -> list[str]:
    """Add the Retrv-R1 tokens to ``tokenizer``; returns the tokens that were new."""
    wanted = list(STRUCTURAL_TOKENS) + [label_token(i) for i in range(max_candidates)]
    vocab = tokenizer.get_vocab()
    new = [t for t in wanted if t not in vocab]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return new


def resolve_special_tokens(tokenizer, max_candidates: int) -> SpecialTokenIds:
    """Look up the ids of all structural tokens; raises if the tokenizer lacks any of them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in STRUCTURAL_TOKENS if t not in vocab]
    missing += [label_token(i) for i in range(max_candidates) if label_token(i) not in vocab]
    if missing:
        raise ValueError(f"tokenizer is missing Retrv-R1 tokens: {missing[:5]}...")
    eos: list[int] = []
    for tok in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if tok is not None and tok in vocab and vocab[tok] not in eos:
            eos.append(vocab[tok])
    forbidden = set(tokenizer.added_tokens_decoder.keys())
    forbidden.update(i for i in tokenizer.all_special_ids if i is not None)
    return SpecialTokenIds(
        think_start=vocab[THINK_START],
        think_end=vocab[THINK_END],
        answer_start=vocab[ANSWER_START],
        answer_end=vocab[ANSWER_END],
        inspect_start=vocab[INSPECT_START],
        inspect_end=vocab[INSPECT_END],
        inspected_start=vocab[INSPECTED_START],
        inspected_end=vocab[INSPECTED_END],
        content_slot=vocab[CONTENT_SLOT],
        relation_slot=vocab[RELATION_SLOT],
        labels=[vocab[label_token(i)] for i in range(max_candidates)],
        eos=eos,
        forbidden_in_untrusted=frozenset(forbidden),
    )


def tokenize_untrusted(tokenizer, text: str, forbidden: frozenset[int]) -> list[int]:
    """Tokenize text that must never produce a special or added token.

    Lone surrogates (not encodable as UTF-8, e.g. from a broken JSON escape) become U+FFFD.
    """
    if not text:
        return []
    text = replace_surrogates(text)
    with _TOKENIZE_LOCK:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if any(i in forbidden for i in ids):
        # Tokenizers whose added tokens are not flagged special may still match them even
        # with split_special_tokens; drop those ids rather than let them reach the model.
        ids = [i for i in ids if i not in forbidden]
    return ids


def tokenize_trusted(tokenizer, text: str) -> list[int]:
    """Tokenize the package's own prompt text, where special tokens are meant."""
    if not text:
        return []
    with _TOKENIZE_LOCK:
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def init_added_embeddings(model, tokenizer, new_tokens: list[str]) -> None:
    """Give newly added tokens a meaningful start instead of random rows.

    Label ``<cand_12>`` starts as the mean embedding of the text ``"12"``; the other
    structural tokens start as the mean embedding of their spelled-out text. Output rows
    (when untied) are initialised the same way.
    """
    if not new_tokens:
        return
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    out_w = out.weight if out is not None and out.weight is not emb else None
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        for tok in new_tokens:
            spelled = tok.strip("<>|/").replace("cand_", "candidate ").replace("-", " ").replace("_", " ")
            ids = tokenizer(spelled, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ids = [i for i in ids if i < emb.shape[0] and i not in tokenizer.added_tokens_decoder]
            if not ids:
                continue
            row = vocab[tok]
            emb[row] = emb[ids].mean(0)
            if out_w is not None:
                out_w[row] = out_w[ids].mean(0)
