"""The examples and the content-cache benchmark run end to end (as subprocesses, tiny models).

The models are the tiny random-weight ones of ``conftest`` saved as checkpoints, so these
tests check the plumbing and the printed output, not ranking quality or timings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_text_model, make_vl_model

ROOT = Path(__file__).resolve().parent.parent
SCORE = r"0\.\d{3}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("example-models")
    out = {"text": root / "text", "vl": root / "vl"}
    make_text_model(max_candidates=32).save_pretrained(out["text"])
    make_vl_model(max_candidates=32).save_pretrained(out["vl"])
    return out


def run_script(script: str, *args: str, stdin: str | None = None, timeout: float = 120, tmpdir: Path | None = None) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if tmpdir is not None:  # where the script's temporary folders go
        env["TMPDIR"] = str(tmpdir)
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    if tmpdir is not None:  # a temporary store is removed when the script exits
        assert not list(tmpdir.glob("retrv-r1-*")), list(tmpdir.iterdir())
    return proc.stdout


def test_langchain_chain(checkpoints, tmp_path):
    out = run_script(
        "examples/langchain_chain.py", "--model", checkpoints["text"], "--reasoning-budget", "2",
        "--query", "rocket launch to the Moon", "--k", "2", "--first-stage-k", "6", tmpdir=tmp_path,
    )
    assert f"reranker: {checkpoints['text']}" in out
    assert "indexed 20 candidates (6 images)" in out
    assert "cached content tokens t_con for 20 candidates" in out  # ICM model: cache filled
    chain, compression = out.split("== ContextualCompressionRetriever")
    assert "Q: rocket launch to the Moon" in chain and "Q: rocket launch to the Moon" in compression
    ranked = re.findall(rf"^  \[(\d)\] score ({SCORE}) \(first stage -?{SCORE}\)", chain, flags=re.MULTILINE)
    assert [r[0] for r in ranked] == ["1", "2"]
    assert float(ranked[0][1]) >= float(ranked[1][1])
    assert re.search(r"^  A: According to the best-ranked passage: \S", chain, flags=re.MULTILINE)
    assert len(re.findall(rf"^  \d\. score {SCORE}  ", compression, flags=re.MULTILINE)) == 2


def test_multimodal_chatbot_vision_model(checkpoints):
    out = run_script(
        "examples/multimodal_chatbot.py", "--model", checkpoints["vl"], "--reasoning-budget", "2",
        "--query", "a photo of a cat", "--image", "cat.jpg",
    )
    assert "backbone qwen2_5_vl" in out and "corpus: 20 nodes (6 images, 14 text passages)" in out
    assert "you> a photo of a cat" in out and "you> /image cat.jpg" in out
    answers = re.findall(r"^bot> best image: (\S+\.jpg)$", out, flags=re.MULTILINE)
    assert len(answers) == 2 and all(Path(a).is_file() for a in answers)
    assert len(re.findall(rf"^     score {SCORE} \(rank \d+ of 20 nodes", out, flags=re.MULTILINE)) == 2
    assert len(re.findall(r"^     caption: \S", out, flags=re.MULTILINE)) == 2
    assert len(re.findall(rf"^       [123]\. {SCORE} \[(image|text)\]", out, flags=re.MULTILINE)) == 6


def test_multimodal_chatbot_digits_corpus_has_image_only_nodes(checkpoints):
    out = run_script(
        "examples/multimodal_chatbot.py", "--model", checkpoints["vl"], "--corpus", "digits",
        "--query", "a handwritten digit seven", "--image", "digit-3-0.png",
    )
    assert "corpus: 10 nodes (10 images, 0 text passages)" in out
    answers = re.findall(r"^bot> best image: (\S+/digit-\d-\d\.png)$", out, flags=re.MULTILINE)
    assert len(answers) == 2 and all(Path(a).is_file() for a in answers)
    assert "caption:" not in out  # the nodes have no text: the model only sees pixels
    assert len(re.findall(rf"^       [123]\. {SCORE} \[image\] digit-\d-\d\.png$", out, flags=re.MULTILINE)) == 6


def test_multimodal_chatbot_refuses_the_digits_corpus_with_a_text_model(checkpoints):
    # it used to start the chat and fail every turn on the first caption-less digit image
    proc = subprocess.run(
        [sys.executable, "examples/multimodal_chatbot.py", "--model", str(checkpoints["text"]), "--corpus", "digits"],
        input="a handwritten digit seven\n", cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "'digits' corpus has images without text" in proc.stderr and "Qwen-VL" in proc.stderr
    assert "Traceback" not in proc.stderr and "you>" not in proc.stdout and "bot>" not in proc.stdout


def test_multimodal_chatbot_text_model_from_stdin(checkpoints):
    out = run_script(
        "examples/multimodal_chatbot.py", "--model", checkpoints["text"], "--reasoning-budget", "2",
        stdin="rocket launch\n\n/image cat.jpg\n/image missing.png\n/quit\nnever read\n",
    )
    assert "images are reranked by their captions" in out
    assert len(re.findall(r"^bot> best image: \S+\.jpg$", out, flags=re.MULTILINE)) == 1
    assert "cannot read an image query" in out  # image-only query on a text-only model
    assert "bot> error: no image at 'missing.png'" in out  # reported, the REPL goes on
    assert "never read" not in out


def test_store_scale_benchmark_small(tmp_path):
    path = tmp_path / "scale.json"
    out = run_script(
        "benchmarks/store_scale.py", "--sizes", "60,120", "--queries", "3", "--top-k", "100", "--minilm-sample", "0",
        "--json", path, tmpdir=tmp_path,
    )
    assert "| passages | store | add (passages/s)" in out
    rows = json.loads(path.read_text())["rows"]
    assert [(r["n"], r["where"]) for r in rows] == [(60, "memory"), (60, "disk"), (120, "memory"), (120, "disk")]
    for row in rows:
        assert row["add_s"] > 0 and row["search_p50_ms"] > 0 and row["search_p95_ms"] >= row["search_p50_ms"]
    assert all(row["disk_mb"] > 0 and row["reopen_s"] > 0 for row in rows if row["where"] == "disk")


def test_content_cache_benchmark_tiny(tmp_path):
    path = tmp_path / "cache.json"
    out = run_script(
        "benchmarks/content_cache.py", "--tiny", "--n", "16", "--ks", "8", "--budgets", "0,2", "--queries", "2",
        "--json", path, tmpdir=tmp_path,
    )
    assert "| K | budget | ICM content ms (no cache)" in out
    payload = json.loads(path.read_text())
    assert {"model", "device", "threads", "indexing", "results", "content_signature"} <= set(payload)
    assert {"encode_candidates_ms", "put_content_tokens_ms", "encode_candidates_icm_content_calls"} <= set(payload["indexing"])
    assert payload["indexing"]["encode_candidates_icm_content_calls"] > 0
    # The payload written per candidate is base64 of the tokens plus the entry's fields.
    indexing = payload["indexing"]
    assert indexing["payload_bytes_per_candidate"] > indexing["bytes_per_candidate"] * 4 / 3
    rows = payload["results"]
    assert [(r["k"], r["reasoning_budget"]) for r in rows] == [(8, 0), (8, 2)]
    for row in rows:
        assert {"rank_speedup", "end_to_end_speedup", "max_score_diff"} <= set(row)
        uncached, cached = row["uncached"], row["cached"]
        for side in (uncached, cached):
            assert {"search_ms", "icm_content_ms", "rank_ms", "icm_content_calls", "candidates_with_cached_tokens"} <= set(side)
        # Without the cache every rank call computes t_con; with it, none does.
        assert uncached["icm_content_calls"] >= row["queries"] and uncached["icm_content_rows"] == 8 * row["queries"]
        assert cached["icm_content_calls"] == 0 and cached["icm_content_rows"] == 0
        assert cached["candidates_with_cached_tokens"] == 8 * row["queries"]
        assert uncached["candidates_with_cached_tokens"] == 0
        assert row["max_score_diff"] < 1e-4  # cached tokens give the same scores


def test_quickstart_reranks_mixed_text_and_image_candidates(checkpoints, tmp_path):
    """The first stage must hand text *and* image nodes to the reranker (a plain
    VectorStoreIndex.as_query_engine() retrieves only the ImageNodes of a mixed index)."""
    out = run_script("examples/quickstart.py", "--model", checkpoints["text"], "--reasoning-budget", "0",
                     "--top-k", "20", "--top-n", "20", tmpdir=tmp_path)
    assert "indexed 20 nodes (6 images)" in out and "(temporary: removed at exit" in out
    first_query = out.split("\nQ: ")[1].split("\nQ: ")[0]
    ranked = re.findall(rf"^  \d+\. score ({SCORE}) \(first stage -?{SCORE}\)  (\[image\] )?", first_query, flags=re.MULTILINE)
    assert len(ranked) == 20
    assert sum(1 for _, img in ranked if img) == 6  # all 6 images and all 14 passages were reranked
    scores = [float(s) for s, _ in ranked]
    assert scores == sorted(scores, reverse=True)


def test_langchain_extractive_stand_in_quotes_the_passage_not_the_markers():
    from langchain_core.prompt_values import StringPromptValue

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from langchain_chain import extractive_llm
    finally:
        sys.path.remove(str(ROOT / "examples"))
    for line in ("[1] score 0.530 (first stage 0.560)  [image] cat: A tabby cat.",
                 "[1] score 0.530 (first stage 0.560) (inspected)  [image] cat: A tabby cat.",
                 "[1] score 0.530 (first stage 0.560)  cat: A tabby cat."):
        answer = extractive_llm(StringPromptValue(text=f"Context:\n{line}\n[2] score 0.1 (first stage 0.2)  other\n"))
        assert answer == "According to the best-ranked passage: cat: A tabby cat."


def test_multimodal_chatbot_refuses_bad_counts_before_loading_a_model():
    for flag, value in (("--threads", "0"), ("--show", "0"), ("--reasoning-budget", "-1")):
        proc = subprocess.run([sys.executable, "examples/multimodal_chatbot.py", flag, value], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and f"{flag} must be >=" in proc.stderr and "Traceback" not in proc.stderr


def test_multimodal_chatbot_image_option_takes_the_path_as_given(checkpoints, tmp_path):
    """--image PATH is one path (not split like the chat's '/image PATH text'): spaces and quotes."""
    import shutil

    photo = tmp_path / "my cat's photo.jpg"
    shutil.copy(ROOT / "retrv_r1_plugin" / "data" / "sample" / "images" / "cat.jpg", photo)
    out = run_script("examples/multimodal_chatbot.py", "--model", checkpoints["text"], "--image", photo)
    assert f"you> /image {photo}" in out
    assert "bot> error" not in out and "cannot read an image query" in out  # found, then refused by the text model
