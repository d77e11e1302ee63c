"""The retrv-r1 CLI (index / search / rank / eval) end to end on tiny models and embedded Qdrant."""

import json
import os
import sys
from pathlib import Path

import pytest

from retrv_r1_plugin.cli import main, read_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.data.formats import Doc, QueryRecord, write_beir  # noqa: E402
from training.evaluate import main_eval  # noqa: E402

from conftest import make_text_model, solid  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = make_text_model(seed=11, max_candidates=16)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "plants.txt").write_text("Photosynthesis: plants use sunlight to make sugar.")
    (d / "rocket.md").write_text("A rocket launches astronauts to the Moon.")
    solid((200, 30, 30)).save(d / "apple.png")
    (d / "apple.txt").write_text("a photo of a red apple")  # caption of apple.png
    return d


def test_read_corpus_folder_pairs_captions_with_images(corpus_dir):
    cands = read_corpus(corpus_dir)
    by_id = {c.id: c for c in cands}
    assert set(by_id) == {"apple.png", "plants.txt", "rocket.md"}
    assert by_id["apple.png"].text == "a photo of a red apple" and by_id["apple.png"].image


def test_read_corpus_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"id": "a", "text": "ok"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="c.jsonl:2"):
        read_corpus(f)
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "missing.jsonl")


def test_index_then_search_prints_ranked_results(corpus_dir, tmp_path, checkpoint, capsys):
    store = str(tmp_path / "qdrant")
    assert main(["index", str(corpus_dir), "--store", store, "--quiet", "--model", checkpoint]) == 0
    assert "indexed 3 candidates" in capsys.readouterr().out
    assert main(["index", str(corpus_dir), "--store", store, "--quiet"]) == 0  # idempotent
    assert "(3 in total)" in capsys.readouterr().out
    assert main(["search", "how do plants make sugar?", "--store", store, "--model", checkpoint,
                 "--reasoning-budget", "0", "--json", "--top-n", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    ranking = out["ranking"]
    assert len(ranking) == 3 and {r["id"] for r in ranking} == {"apple.png", "plants.txt", "rocket.md"}
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)


def test_rank_command_and_clear_errors(checkpoint, capsys, tmp_path):
    assert main(["rank", "q", "alpha", "beta", "--model", checkpoint, "--reasoning-budget", "0"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()[:2] in ("1.", "2.")]
    assert len(lines) == 2
    assert main(["rank", "q", "alpha", "--model", str(tmp_path / "nope")]) == 2
    assert "no model directory" in capsys.readouterr().err


@pytest.fixture
def beir_dir(tmp_path):
    corpus = {f"d{i}": Doc(text=t) for i, t in enumerate([
        "plants make sugar from sunlight", "rockets fly to the moon", "coffee is brewed from beans",
        "cats sleep most of the day", "volcanoes erupt lava and ash", "tides follow the moon"])}
    queries = {"q1": QueryRecord(text="how do plants get energy"), "q2": QueryRecord(text="what erupts lava"),
               "q3": QueryRecord(text="animals that sleep a lot")}
    qrels = {"test": {"q1": {"d0": 1}, "q2": {"d4": 1}, "q3": {"d3": 1}}}
    write_beir(tmp_path / "beir", corpus, queries, qrels)
    return tmp_path / "beir"


def test_eval_writes_the_documented_json(beir_dir, checkpoint, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main_eval(["--beir", str(beir_dir), "--model", checkpoint, "--top-k", "5", "--output", str(out),
                      "--reasoning-budget", "0", "--quiet"]) == 0
    data = json.loads(out.read_text())
    keys = {"R@1", "R@5", "R@10", "nDCG@10", "MRR@10"}
    assert set(data["first_stage"]) == keys and set(data["reranked"]) == keys
    for name in ("seconds_per_query", "context_tokens_per_query", "inspections_per_query"):
        assert isinstance(data[name], float)
    assert data["num_queries"] == 3 and data["context_tokens_per_query"] > 0
    # a real first stage on an easy set: MiniLM finds these
    assert data["first_stage"]["R@5"] == 1.0
    assert "| first stage |" in capsys.readouterr().out


def test_eval_first_stage_only(beir_dir, capsys):
    assert main_eval(["--beir", str(beir_dir), "--top-k", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| first stage |" in out and "| reranked |" not in out
