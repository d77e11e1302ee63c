"""``RetrvR1Model``: the reranker (backbone + ICM + inspection-aware generation)."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import numbers
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import Backbone, ModelLoadError, load_backbone, resolve_source
from .config import CONFIG_NAME, Compression, RetrvR1Config
from .context import Chunk, ContextBuilder, Encoded, map_batches, pad_embeddings
from .generation import ANSWER_OUT_OF_RANGE, FORCED_ANSWER, MAX_FORCED_TOKENS, GenerationTrace, InspectionDecoder, SamplingConfig
from .graft import VISION_WEIGHTS, graft_vision_tower, load_vision_tower_state, vision_tower_state
from .icm import ICMConfig, InformationCompressionModule
from .tokens import add_special_tokens, init_added_embeddings, label_token, resolve_special_tokens
from .types import Candidate, EmptyCandidatesError, NoAnswerError, Query, RankResult, RetrvR1Error, TokenUsage
from .windows import rank_in_windows

logger = logging.getLogger(__name__)

ICM_WEIGHTS = "icm.safetensors"
TOKEN_ROWS = "token_embeddings.safetensors"
BACKBONE_DIR = "backbone"
ADAPTER_DIR = "adapter"

#: Candidates per ICM forward when neither the call (``icm_batch_size=``) nor the config
#: (``config.extra["icm_batch_size"]``) says otherwise; a batch that runs out of memory is
#: split further, down to one candidate.
DEFAULT_ICM_BATCH_SIZE = 32


class TooManyCandidatesError(RetrvR1Error, ValueError):
    """More candidates than the model has index labels."""


class ContextOverflowError(RetrvR1Error, ValueError):
    """The prompt cannot be made to fit the backbone's context."""


def bundled_checkpoint(name: str) -> Path | None:
    """Path of a checkpoint shipped with the package (``retrv_r1_plugin/checkpoints/<name>``)."""
    path = Path(__file__).parent / "checkpoints" / name
    return path if (path / CONFIG_NAME).is_file() else None


def bundled_checkpoints() -> list[str]:
    """Names of the checkpoints shipped with the package (for :meth:`RetrvR1Model.from_pretrained`)."""
    root = Path(__file__).parent / "checkpoints"
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file()) if root.is_dir() else []


