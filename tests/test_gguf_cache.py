"""The SmolLM2 GGUF is converted once and read back from a float cache (load_backbone)."""

from __future__ import annotations

import os

import torch

from retrv_r1_plugin.backbone import GGUF_CACHE_ENV, gguf_cache_dir, load_backbone, resolve_source, smollm2_source


def test_converted_gguf_is_cached_and_reloads_identically_without_parsing_it(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv(GGUF_CACHE_ENV, str(tmp_path / "cache"))
    source, name = smollm2_source()
    first = load_backbone(source, gguf_file=name)
    folder = gguf_cache_dir(os.path.join(resolve_source(source), name))
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", refuse)
    second = load_backbone(source, gguf_file=name)
    text = "The capital of France is"
    assert first.tokenizer(text).input_ids == second.tokenizer(text).input_ids
    assert first.tokenizer.chat_template == second.tokenizer.chat_template
    ids = first.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert second.model.config.model_type == first.model.config.model_type == "llama"


def test_gguf_cache_can_be_turned_off(monkeypatch, tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"x")
    monkeypatch.setenv(GGUF_CACHE_ENV, "off")
    assert gguf_cache_dir(str(gguf_file)) is None
    monkeypatch.setenv(GGUF_CACHE_ENV, str(tmp_path / "c"))
    before = gguf_cache_dir(str(gguf_file))
    gguf_file.write_bytes(b"xy")  # a changed file gets a new folder
    assert gguf_cache_dir(str(gguf_file)) != before
