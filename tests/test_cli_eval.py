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

from conftest import make_text_model, make_vl_model, solid  # noqa: E402


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
    from transformers.utils import logging as hf_logging

    assert main(["index", str(corpus_dir), "--store", store, "--quiet", "--model", checkpoint]) == 0
    out, err = capsys.readouterr()
    assert "indexed 3 candidates" in out
    assert "Loading weights" not in err and "it/s]" not in err  # --quiet: no transformers bars either
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process
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
    assert data["seconds_per_query"] > 0 and data["inspections_per_query"] == 0.0  # budget 0: nothing to inspect
    # a real first stage on an easy set: MiniLM finds these
    assert data["first_stage"]["R@5"] == 1.0
    assert "| first stage |" in capsys.readouterr().out


def test_eval_first_stage_only(beir_dir, capsys):
    assert main_eval(["--beir", str(beir_dir), "--top-k", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| first stage |" in out and "| reranked |" not in out
    # reranking options without --model would be ignored: a usage error naming them
    with pytest.raises(SystemExit) as info:
        main_eval(["--beir", str(beir_dir), "--top-k", "5", "--quiet", "--window-step", "2", "--reasoning-budget", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--window-step, --reasoning-budget set how the reranker runs: give --model" in err


def test_eval_and_train_usage_errors_exit_2_with_the_command_prefix(beir_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval"])
    assert info.value.code == 2 and "retrv-r1 eval: error: give --beir DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["eval", "--beir", str(beir_dir), "--top-k", "0"])
    assert info.value.code == 2 and "--top-k must be >= 1" in capsys.readouterr().err
    from training.cli import main as training_main, main_train

    assert training_main(["--help"]) == 0 and "train {align|sft|rl} --config FILE" in capsys.readouterr().out
    assert training_main([]) == 2 and "usage: python -m training.cli" in capsys.readouterr().err
    assert training_main(["train", "sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("python -m training.cli train: error:")
    assert main_train(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("retrv-r1 train: error:")


# ----------------------------------------------------------------------------- review fixes
def _run_cli(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_search_with_image_and_text_searches_by_text_and_reranks_with_the_image(corpus_dir, tmp_path, capsys):
    """The CLI store embeds text only: the first stage searches by the query text and the
    reranker still receives the query image (it costs image tokens in the prompt)."""
    ckpt = tmp_path / "vl"
    make_vl_model(seed=3, max_candidates=16).save_pretrained(ckpt)
    store = str(tmp_path / "qdrant")
    assert main(["index", str(corpus_dir), "--store", store, "--quiet"]) == 0
    capsys.readouterr()
    base = ["search", "a red apple", "--store", store, "--model", str(ckpt), "--reasoning-budget", "0", "--json"]
    rc, out, err = _run_cli(base + ["--image", str(corpus_dir / "apple.png")], capsys)
    assert rc == 0, err
    with_image = json.loads(out)
    assert {r["id"] for r in with_image["ranking"]} == {"apple.png", "plants.txt", "rocket.md"}
    rc, out, err = _run_cli(base, capsys)
    assert rc == 0, err
    text_only = json.loads(out)
    assert with_image["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"]


def test_search_image_only_query_exits_2_naming_the_missing_image_embedder(corpus_dir, tmp_path, checkpoint, capsys):
    store = str(tmp_path / "qdrant")
    assert main(["index", str(corpus_dir), "--store", store, "--quiet"]) == 0
    capsys.readouterr()
    rc, out, err = _run_cli(["search", "", "--image", str(corpus_dir / "apple.png"), "--store", store,
                             "--model", checkpoint], capsys)
    assert rc == 2
    assert "image-text embedder" in err and "give query text" in err
    assert "Traceback" not in err and out == ""


def _two_label_model_and_store(corpus_dir, tmp_path, capsys) -> tuple[Path, str]:
    """A checkpoint with 2 index labels and a store holding the 3 candidates of ``corpus_dir``."""
    ckpt = tmp_path / "two"
    make_text_model(seed=5, max_candidates=2).save_pretrained(ckpt)
    store = str(tmp_path / "qdrant")
    assert main(["index", str(corpus_dir), "--store", store, "--quiet"]) == 0
    capsys.readouterr()
    return ckpt, store


def test_search_caps_top_k_at_the_models_max_candidates(corpus_dir, tmp_path, capsys):
    ckpt, store = _two_label_model_and_store(corpus_dir, tmp_path, capsys)
    rc, out, err = _run_cli(["search", "how do plants make sugar?", "--store", store, "--model", str(ckpt),
                             "--reasoning-budget", "0", "--json"], capsys)  # default --top-k 20
    assert rc == 0, err
    assert len(json.loads(out)["ranking"]) == 2
    notes = [l for l in err.splitlines() if "capped" in l]
    assert len(notes) == 1 and "--top-k 20" in notes[0] and "capped at 2" in notes[0]
    rc, out, err = _run_cli(["search", "how do plants make sugar?", "--store", store, "--model", str(ckpt),
                             "--reasoning-budget", "0", "--json", "--top-k", "1"], capsys)
    assert rc == 0 and len(json.loads(out)["ranking"]) == 1 and "capped" not in err


def test_window_step_ranks_more_than_max_candidates(corpus_dir, beir_dir, tmp_path, capsys):
    ckpt, store = _two_label_model_and_store(corpus_dir, tmp_path, capsys)
    rc, out, err = _run_cli(["search", "how do plants make sugar?", "--store", store, "--model", str(ckpt),
                             "--reasoning-budget", "0", "--json", "--window-step", "1"], capsys)
    assert rc == 0, err
    data = json.loads(out)
    assert len(data["ranking"]) == 3 and "capped" not in err
    assert data["notes"][0] == "3 candidates ranked in 2 sliding windows of 2 (step 1)"
    rc, out, err = _run_cli(["search", "q", "--store", store, "--model", str(ckpt), "--window-step", "2"], capsys)
    assert rc == 2 and "step must be between 1 and window - 1 (1)" in err
    assert "--window-step 2" in err  # the error line names the bad option, as the README says
    # eval: --top-k above max_candidates needs --window-step; with it, every query is ranked in windows
    with pytest.raises(SystemExit):
        main_eval(["--beir", str(beir_dir), "--model", str(ckpt), "--top-k", "4", "--quiet"])
    assert "or give --window-step" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a step the model's windows cannot move by: a usage error naming the option
        main_eval(["--beir", str(beir_dir), "--model", str(ckpt), "--top-k", "4", "--window-step", "2", "--quiet"])
    assert info.value.code == 2
    assert "--window-step: step must be between 1 and window - 1 (1)" in capsys.readouterr().err
    res = tmp_path / "res.json"
    assert main_eval(["--beir", str(beir_dir), "--model", str(ckpt), "--top-k", "4", "--window-step", "1",
                      "--reasoning-budget", "0", "--quiet", "--output", str(res)]) == 0
    data = json.loads(res.read_text())
    assert data["window_step"] == 1 and data["num_queries"] == 3
    single = main_eval(["--beir", str(beir_dir), "--model", str(ckpt), "--top-k", "2", "--reasoning-budget", "0",
                        "--quiet", "--output", str(tmp_path / "one.json")])
    assert single == 0
    one = json.loads((tmp_path / "one.json").read_text())
    # three windows per query instead of one
    assert data["context_tokens_per_query"] > 2.5 * one["context_tokens_per_query"]


@pytest.mark.parametrize("line", ["[1, 2]", '"just a string"', "42", "null"])
def test_jsonl_line_that_is_not_an_object_is_a_clear_input_error(tmp_path, capsys, line):
    f = tmp_path / "c.jsonl"
    f.write_text('{"id": "a", "text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:2: expected a JSON object"):
        read_corpus(f)
    store = tmp_path / "qdrant"
    rc, _, err = _run_cli(["index", str(f), "--store", str(store), "--quiet"], capsys)
    assert rc == 2
    assert "c.jsonl:2: expected a JSON object" in err and "Traceback" not in err
    assert not store.exists()  # nothing written


def _caption_folder(root: Path, suffixes) -> Path:
    root.mkdir()
    solid((10, 10, 200)).save(root / "x.png")
    for s in suffixes:
        (root / f"x{s}").write_text(f"caption from {s}")
    return root


def test_caption_choice_follows_txt_md_rst_order(tmp_path):
    # the caption is folded into the image; the other text files are documents of their own
    all_three = read_corpus(_caption_folder(tmp_path / "a", [".rst", ".md", ".txt"]))
    assert [(c.id, c.text) for c in all_three] == [
        ("x.md", "caption from .md"), ("x.png", "caption from .txt"), ("x.rst", "caption from .rst")]
    md_rst = read_corpus(_caption_folder(tmp_path / "b", [".rst", ".md"]))
    assert [(c.id, c.text) for c in md_rst] == [("x.png", "caption from .md"), ("x.rst", "caption from .rst")]


def test_caption_choice_does_not_depend_on_the_hash_seed(tmp_path):
    import subprocess

    folder = _caption_folder(tmp_path / "c", [".rst", ".md", ".txt"])
    code = ("import sys; from retrv_r1_plugin.cli import read_corpus; "
            "print([c.text for c in read_corpus(sys.argv[1]) if c.id == 'x.png'][0])")
    for seed in ("0", "1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == "caption from .txt", f"PYTHONHASHSEED={seed}"


def test_index_with_a_model_without_trained_icm_fails_before_writing(corpus_dir, tmp_path, capsys):
    ckpt = tmp_path / "no_icm"
    model = make_text_model(seed=7, max_candidates=16)
    model.drop_icm()
    model.save_pretrained(ckpt)
    store = tmp_path / "qdrant"
    rc, out, err = _run_cli(["index", str(corpus_dir), "--store", str(store), "--quiet", "--model", str(ckpt)], capsys)
    assert rc == 2
    assert "trained ICM" in err and "without --model" in err
    assert "indexed" not in out
    assert not store.exists()  # the store was never opened, let alone written


def test_train_without_the_train_extra_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if [train] were not installed
    rc, _, err = _run_cli(["train", "sft", "--config", "unused.yaml"], capsys)
    assert rc == 2  # one error line, not a MissingExtraError traceback
    assert err.startswith("retrv-r1: error: ") and len(err.strip().splitlines()) == 1
    assert "pip install 'retrv-r1-plugin[train]'" in err


def test_eval_with_an_unknown_model_path_is_a_clear_error_not_a_traceback(beir_dir, tmp_path, capsys):
    code = main(["eval", "--beir", str(beir_dir), "--model", str(tmp_path / "no-such-model"), "--top-k", "3", "--store", str(tmp_path / "q")])
    assert code == 2
    assert "no model directory" in capsys.readouterr().err


def test_eval_checks_the_model_and_the_qrels_before_indexing_the_corpus(beir_dir, checkpoint, tmp_path, capsys):
    # a wrong --model, a --top-k above its labels or a split without judgements used to be found
    # only after the whole corpus had been embedded into the --store collection
    store = tmp_path / "q"
    assert main(["eval", "--beir", str(beir_dir), "--model", str(tmp_path / "no-such-model"), "--store", str(store)]) == 2
    assert "no model directory" in capsys.readouterr().err and not store.exists()
    with pytest.raises(SystemExit) as info:
        main_eval(["--beir", str(beir_dir), "--model", checkpoint, "--top-k", "17", "--store", str(store), "--quiet"])
    assert info.value.code == 2 and "--top-k 17 exceeds the model's 16 labels" in capsys.readouterr().err
    assert not store.exists()
    (beir_dir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n")  # a header only
    assert main(["eval", "--beir", str(beir_dir), "--split", "dev", "--store", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{beir_dir} (split 'dev'): no queries with relevance judgements" in err and "Traceback" not in err
    assert not store.exists()


# ----------------------------------------------------------------------------- M-BEIR journey
def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def mbeir_dir(tmp_path):
    """A hand-made M-BEIR set of a chatbot team: captioned photos and text candidates, queries
    with an image and text (task 7), awkward but valid ids and unicode."""
    root = tmp_path / "mbeir"
    (root / "images").mkdir(parents=True)
    for name, colour in [("apple", (200, 30, 30)), ("leaf", (30, 180, 30)), ("sea", (30, 30, 200)), ("q", (190, 40, 40))]:
        solid(colour).save(root / "images" / f"{name}.png")
    _write_jsonl(root / "cand_pool" / "local" / "mbeir_chat_cand_pool.jsonl", [
        {"txt": "une pomme rouge 🍎", "img_path": "images/apple.png", "modality": "image,text", "did": "9:1", "src_content": None},
        {"txt": "a green leaf in spring", "img_path": "images/leaf.png", "modality": "image,text", "did": "9:2"},
        {"txt": "the open sea under a blue sky", "img_path": "images/sea.png", "modality": "image,text", "did": "9:3"},
        {"txt": "Bananas are yellow fruit.", "img_path": None, "modality": "text", "did": "9 4"},
    ])
    _write_jsonl(root / "query" / "test" / "mbeir_chat_test.jsonl", [
        {"qid": "7:1", "query_txt": "a red fruit like this one", "query_img_path": "images/q.png",
         "query_modality": "image,text", "pos_cand_list": ["9:1"], "neg_cand_list": ["9:3"], "task_id": 7},
        {"qid": "7:2", "query_txt": "une feuille verte", "query_img_path": None, "query_modality": "text",
         "pos_cand_list": ["9:2"], "task_id": 2},
        {"qid": "7:3", "query_txt": "unjudged", "pos_cand_list": []},
    ])
    return root


def _mbeir_args(root):
    return ["--mbeir-queries", str(root / "query" / "test" / "mbeir_chat_test.jsonl"),
            "--mbeir-pool", str(root / "cand_pool" / "local" / "mbeir_chat_cand_pool.jsonl")]


def test_eval_mbeir_image_and_text_queries_search_by_their_text_on_a_text_store(mbeir_dir, tmp_path, capsys):
    """The default first stage embeds text: an image+text query is searched by its text (the
    reranker reads the image), as retrv-r1 search does; it used to fail every such query with
    'an image query needs an image-text embedder' (and eval had no option to give one)."""
    out = tmp_path / "res.json"
    assert main(["eval", *_mbeir_args(mbeir_dir), "--quiet", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["num_queries"] == 2 and data["retriever"] == "minilm+qdrant"
    assert data["first_stage"]["R@5"] == 1.0  # 4 candidates: every positive is in the top 5
    assert "| first stage |" in capsys.readouterr().out


def test_eval_mbeir_image_pool_needs_an_image_embedder_and_takes_one(tiny_clip_dir, tmp_path, capsys):
    """Image-only candidates (the repo's digits builder): with the text-only first stage the
    error names the pool and the options that fix it, before anything is indexed; with
    --image-embedder the images are indexed by their pixels."""
    from training.data.build_images import main as build_images

    root = tmp_path / "img"
    assert build_images(["--out", str(root), "--only", "digits", "--digits-per-class", "5", "--digits-size", "16"]) == 0
    capsys.readouterr()
    args = ["--mbeir-queries", str(root / "query" / "test" / "mbeir_digits-text2image_test.jsonl"),
            "--mbeir-pool", str(root / "cand_pool" / "local" / "mbeir_digits-text2image_test_cand_pool.jsonl")]
    store = tmp_path / "store"
    assert main(["eval", *args, "--quiet", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "mbeir_digits-text2image_test_cand_pool.jsonl: 10 documents are images without text" in err
    assert "--image-embedder FOLDER" in err and "--first-stage random" in err and "Traceback" not in err
    assert not store.exists()
    i2t = ["--mbeir-queries", str(root / "query" / "test" / "mbeir_digits-image2text_test.jsonl"),
           "--mbeir-pool", str(root / "cand_pool" / "local" / "mbeir_digits-image2text_cand_pool.jsonl")]
    assert main(["eval", *i2t, "--quiet"]) == 2
    assert "mbeir_digits-image2text_test.jsonl: 10 judged queries are images without text" in capsys.readouterr().err

    out = tmp_path / "res.json"
    assert main(["eval", *args, "--quiet", "--image-embedder", str(tiny_clip_dir), "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["num_queries"] == 30 and data["first_stage"]["R@10"] == 1.0  # a pool of 10: all are found
    assert data["retriever"].endswith("+qdrant") and data["retriever"] != "minilm+qdrant"
    assert main(["eval", *i2t, "--quiet", "--image-embedder", str(tiny_clip_dir)]) == 0


def test_eval_bad_input_names_the_file_and_line_before_any_work(mbeir_dir, beir_dir, tmp_path, capsys):
    """A missing image is named with the pool/corpus file and line (it was 'candidate 1 (id=...)'
    from the store, after loading the embedder); a folder as --output or a file as --store is
    refused before indexing and ranking, and an --output file from before is left as it was."""
    out = tmp_path / "res.json"
    out.write_text("earlier results")
    store = tmp_path / "store"
    (mbeir_dir / "images" / "sea.png").unlink()
    assert main(["eval", *_mbeir_args(mbeir_dir), "--quiet", "--output", str(out), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "mbeir_chat_cand_pool.jsonl:3: image file not found:" in err and "sea.png" in err
    assert out.read_text() == "earlier results" and not store.exists()
    assert main(["eval", *_mbeir_args(mbeir_dir), "--first-stage", "random", "--quiet"]) == 2  # also without Qdrant
    assert "mbeir_chat_cand_pool.jsonl:3: image file not found:" in capsys.readouterr().err

    corpus = beir_dir / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps({"_id": "img", "text": "x", "image_path": "gone.png"}) + "\n")
    assert main(["eval", "--beir", str(beir_dir), "--quiet"]) == 2
    assert f"{corpus}:7: image file not found:" in capsys.readouterr().err

    (mbeir_dir / "images" / "sea.png").write_bytes(b"")  # back, so the next checks reach the options
    assert main(["eval", *_mbeir_args(mbeir_dir), "--quiet", "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path}: is a folder" in capsys.readouterr().err
    store.write_text("not a store")
    assert main(["eval", *_mbeir_args(mbeir_dir), "--quiet", "--store", str(store)]) == 2
    assert f"--store {store}: not a folder" in capsys.readouterr().err and store.read_text() == "not a store"

    _write_jsonl(mbeir_dir / "query" / "test" / "mbeir_chat_test.jsonl", [{"qid": "1", "query_txt": "x", "pos_cand_list": []}])
    assert main(["eval", *_mbeir_args(mbeir_dir), "--quiet"]) == 2
    assert "mbeir_chat_test.jsonl: no query has a pos_cand_list naming a candidate of the pool" in capsys.readouterr().err


def test_eval_store_collection_follows_the_corpus(beir_dir, tmp_path, capsys):
    """Run again on an edited corpus with the same --store: a document removed from the corpus
    must not stay in the first stage (it was still retrieved and ranked)."""
    store = tmp_path / "store"
    assert main(["eval", "--beir", str(beir_dir), "--store", str(store), "--quiet"]) == 0
    corpus = beir_dir / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(line for line in lines if '"d1"' not in line) + "\n")  # drop "rockets fly to the moon"
    out = tmp_path / "res.json"
    assert main(["eval", "--beir", str(beir_dir), "--store", str(store), "--quiet", "--output", str(out)]) == 0
    assert "removed 1 document(s) no longer in the corpus" in capsys.readouterr().err
    from retrv_r1_plugin.store import QdrantCandidateStore

    with QdrantCandidateStore(path=store, collection_name="eval_beir") as s:
        assert s.count() == 5 and "d1" not in [c.id for c in s.search("rockets fly to the moon", top_k=10)]