def _bundled_hint(source: str) -> str:
    names = bundled_checkpoints()
    if not names:
        return ""
    close = difflib.get_close_matches(Path(source).name, names, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f" ({guess}bundled checkpoints: {', '.join(names)})"


class RetrvR1Model(nn.Module):
    """A Retrv-R1 reranker over a Hugging Face backbone.

    Build one with :meth:`from_pretrained` (a saved Retrv-R1 checkpoint, a bundled default
    name, or a plain backbone directory) or :meth:`from_backbone`. Rank with :meth:`rank`.
    """

    def __init__(self, backbone: Backbone, config: RetrvR1Config, icm: InformationCompressionModule | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.lm = backbone.model  # registered so .to()/.parameters() cover the backbone
        self.icm = icm or InformationCompressionModule(config.icm)
        self.icm.to(backbone.device)
        self.special = resolve_special_tokens(backbone.tokenizer, config.max_candidates)
        self.builder = ContextBuilder(backbone, self.special, config.system_prompt, label_after_candidate=config.label_after_candidate,
                                     query_after_candidates=config.query_after_candidates)
        self.decoder = InspectionDecoder(backbone, self.builder, self.special)
        self._lock = threading.RLock()
        self._signature: str | None = None
        self._signature_version = 0  # bumped by invalidate_signature, even while a hash runs
        self.backbone_modified = config.backbone_source is None
        self.icm_available = True
        """False for a checkpoint shipped without ICM weights (:meth:`drop_icm`): compression
        ``'icm'`` is then refused instead of running an untrained module."""
        self.name_or_path: str | None = None
        """What :meth:`from_pretrained` was given (a path or a bundled name), so adapters that
        serialise their settings can load the same model again; ``None`` when built in memory."""

    # ================================================================ construction
    @classmethod
    def from_backbone(cls, backbone: Backbone, *, backbone_source: str | None = None, gguf_file: str | None = None, **overrides: Any) -> "RetrvR1Model":
        """Wrap a loaded backbone: add the Retrv-R1 tokens and a fresh (untrained) ICM."""
        icm_kwargs = overrides.pop("icm", {}) or {}
        if isinstance(icm_kwargs, ICMConfig):
            icm_kwargs = icm_kwargs.to_dict()
        icm_kwargs = {**icm_kwargs, "hidden_size": backbone.hidden_size}
        icm_cfg = ICMConfig(**icm_kwargs)
        icm_cfg.output_scale = backbone.embedding_rms()
        config = RetrvR1Config(icm=icm_cfg, backbone_source=backbone_source, gguf_file=gguf_file, model_type=backbone.model_type, **overrides)
        new = add_special_tokens(backbone.tokenizer, config.max_candidates)
        emb = backbone.model.get_input_embeddings()
        if len(backbone.tokenizer) > emb.weight.shape[0]:
            backbone.model.resize_token_embeddings(len(backbone.tokenizer), mean_resizing=False)
        init_added_embeddings(backbone.model, backbone.tokenizer, new)
        icm = InformationCompressionModule(icm_cfg).to(dtype=backbone.dtype)
        return cls(backbone, config, icm)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        gguf_file: str | None = None,
        **overrides: Any,
    ) -> "RetrvR1Model":
        """Load a saved Retrv-R1 model, a bundled default by name, or wrap a plain backbone.

        ``overrides`` are :class:`RetrvR1Config` fields. Of transformers' loading options,
        ``torch_dtype`` is taken as ``dtype`` and a single-device ``device_map`` (``"cpu"``,
        ``"cuda:0"``, ``0``) as ``device``; the others (``device_map="auto"``,
        ``trust_remote_code``, ``revision``, ...) are refused by name rather than ignored.
        """
        device, dtype = _hf_loading_kwargs(overrides, device, dtype)
        source = str(name_or_path)
        bundled = bundled_checkpoint(source)
        path = Path(bundled) if bundled is not None else Path(resolve_source(source))
        if (path / CONFIG_NAME).is_file():
            model = cls._load_checkpoint(path, device=device, dtype=dtype, **overrides)
            model.name_or_path = source
            return model
        try:
            backbone = load_backbone(source, gguf_file=gguf_file, dtype=dtype, device=device)
        except ModelLoadError as exc:
            if path.exists():
                raise
            raise ModelLoadError(f"{exc}{_bundled_hint(source)}") from exc
        logger.warning("%s is a plain backbone: the ICM is untrained (use compression='none' for zero-shot)", source)
        model = cls.from_backbone(backbone, backbone_source=source, gguf_file=gguf_file, **overrides)
        model.name_or_path = source
        return model

    @classmethod
    def _load_checkpoint(cls, path: Path, *, device=None, dtype=None, **overrides: Any) -> "RetrvR1Model":
        saved = RetrvR1Config.load(path)
        config = saved.replace(**overrides) if overrides else saved  # overrides are validated too
        if (path / BACKBONE_DIR).is_dir():
            backbone = load_backbone(str(path / BACKBONE_DIR), dtype=dtype, device=device, tokenizer_source=str(path))
        elif config.backbone_source:
            backbone = load_backbone(config.backbone_source, gguf_file=config.gguf_file, dtype=dtype, device=device, tokenizer_source=str(path))
            if config.vision_graft is not None:
                backbone = _load_grafted_vision(backbone, config, path)
        else:
            raise ModelLoadError(f"checkpoint {path} has neither a backbone/ folder nor a backbone_source")
        # The labels the checkpoint has are its tokenizer's (a checkpoint saved from a model loaded
        # with a lower max_candidates keeps them all), not its config's max_candidates.
        available = max(_label_count(backbone.tokenizer), saved.max_candidates)  # fewer: damaged, refused below
        if config.max_candidates > available:
            raise TooManyCandidatesError(
                f"max_candidates={config.max_candidates} exceeds the {available} index labels of the "
                f"checkpoint {path}; pass at most {available}"
            )
        model_emb = backbone.model.get_input_embeddings()
        if len(backbone.tokenizer) > model_emb.weight.shape[0]:
            backbone.model.resize_token_embeddings(len(backbone.tokenizer), mean_resizing=False)
        rows_file = path / TOKEN_ROWS
        if rows_file.is_file():
            _load_token_rows(backbone.model, _read_weights(rows_file))
        if (path / ADAPTER_DIR).is_dir():
            _load_lora(backbone.model, path / ADAPTER_DIR)
        icm = InformationCompressionModule(config.icm)
        has_icm = (path / ICM_WEIGHTS).is_file()
        if has_icm:
            state = _read_weights(path / ICM_WEIGHTS)
            missing, unexpected = icm.load_state_dict(state, strict=False)
            missing = [m for m in missing if not m.startswith(("relation_query", "compress_relation"))]
            if missing or unexpected:
                raise ModelLoadError(f"ICM weights in {path} do not match the config: missing={missing} unexpected={unexpected}")
        elif config.compression == "icm":
            raise ModelLoadError(f"checkpoint {path} has no {ICM_WEIGHTS} but its config uses compression='icm'; "
                                 "load it with compression='none' to read candidates in full tokens")
        icm.to(device=backbone.device, dtype=backbone.dtype)
        try:
            model = cls(backbone, config, icm)
        except ValueError as exc:  # e.g. a tokenizer without the Retrv-R1 tokens
            raise ModelLoadError(f"checkpoint {path} is damaged: {exc}") from exc
        model.icm_available = has_icm
        model.backbone_modified = (path / BACKBONE_DIR).is_dir()
        model.eval()
        return model

    def save_pretrained(self, directory: str | os.PathLike, *, save_backbone: bool | None = None) -> Path:
        """Save config, ICM, tokenizer, added-token rows, LoRA adapters, and, when needed, the backbone.

        The backbone weights are written only when they cannot be re-created from
        ``backbone_source`` (a model built from config, or a fully fine-tuned one), unless
        ``save_backbone`` says otherwise.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if save_backbone is None:
            save_backbone = self.backbone_modified or not self.config.backbone_source
        lora = lm_has_lora(self.lm)
        if (out / CONFIG_NAME).is_file():
            # Overwriting a checkpoint: what this save does not write must not outlive it, or
            # loading would mix the two (an old backbone/ is loaded before backbone_source, an old
            # icm.safetensors revives a dropped ICM, an old adapter/ is injected again).
            stale = [BACKBONE_DIR] if not save_backbone else [TOKEN_ROWS]
            if not self.icm_available:
                stale.append(ICM_WEIGHTS)
            if save_backbone or self.config.vision_graft is None:
                stale.append(VISION_WEIGHTS)
            if not lora:
                stale.append(ADAPTER_DIR)
            if self.backbone.image_processor is None:
                stale.append("preprocessor_config.json")
            if not getattr(self.backbone.tokenizer, "chat_template", None):
                stale += ["chat_template.jinja", "chat_template.json"]
            for name in stale:
                _remove(out / name)
        if save_backbone:
            bdir = out / BACKBONE_DIR
            # With LoRA, backbone/ holds the base weights and adapter/ the adapters (loaded back on top).
            self.lm.save_pretrained(bdir, state_dict=_base_state_dict(self.lm) if lora else None)
            self.backbone.tokenizer.save_pretrained(bdir)
            if self.backbone.image_processor is not None:
                self.backbone.image_processor.save_pretrained(bdir)
        self.config.model_type = self.backbone.model_type
        self.config.save(out)
        self.backbone.tokenizer.save_pretrained(out)
        if self.backbone.image_processor is not None:
            self.backbone.image_processor.save_pretrained(out)
        if self.icm_available:
            icm_state = {k: v.detach().contiguous().cpu() for k, v in self.icm.state_dict().items()}
            if self.config.icm.share_compressor:
                icm_state = {k: v for k, v in icm_state.items() if not k.startswith(("relation_query", "compress_relation"))}
            save_file(icm_state, str(out / ICM_WEIGHTS))
        if not save_backbone:
            save_file(_token_rows(self.lm, self.backbone.tokenizer), str(out / TOKEN_ROWS))
            if self.config.vision_graft is not None:
                save_file(vision_tower_state(self.backbone), str(out / VISION_WEIGHTS))
        if lora:
            _save_lora(self.lm, out / ADAPTER_DIR)
        return out

    def merge_lora(self) -> int:
        """Fold the LoRA adapters into the backbone's weights, for serving.

        Each adapted layer then runs one matrix multiply instead of three: one decode step of
        the bundled checkpoints took 9-14% less time on CPU. Scores change only by float
        rounding (below 1e-6 on our probes), so a near tie can in principle flip a greedy
        token. The backbone then differs from ``backbone_source``, so :meth:`save_pretrained`
        writes it in full; training can still add new adapters on top. Returns how many
        layers were merged (0 when the model has no adapters).
        """
        from peft.tuners.lora import LoraLayer

        with self._lock:
            layers = [(name, m) for name, m in self.lm.named_modules() if isinstance(m, LoraLayer)]
            for name, module in layers:
                module.merge(safe_merge=True)  # refuses NaN/inf results instead of writing them
                parent_name, _, child = name.rpartition(".")
                setattr(self.lm.get_submodule(parent_name) if parent_name else self.lm, child, module.get_base_layer())
            if layers:
                for attr in ("peft_config", "_hf_peft_config_loaded"):
                    if attr in vars(self.lm):  # set on the instance by peft (a class default stays)
                        delattr(self.lm, attr)
                self.backbone_modified = True
                self.invalidate_signature()  # cached content tokens and the prefix KV came from the old layers
            return len(layers)

    def drop_icm(self) -> None:
        """Mark the ICM as absent, for a model that reads candidates in full tokens and whose
        ICM was never trained: checkpoints it saves carry no ICM weights, the default
        compression becomes ``'none'``, and compression ``'icm'`` raises instead of running
        random weights. Training the ICM (``train_icm``) makes it available again."""
        self.icm_available = False
        self.config.compression = "none"

    def _require_icm(self) -> None:
        if not self.icm_available:
            raise ValueError(f"this model has no trained ICM (its checkpoint ships no {ICM_WEIGHTS}); "
                             "use compression='none' (candidates in full tokens)")

    # ================================================================ properties
    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def content_signature(self) -> str:
        """Identifies everything that produces ``t_con``, so caches know when they are stale:
        the ICM (config and weights), the whole input-embedding matrix (candidate tokens are
        embedded with it: added-token rows and full fine-tuning both change it), the vision
        tower when there is one (``train_vision``, a graft), the image processor's size, and
        ``max_candidate_tokens`` (where candidate text is cut).

        Every weight is hashed exactly, in its own dtype's bytes, one tensor at a time, rather
        than a strided sample: a sample would miss a change confined to a few rows (token-row
        training, a sparse fine-tune), and a stale cache is silently wrong scores. The cost
        (about 1 GB/s of weights, e.g. ~0.1 s for SmolLM2-135M's embeddings, a few seconds for
        a 3B Qwen-VL's embeddings and vision tower) is paid once: the digest is cached until
        :meth:`invalidate_signature` (which training calls after every step)."""
        with self._lock:
            if self._signature is None:
                version = self._signature_version
                h = hashlib.sha256()
                settings = {
                    "icm": self.config.icm.to_dict(),
                    "max_candidate_tokens": self.config.max_candidate_tokens,
                    "image_size": getattr(self.backbone.image_processor, "size", None),
                }
                h.update(json.dumps(settings, sort_keys=True, default=str).encode())
                _hash_tensors(h, self.icm.state_dict().items())
                _hash_tensors(h, [("input_embeddings", self.backbone.model.get_input_embeddings().weight)])
                visual = _vision_tower(self.backbone)
                if visual is not None:
                    _hash_tensors(h, visual.state_dict().items())
                digest = h.hexdigest()[:16]
                if version != self._signature_version:  # weights changed (another thread) while hashing
                    return digest  # describes the weights read, but is not kept as the current one
                self._signature = digest
            return self._signature

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda() ... change the weights' dtype or device: the cached signature
        # (it hashes dtype and bytes) and the prefix KV cache no longer describe this model.
        out = super()._apply(fn, *args, **kwargs)
        if "decoder" in self.__dict__:  # not during __init__
            self.invalidate_signature()
        return out

    def invalidate_signature(self) -> None:
        """Call after changing weights (training) so cached content tokens and the prompt
        prefix's KV cache are recomputed."""
        self._signature_version += 1
        self._signature = None
        self.decoder.clear_prefix_cache()

    # ================================================================ encoding
    def _check_candidates(self, candidates: Sequence[Candidate | str]) -> list[Candidate]:
        cands = [Candidate.coerce(c) for c in _candidate_list(candidates)]
        if not cands:
            raise EmptyCandidatesError("no candidates to rerank (the first stage returned nothing)")
        if len(cands) > self.config.max_candidates:
            raise TooManyCandidatesError(
                f"{len(cands)} candidates exceed this model's {self.config.max_candidates} index labels; "
                "pass fewer (top_k) or rank them in sliding windows with rank_windowed()"
            )
        self._check_readable(cands)
        return cands

    def _check_readable(self, cands: list[Candidate]) -> None:
        """A text-only backbone cannot read an image-only candidate: refuse it, naming it."""
        if self.backbone.is_vision:
            return
        for i, c in enumerate(cands):
            if c.image is not None and not c.text.strip():
                raise ValueError(
                    f"candidate {i} is an image without text, but backbone {self.backbone.model_type!r} "
                    "is text-only; give it a caption or use a Qwen-VL backbone"
                )

    def _encode(self, cands: list[Candidate], max_text_tokens: int | None = None, notes: list[str] | None = None,
                reuse: list[Encoded] | None = None) -> list[Encoded]:
        return self.builder.encode_candidates(cands, max_text_tokens or self.config.max_candidate_tokens, notes, reuse=reuse)

    def _icm_batch_size(self, given: int | None, name: str = "icm_batch_size") -> int:
        size = self.config.extra.get("icm_batch_size", DEFAULT_ICM_BATCH_SIZE) if given is None else given
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
        return int(size)

    def _compression(self, given: Any) -> str:
        """The compression of one call: ``given``, else the config's; anything but ``'icm'`` or
        ``'none'`` is refused (an empty string used to mean the default)."""
        mode = self.config.compression if given is None else given
        if mode not in ("icm", "none"):
            raise ValueError(f"compression must be 'icm' or 'none', got {mode!r}")
        return mode

    def _icm_rows(self, fn, encoded: list[Encoded], batch_size: int, notes: list[str] | None, what: str) -> torch.Tensor:
        """``fn(embeds, mask)`` (an ICM computation, one row per candidate) over ``encoded`` in
        batches of ``batch_size``, each padded to the same length, halved on OOM: ``(K, H)``."""
        length = max(len(e.chunk) for e in encoded)

        def run(part: list[Encoded]) -> tuple[torch.Tensor, ...]:
            embeds, mask = pad_embeddings([e.embeds for e in part], length)
            return fn(embeds, mask).unbind(0)

        return torch.stack(map_batches(run, encoded, batch_size, what=what, notes=notes))

    def _content_tokens(self, encoded: list[Encoded], batch_size: int | None = None, notes: list[str] | None = None) -> torch.Tensor:
        """``t_con`` of encoded candidates, ``(K, H)``, in padded batches."""
        self._require_icm()
        return self._icm_rows(self.icm.content, encoded, self._icm_batch_size(batch_size), notes, "ICM content tokens")

    @torch.inference_mode()
    def encode_candidates(self, candidates: Sequence[Candidate | str], batch_size: int = 32) -> list[torch.Tensor]:
        """Query-independent content tokens ``t_con`` (one ``(H,)`` float32 CPU tensor each).

        Store them (with :attr:`content_signature`) and pass them back as
        ``Candidate.content_tokens`` so reranking skips recomputing them. A batch that runs
        out of memory is split in halves (down to one candidate) with a logged warning.
        """
        cands = [Candidate.coerce(c) for c in _candidate_list(candidates)]
        batch_size = self._icm_batch_size(batch_size, "batch_size")  # a negative one returned no tokens at all
        self._check_readable(cands)  # else an image-only candidate would get the t_con of a blank
        out: list[torch.Tensor] = []
        for start in range(0, len(cands), batch_size):
            encoded = self._encode(cands[start : start + batch_size])
            out.extend(t.float().cpu() for t in self._content_tokens(encoded, batch_size))
        return out

    def _slots(
        self, query: Encoded, cands: list[Candidate], encoded: list[Encoded], notes: list[str], batch_size: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._require_icm()
        batch_size = self._icm_batch_size(batch_size)
        hidden = self.backbone.hidden_size
        cached = [c.content_tokens for c in cands]
        usable = [t is not None and tuple(torch.as_tensor(t).shape) in ((hidden,), (1, hidden)) for t in cached]
        if any(t is not None for t in cached) and not all(u or t is None for u, t in zip(usable, cached)):
            notes.append("some cached content tokens had the wrong shape and were recomputed")
        if all(usable):
            content = torch.stack([torch.as_tensor(t).reshape(hidden) for t in cached]).to(self.device, self.backbone.dtype)
        else:
            content = self._content_tokens(encoded, batch_size, notes)
            for i, ok in enumerate(usable):
                if ok:
                    content[i] = torch.as_tensor(cached[i]).reshape(hidden).to(content)
        q = query.embeds.unsqueeze(0)
        relation = self._icm_rows(lambda e, m: self.icm.relation(e, q, m, None), encoded, batch_size, notes, "ICM relation tokens")
        return [(content[i], relation[i]) for i in range(len(encoded))]

    # ================================================================ ranking
    def prepare(
        self,
        query: Query | str,
        candidates: Sequence[Candidate | str],
        *,
        compression: Compression | None = None,
        think: bool = True,
        reasoning_budget: int = 0,
        icm_batch_size: int | None = None,
    ) -> tuple[Any, list[Encoded], list[str]]:
        """Build the initial context for one query (used by :meth:`rank` and by training)."""
        self._sync_prompt_settings()
        q = Query.coerce(query)
        cands = self._check_candidates(candidates)
        icm_batch_size = self._icm_batch_size(icm_batch_size)
        mode = self._compression(compression)
        notes: list[str] = []
        encoded = self._encode(cands, notes=notes)
        q_enc = self.builder.encode_query(q, self.config.max_query_tokens)
        if q_enc.truncated_from:
            notes.append(f"query truncated from {q_enc.truncated_from} to {self.config.max_query_tokens} tokens")
        if mode == "none":
            encoded = self._fit_full_tokens(cands, encoded, q_enc, reasoning_budget, notes, think=think)
        for i, e in enumerate(encoded):
            if e.truncated_from:
                notes.append(f"candidate {i} truncated from {e.truncated_from} to {len(e.chunk)} tokens")
            if e.ignored_image:
                notes.append(f"candidate {i}: image ignored by the text-only backbone (its text was used)")
        if q_enc.ignored_image:
            if not q.text.strip():
                raise ValueError(f"the query is an image, but backbone {self.backbone.model_type!r} is text-only")
            notes.append("query image ignored by the text-only backbone")
        slots = self._slots(q_enc, cands, encoded, notes, icm_batch_size) if mode == "icm" else None
        prompt = self.builder.prompt(q_enc, encoded, slots, think=think)
        limit = self.context_limit
        # with reasoning, up to two closing tokens (</think><answer>) follow the budget
        closing = MAX_FORCED_TOKENS if think else 0
        if limit is not None and len(prompt) + reasoning_budget + closing > limit:
            per_candidate = [2 if slots is not None else len(e.chunk) for e in encoded]
            fixed = len(prompt) - sum(per_candidate)  # frame, system prompt, query, labels
            # the least the candidates can take: their two ICM tokens, or their image tokens and one text token
            least = sum(2 if slots is not None else self._least_full_tokens(e) for e in encoded)
            largest_budget = limit - fixed - closing - least
            if fixed + closing > limit:
                advice = (f"the prompt without any candidate text already takes {fixed} tokens (the query "
                          f"{len(q_enc.chunk)}): shorten the query (max_query_tokens) or the system prompt")
            elif largest_budget < 0:
                advice = (f"the {len(encoded)} candidates take at least {least} tokens, beside {fixed} for the rest "
                          "of the prompt: pass fewer candidates")
            elif fixed + reasoning_budget + closing > limit:
                advice = (f"lower reasoning_budget to at most {largest_budget} "
                          f"(the prompt without any candidate text takes {fixed} tokens)")
            else:
                advice = "pass fewer candidates, lower max_candidate_tokens, or lower reasoning_budget"
            raise ContextOverflowError(
                f"prompt of {len(prompt)} tokens plus a reasoning budget of {reasoning_budget}"
                f"{f' and {closing} closing tokens' if closing else ''} exceeds the "
                f"context limit of {limit}; {advice}"
            )
        return prompt, encoded, notes

    def _sync_prompt_settings(self) -> None:
        """Apply prompt settings changed on ``self.config`` after construction (they are saved
        with the model, so the prompt must follow them)."""
        b, c = self.builder, self.config
        if b.system_prompt != c.system_prompt:
            b.system_prompt = c.system_prompt
            b._template_cache = None
            self.decoder.clear_prefix_cache()
        b.label_after_candidate = c.label_after_candidate
        b.query_after_candidates = c.query_after_candidates

    @property
    def context_limit(self) -> int | None:
        """The most tokens one rerank call's context may hold (``config.max_context_tokens``,
        else the backbone's position limit), or None when neither is known."""
        return self.config.max_context_tokens or self.backbone.max_positions

    def _fit_full_tokens(self, cands, encoded: list[Encoded], query: Encoded, budget: int, notes: list[str], *,
                         think: bool = True) -> list[Encoded]:
        """Full-token mode: cap the candidates' text until the prompt fits, at the largest cap
        that fits (short candidates keep all their text; the room they leave goes to long ones)."""
        limit = self.context_limit
        if limit is None:
            return encoded
        # Everything but the candidates' own tokens (frame, system prompt, the query once or
        # twice, labels and separators: up to 6 tokens a candidate with label_after_candidate),
        # counted exactly from a prompt whose candidates are empty.
        empty = Encoded(chunk=Chunk(ids=query.chunk.ids[:0], embeds=query.chunk.embeds[:0]))
        fixed = len(self.builder.prompt(query, [empty] * len(encoded), None, think=think))
        room = limit - fixed - budget - (MAX_FORCED_TOKENS if think else 0)
        total = sum(len(e.chunk) for e in encoded)
        if total <= room:
            return encoded
        image_counts = [self._image_token_count(e) for e in encoded]  # not shrunk: only text is capped
        texts = [len(e.chunk) - n for e, n in zip(encoded, image_counts)]
        avail = room - sum(image_counts)
        per, hi = 1, max(texts)  # the largest cap c with sum(min(t, c)) <= avail (at least 1)
        while per < hi:
            mid = (per + hi + 1) // 2
            if sum(min(t, mid) for t in texts) <= avail:
                per = mid
            else:
                hi = mid - 1
        notes.append(f"full-token prompt over the context limit: candidate text capped at {per} tokens")
        return self._encode(cands, max_text_tokens=per, reuse=encoded)  # images are not encoded again

    def _least_full_tokens(self, encoded: Encoded) -> int:
        """Tokens ``encoded`` takes in full-token mode with its text capped at one token."""
        images = self._image_token_count(encoded)
        return images + min(1, len(encoded.chunk) - images)

    def _image_token_count(self, encoded: Encoded) -> int:
        """Tokens of ``encoded``'s image(s), vision start/end markers included (0 without)."""
        if not self.backbone.is_vision or not encoded.chunk.grids:
            return 0
        return int((encoded.chunk.ids == self.backbone.image_token_id).sum()) + 2 * len(encoded.chunk.grids)

    @torch.inference_mode()
    def rank(
        self,
        query: Query | str,
        candidates: Sequence[Candidate | str],
        *,
        reasoning_budget: int | None = None,
        max_inspections: int | None = None,
        compression: Compression | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        strict: bool = False,
        icm_batch_size: int | None = None,
    ) -> RankResult:
        """Rerank ``candidates`` for ``query``.

        Returns a :class:`RankResult` whose ``scores[i]`` is the model's probability that
        candidate ``i`` is the best one. With ``strict=True`` a model output without a clean
        answer raises :class:`NoAnswerError` instead of falling back (see ``fallback``).
        ``icm_batch_size`` caps how many candidates one ICM forward compresses (default:
        ``config.extra["icm_batch_size"]`` or 32); a batch that runs out of memory (ICM or
        vision tower) is retried in halves down to one candidate, with a note.
        """
        candidates = _candidate_list(candidates)  # read twice below (prepare and _result): a generator must not run dry
        budget = self.config.reasoning_budget if reasoning_budget is None else _count(reasoning_budget, "reasoning_budget")
        inspections = self.config.max_inspections if max_inspections is None else _count(max_inspections, "max_inspections")
        mode = self._compression(compression)
        sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)  # validates
        with self._lock:
            prompt, encoded, notes = self.prepare(
                query, candidates, compression=mode, think=budget > 0, reasoning_budget=budget, icm_batch_size=icm_batch_size
            )
            trace = self.decoder.decode(
                prompt,
                encoded,
                reasoning_budget=budget,
                max_inspections=inspections,
                sampling=sampling,
                allow_inspection=mode == "icm",
                context_limit=self.context_limit,
            )
        result = self._result(trace, [Candidate.coerce(c) for c in candidates], notes)
        if strict and result.fallback is not None:
            raise NoAnswerError(f"model output has no clean answer ({result.fallback}): {'; '.join(result.notes)}")
        return result

    def rank_windowed(
        self,
        query: Query | str,
        candidates: Sequence[Candidate | str],
        *,
        window: int | None = None,
        step: int | None = None,
        **kwargs: Any,
    ) -> RankResult:
        """Rerank more candidates than ``config.max_candidates`` in sliding windows.

        RankGPT's pass (:func:`retrv_r1_plugin.windows.rank_in_windows`): ``window``
        candidates per call (default ``max_candidates``), moving up by ``step`` (default half
        the window) from the bottom of the first-stage order to the top. With at most
        ``window`` candidates it is exactly :meth:`rank`. ``kwargs`` go to every :meth:`rank`
        call. Scores below the final window are capped so they never rise down ``order``.
        """
        cands = [Candidate.coerce(c) for c in _candidate_list(candidates)]  # an empty list reaches rank(), which refuses it
        self._check_readable(cands)  # here, so that an error names the candidate's index in the whole list
        window = self.config.max_candidates if window is None else window
        step = max(1, window // 2) if step is None and isinstance(window, int) else step
        return rank_in_windows(self.rank, query, cands, window=window, step=step, limit=self.config.max_candidates, **kwargs)

    def rank_batch(
        self,
        queries: Sequence[Query | str],
        candidates: Sequence[Sequence[Candidate | str]],
        **kwargs: Any,
    ) -> list[RankResult]:
        """Rank many queries, each with its own candidates; results in input order.

        Queries run one by one (``kwargs`` as for :meth:`rank`); inside each, the ICM and
        vision batches are split in halves when they run out of memory.
        """
        if isinstance(queries, (str, Query)):
            raise TypeError(f"queries must be a list of queries, got a single {type(queries).__name__}; "
                            "use rank() for one query, or wrap it in a list")
        queries = list(queries)  # generators are read once
        candidates = [_candidate_list(c, f"candidates[{i}]") for i, c in enumerate(_candidate_list(candidates, "candidates", nested=True))]
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
        return [self.rank(q, c, **kwargs) for q, c in zip(queries, candidates)]

    def _result(self, trace: GenerationTrace, cands: list[Candidate], notes: list[str]) -> RankResult:
        probs = torch.softmax(trace.label_logits.float(), -1)
        scores = [float(p) for p in probs]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        fallback = None
        answer = None
        top = int(torch.argmax(trace.answer_logits))
        top_label = self.special.label_index(top)
        if trace.stop_reason in ("answer", "direct"):
            if top_label is not None and top_label < len(cands):
                answer = top_label
            else:
                fallback = ANSWER_OUT_OF_RANGE
                what = f"label {top_label + 1}" if top_label is not None else f"token {self.tokenizer.convert_ids_to_tokens(top)!r}"
                notes.append(f"the model's answer was {what}, not one of the {len(cands)} candidates; ranked by label probabilities")
        else:
            fallback = FORCED_ANSWER
        notes.extend(trace.notes)
        prompt_tokens = sum(len(c) for c in trace.chunks if c.role == "prompt")
        usage = TokenUsage(
            prompt_tokens=prompt_tokens,
            generated_tokens=sum(len(c) for c in trace.chunks if c.role in ("generated", "forced")),
            inspection_tokens=sum(len(c) for c in trace.chunks if c.role == "spliced"),
        )
        reasoning = self._reasoning_text(trace)
        return RankResult(
            order=order,
            scores=scores,
            reasoning=reasoning,
            inspected=list(trace.inspected),
            usage=usage,
            answer=answer,
            fallback=fallback,
            notes=notes,
            candidates=cands,
        )

    def _reasoning_text(self, trace: GenerationTrace) -> str:
        """The model's own words, with each splice shown as a short marker; the tokens that
        end reasoning (``</think>``, ``<answer>``, end of sequence) are structure, not words."""
        closing = {self.special.think_end, self.special.answer_start, *self.special.eos}
        parts: list[str] = []
        pending: list[int] = []
        splice = 0
        for chunk in trace.chunks[1:]:
            if chunk.role == "generated":
                pending.extend(t for t in chunk.ids.tolist() if t not in closing)
            elif chunk.role == "spliced":
                parts.append(self.tokenizer.decode(pending, skip_special_tokens=False))
                pending = []
                parts.append(f"[inspected candidate {trace.inspected[splice]}]")
                splice += 1
        parts.append(self.tokenizer.decode(pending, skip_special_tokens=False))
        return "".join(parts).strip()


# ==================================================================== helpers
def _candidate_list(candidates: Any, what: str = "candidates", *, nested: bool = False) -> list:
    """``candidates`` as a list; a lone str (it would be ranked character by character) or
    Candidate is refused. ``nested``: a list of candidate lists (``rank_batch``)."""
    item = "list of candidate lists" if nested else "list of Candidate or str"
    if isinstance(candidates, (str, bytes, Candidate)):
        shown = repr(candidates) if len(repr(candidates)) <= 60 else repr(candidates)[:57] + "..."
        raise TypeError(f"{what} must be a {item}, got a single {type(candidates).__name__} {shown}; wrap it in a list")
    try:
        return list(candidates)
    except TypeError:
        raise TypeError(f"{what} must be a {item}, got {type(candidates).__name__}") from None


#: transformers' ``from_pretrained`` options that a Retrv-R1 load has no use for: refused by name
#: (as a config field they would only be "unknown") instead of silently dropped.
_HF_LOADING_OPTIONS = frozenset({
    "trust_remote_code", "revision", "cache_dir", "token", "use_auth_token", "local_files_only", "force_download",
    "proxies", "subfolder", "variant", "use_safetensors", "low_cpu_mem_usage", "attn_implementation",
    "quantization_config", "load_in_8bit", "load_in_4bit", "max_memory", "offload_folder", "offload_state_dict",
    "code_revision", "tp_plan", "key_mapping",
})
_MULTI_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _hf_loading_kwargs(overrides: dict[str, Any], device: Any, dtype: Any) -> tuple[Any, Any]:
    """Take transformers-style loading keywords out of ``overrides`` (``torch_dtype``, a
    single-device ``device_map``) as ``(device, dtype)``; refuse the ones not supported, and
    keywords that are no :class:`RetrvR1Config` field, before anything is loaded."""
    if "torch_dtype" in overrides:
        torch_dtype = overrides.pop("torch_dtype")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise TypeError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give dtype only")
        dtype = torch_dtype if dtype is None else dtype
    if "device_map" in overrides:
        device_map = overrides.pop("device_map")
        if isinstance(device_map, bool) or not isinstance(device_map, (str, int, torch.device)) or str(device_map) in _MULTI_DEVICE_MAPS:
            raise ValueError(f"device_map={device_map!r} is not supported: a Retrv-R1 model runs on one device; "
                             "pass device= (e.g. device='cuda:0') instead")
        mapped = torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)
        if device is not None and torch.device(device) != mapped:
            raise TypeError(f"device={device!r} and device_map={device_map!r} disagree; give device only")
        device = mapped
    hf = sorted(k for k in overrides if k in _HF_LOADING_OPTIONS)
    if hf:
        raise TypeError(f"RetrvR1Model.from_pretrained does not take transformers' loading option(s) "
                        f"{', '.join(map(repr, hf))}; it takes device=, dtype=, gguf_file= and RetrvR1Config fields")
    known = {f.name for f in dataclasses.fields(RetrvR1Config)}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise TypeError(f"unknown RetrvR1Config field(s) {', '.join(map(repr, unknown))}")
    return device, dtype


def _count(value: Any, name: str) -> int:
    """A per-call count (``reasoning_budget``, ``max_inspections``): a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _remove(path: Path) -> None:
    """Delete a file or folder of an earlier checkpoint, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a missing, truncated or corrupt one is a
    :class:`ModelLoadError` naming it (not a bare ``SafetensorError``)."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc


def _label_count(tokenizer) -> int:
    """How many index labels (``<cand_1>``, ``<cand_2>``, ...) ``tokenizer`` has, counted from the first."""
    vocab = tokenizer.get_vocab()
    n = 0
    while label_token(n) in vocab:
        n += 1
    return n


def _hash_tensors(h, named: Any) -> None:
    """Feed ``(name, tensor)`` pairs to hash ``h``, sorted by name: name, dtype, shape and the
    exact bytes (copied to the CPU one tensor at a time)."""
    for name, tensor in sorted(named, key=lambda kv: kv[0]):
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _vision_tower(backbone: Backbone) -> nn.Module | None:
    """The Qwen-VL vision tower (``model.model.visual``; grafted towers sit there too), if any."""
    return getattr(getattr(backbone.model, "model", None), "visual", None) if backbone.is_vision else None


def added_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's added tokens (the Retrv-R1 tokens among them): the embedding
    rows saved without the backbone and trained by ``train_token_rows``."""
    return sorted(tokenizer.added_tokens_decoder.keys())


def _token_rows(model, tokenizer) -> dict[str, torch.Tensor]:
    ids = torch.tensor(added_token_ids(tokenizer), dtype=torch.long)
    emb = model.get_input_embeddings().weight.detach().cpu()
    rows = {"ids": ids, "input": emb[ids].contiguous()}
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        rows["output"] = out.weight.detach().cpu()[ids].contiguous()
    return rows


def _load_token_rows(model, rows: dict[str, torch.Tensor]) -> None:
    ids = rows["ids"]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[ids.to(emb.device)] = rows["input"].to(emb)
        if "output" in rows:
            out = model.get_output_embeddings().weight
            out[ids.to(out.device)] = rows["output"].to(out)


def _load_grafted_vision(text_backbone: Backbone, config: RetrvR1Config, path: Path) -> Backbone:
    weights = path / VISION_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"checkpoint {path} grafts a vision tower but has no {VISION_WEIGHTS}")
    device = text_backbone.device
    backbone = graft_vision_tower(text_backbone, config.vision_graft, max_pixels=config.image_max_pixels)
    load_vision_tower_state(backbone, _read_weights(weights))
    backbone.model.to(device)
    return backbone


def lm_has_lora(lm) -> bool:
    """Whether LoRA adapters are injected into the HF model ``lm`` (``RetrvR1Model.lm``)."""
    return bool(getattr(lm, "peft_config", None))


def _base_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of a model with injected LoRA layers, adapters left out, base names restored."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def _save_lora(model, directory: Path) -> None:
    import peft  # a core dependency: bundled checkpoints ship LoRA adapters

    directory.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    config.save_pretrained(str(directory))
    state = peft.get_peft_model_state_dict(model)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "adapter_model.safetensors"))


def _load_lora(model, directory: Path) -> None:
    import peft

    config = peft.PeftConfig.from_pretrained(str(directory))
    peft.inject_adapter_in_model(config, model)
    state = _read_weights(directory / "adapter_model.safetensors")
    peft.set_peft_model_state_dict(model, state)
