"""Configuration of a Retrv-R1 model, saved as ``retrv_r1.json`` next to its weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .icm import ICMConfig

Compression = Literal["icm", "none"]
CONFIG_NAME = "retrv_r1.json"

DEFAULT_SYSTEM_PROMPT = (
    "You rerank retrieval candidates. Each candidate is labelled <cand_N>. Think inside "
    "<think> </think>: picture the ideal result, drop clear mismatches, and when a candidate's "
    "compressed view is not enough, inspect it in full by writing <inspection-index-start>"
    "<cand_N><inspection-index-end>. Then give the best candidate as <answer><cand_N></answer>."
)


@dataclass
class RetrvR1Config:
    """Everything needed to rebuild a :class:`~retrv_r1_plugin.model.RetrvR1Model`.

    Generation defaults (``reasoning_budget``, ``max_inspections``) can be overridden per call.
    """

    icm: ICMConfig
    backbone_source: str | None = None
    """Where the backbone comes from: a local path, ``pkg:<package>``, or a hub id. ``None``
    means the backbone weights are saved inside the checkpoint."""
    gguf_file: str | None = None
    model_type: str = ""
    compression: Compression = "icm"
    max_candidates: int = 64
    """How many index labels exist; a call with more candidates is refused with a clear error."""
    max_candidate_tokens: int = 512
    """Text tokens kept per candidate; longer candidates are truncated with a note."""
    max_query_tokens: int = 256
    max_context_tokens: int | None = None
    """Cap on the whole context; ``None`` uses the backbone's ``max_position_embeddings``."""
    reasoning_budget: int = 256
    """Tokens the model may write before it must answer; 0 scores directly, without thinking."""
    max_inspections: int = 3
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    label_after_candidate: bool = False
    """Also write each candidate's label right after its content (``<cand_i>: ... <cand_i>``),
    so the label sits next to the text that decides a match (ours, not the paper's)."""
    query_after_candidates: bool = False
    """Repeat the query after the candidate list, right before the answer (as RankGPT-style
    prompts do), so the position that answers reads the query nearby (ours, not the paper's)."""
    image_max_pixels: int = 256 * 28 * 28
    vision_graft: dict[str, Any] | None = None
    """A Qwen2.5-VL vision tower grafted onto the text backbone ``backbone_source``
    (:class:`~retrv_r1_plugin.graft.VisionGraftConfig` fields); its trained weights are in
    ``vision_tower.safetensors``. ``None`` for ordinary backbones."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.icm, dict):
            self.icm = ICMConfig(**self.icm)
        if self.compression not in ("icm", "none"):
            raise ValueError(f"compression must be 'icm' or 'none', got {self.compression!r}")
        if self.max_candidates < 1:
            raise ValueError("max_candidates must be at least 1")
        if self.reasoning_budget < 0 or self.max_inspections < 0:
            raise ValueError("reasoning_budget and max_inspections must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> "RetrvR1Config":
        data = json.loads((Path(directory) / CONFIG_NAME).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
