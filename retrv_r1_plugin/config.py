"""Configuration of a Retrv-R1 model, saved as ``retrv_r1.json`` next to its weights."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .backbone import ModelLoadError
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
    """Pixel cap of images for a grafted vision tower (``vision_graft``). Ordinary Qwen-VL
    backbones keep their own image processor's ``max_pixels`` (``preprocessor_config.json``,
    else the processor's default); set it there to change how many tokens an image costs."""
    vision_graft: dict[str, Any] | None = None
    """A Qwen2.5-VL vision tower grafted onto the text backbone ``backbone_source``
    (:class:`~retrv_r1_plugin.graft.VisionGraftConfig` fields); its trained weights are in
    ``vision_tower.safetensors``. ``None`` for ordinary backbones."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.icm, dict):
            self.icm = ICMConfig(**self.icm)
        if not isinstance(self.icm, ICMConfig):
            raise TypeError(f"icm must be an ICMConfig or a dict of its fields, got {type(self.icm).__name__}")
        if self.compression not in ("icm", "none"):
            raise ValueError(f"compression must be 'icm' or 'none', got {self.compression!r}")
        for name, least in (("max_candidates", 1), ("max_candidate_tokens", 1), ("max_query_tokens", 1),
                            ("reasoning_budget", 0), ("max_inspections", 0), ("image_max_pixels", 1)):
            _check_int(name, getattr(self, name), least)
        if self.max_context_tokens is not None:
            _check_int("max_context_tokens", self.max_context_tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> "RetrvR1Config":
        """Read ``retrv_r1.json``; a missing, unreadable, corrupt or invalid file raises
        :class:`~retrv_r1_plugin.backbone.ModelLoadError` naming it."""
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in data]
            if missing:
                raise ValueError(f"missing key(s) {', '.join(map(repr, missing))}")
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ModelLoadError(f"cannot read the Retrv-R1 config {path}: {exc}") from exc

    def replace(self, **overrides: Any) -> "RetrvR1Config":
        """A copy with ``overrides`` applied, validated like a new config (unknown fields raise
        ``TypeError``, bad values ``ValueError``)."""
        known = {f.name for f in fields(self)}
        unknown = [k for k in overrides if k not in known]
        if unknown:
            raise TypeError(f"unknown RetrvR1Config field(s) {', '.join(map(repr, unknown))}")
        return type(self)(**{**self.to_dict(), **overrides})


def _check_int(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
