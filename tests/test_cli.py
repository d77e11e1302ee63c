"""The retrv-r1 CLI on bad input: one ``retrv-r1: error: ...`` line naming the problem, exit 2."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from retrv_r1_plugin.cli import main, read_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_text_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_text_model(seed=3, max_candidates=8).save_pretrained(path)
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"id": "a", "text": "plants make sugar from sunlight"}\n{"id": "b", "text": "rockets fly to the moon"}\n')
    return f


def run(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The one ``retrv-r1: error:`` line of ``err`` (progress bars and notes may precede it)."""
    lines = [l for l in err.splitlines() if l.startswith("retrv-r1: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("device", ["bogus", "cuda"])
def test_a_device_torch_cannot_use_is_a_clear_error(device, checkpoint, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc, out, err = run(["rank", "q", "alpha", "beta", "--model", checkpoint, "--device", device], capsys)
    assert rc == 2 and out == ""
    assert f"--device {device!r}" in one_error_line(err)


@pytest.mark.parametrize("args, option", [
    (["search", "q", "--top-k", "0"], "--top-k"),
    (["search", "q", "--top-k", "-3"], "--top-k"),
    (["search", "q", "--top-n", "0"], "--top-n"),
    (["search", "q", "--top-n", "-1"], "--top-n"),
    (["index", "x.jsonl", "--batch-size", "0"], "--batch-size"),
    (["rank", "q", "a", "--reasoning-budget", "-1"], "--reasoning-budget"),
    (["rank", "q", "a", "--max-inspections", "-1"], "--max-inspections"),
])
def test_counts_below_their_minimum_are_usage_errors(args, option, tmp_path, capsys):
    # --model points nowhere: the option must be refused before any model or store is touched
    model = [] if args[0] == "index" else ["--model", str(tmp_path / "no-model")]
    with pytest.raises(SystemExit) as info:
        main(args + model + ["--store", str(tmp_path / "q")] * (args[0] != "rank"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be an int >=" in err
    assert not (tmp_path / "q").exists()


def test_search_of_a_collection_that_does_not_exist_names_it(corpus, tmp_path, capsys):
    store = str(tmp_path / "q")
    assert main(["index", str(corpus), "--store", store, "--quiet"]) == 0
    capsys.readouterr()
    # checked before the model is loaded: the missing model directory is not what fails
    rc, out, err = run(["search", "plants", "--store", store, "--collection", "typo", "--model", str(tmp_path / "no-model"),
                        "--reasoning-budget", "0"], capsys)
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert "no collection 'typo'" in line and "retrv-r1 index" in line


def test_search_json_on_an_empty_collection_prints_json(corpus, checkpoint, tmp_path, capsys):
    from retrv_r1_plugin.store import QdrantCandidateStore

    store = tmp_path / "q"
    with QdrantCandidateStore(path=store) as s:
        s.delete(s.add(read_corpus(corpus), show_progress=False))
        assert s.count() == 0
    rc, out, err = run(["search", "plants", "--store", str(store), "--model", checkpoint, "--reasoning-budget", "0",
                        "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["ranking"] == []


def test_store_that_is_a_file_is_a_clear_error(corpus, tmp_path, capsys):
    not_a_folder = tmp_path / "store.txt"
    not_a_folder.write_text("x")
    rc, _, err = run(["index", str(corpus), "--store", str(not_a_folder), "--quiet"], capsys)
    assert rc == 2
    assert "not a folder" in one_error_line(err)


def test_index_of_a_missing_path_says_it_does_not_exist(tmp_path, capsys):
    rc, _, err = run(["index", str(tmp_path / "missing"), "--store", str(tmp_path / "q")], capsys)
    assert rc == 2
    assert "no such file or folder" in one_error_line(err)


def test_jsonl_suffix_is_case_insensitive(tmp_path):
    f = tmp_path / "CORPUS.JSONL"
    f.write_text('{"id": "a", "text": "ok"}\n')
    assert [c.id for c in read_corpus(f)] == ["a"]


def test_a_bad_model_from_the_environment_names_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETRV_R1_MODEL", str(tmp_path / "nope"))
    rc, _, err = run(["rank", "q", "a"], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "$RETRV_R1_MODEL=" in line and "no model directory" in line



def test_jsonl_must_be_utf8_and_may_start_with_a_bom(tmp_path, capsys):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes('\ufeff{"id": "a", "text": "caf\u00e9"}\n'.encode("utf-8"))
    assert [(c.id, c.text) for c in read_corpus(bom)] == [("a", "caf\u00e9")]
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\u00e9"}\n'.encode("latin-1"))
    rc, _, err = run(["index", str(latin1), "--store", str(tmp_path / "q")], capsys)
    assert rc == 2
    assert "latin1.jsonl:2: not valid UTF-8" in one_error_line(err)


def test_folder_text_is_utf8_whatever_the_locale_and_a_bom_is_dropped(tmp_path):
    import os
    import subprocess

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_bytes("\ufeffCaf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("utf-8"))
    assert [c.text for c in read_corpus(folder)] == ["Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"]
    # Under an ASCII locale (no UTF-8 mode) the text must read the same.
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = "import sys; from retrv_r1_plugin.cli import read_corpus; print(ascii(read_corpus(sys.argv[1])[0].text))"
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ascii("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e")


def test_an_image_caption_is_found_whatever_the_case_of_the_suffixes(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / "IMG_1.JPG", format="JPEG")
    (folder / "IMG_1.TXT").write_text("a red square")
    Image.new("RGB", (8, 8), (0, 0, 200)).save(folder / "b.png")
    (folder / "b.Md").write_text("a blue square (md)")
    (folder / "b.txt").write_text("a blue square (txt)")  # .txt comes before .md
    # b.Md is not b.png's caption, so it is a document of its own rather than lost
    assert [(c.id, c.text, c.image is not None) for c in read_corpus(folder)] == [
        ("IMG_1.JPG", "a red square", True), ("b.Md", "a blue square (md)", False), ("b.png", "a blue square (txt)", True)]


@pytest.mark.parametrize("line, field", [
    ('{"id": "a", "text": 5}', "'text' must be a string, got int"),
    ('{"id": "a", "text": "x", "metadata": "m"}', "'metadata' must be a JSON object, got str"),
    ('{"id": "a", "text": "x", "metadata": [["k", 1]]}', "'metadata' must be a JSON object, got list"),
    ('{"id": "a", "text": "x", "image_path": 5}', "'image_path' must be a path string, got int"),
    ('{"id": "a", "text": "x", "image": {"b": 1}}', "'image' must be a path string, got dict"),
    ('{"_id": "a", "title": ["t"], "text": "x"}', "'title' must be a string, got list"),
    ('{"_id": {"n": 1}, "text": "x"}', "'_id' must be a string or an integer, got dict"),
    ('{"id": "a", "text": "x", "image_path": "gone.png"}', "image file not found: "),  # was "candidate 1: ..."
])
def test_a_jsonl_field_of_the_wrong_type_is_an_error_naming_the_line(line, field, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "ok", "text": "fine"}\n' + line + "\n")
    rc, _, err = run(["index", str(corpus), "--store", str(tmp_path / "q")], capsys)
    assert rc == 2
    assert f"c.jsonl:2: {field}" in one_error_line(err)


def test_index_photos_without_captions_needs_and_takes_an_image_embedder(tiny_clip_dir, tmp_path, capsys):
    from PIL import Image

    from retrv_r1_plugin import Query
    from retrv_r1_plugin.store import QdrantCandidateStore, SentenceTransformerImageTextEmbedder

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), (230, 10, 10)).save(folder / "red.png")
    Image.new("RGB", (32, 32), (10, 10, 230)).save(folder / "blue.png")
    (folder / "notes.txt").write_text("a red square")
    store = str(tmp_path / "q")
    rc, _, err = run(["index", str(folder), "--store", store, "--quiet"], capsys)
    assert rc == 2 and "--image-embedder FOLDER" in one_error_line(err)
    rc, _, err = run(["index", str(folder), "--store", store, "--quiet", "--image-embedder", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "--image-embedder" in one_error_line(err) and "no such folder" in err
    with pytest.raises(SystemExit):  # one embedder or the other
        main(["index", str(folder), "--store", store, "--embedder", str(tiny_clip_dir), "--image-embedder", str(tiny_clip_dir)])
    assert main(["index", str(folder), "--store", store, "--quiet", "--image-embedder", str(tiny_clip_dir)]) == 0
    with QdrantCandidateStore(SentenceTransformerImageTextEmbedder(tiny_clip_dir), path=store) as s:
        red = s.search(Query(image=str(folder / "red.png")), top_k=1)
        assert s.count() == 3 and red[0].id == "red.png" and red[0].metadata["retrieval_score"] == pytest.approx(1.0, abs=1e-4)



def test_search_image_root_limits_the_images_read_from_the_store(tmp_path):
    from retrv_r1_plugin.cli import build_parser, open_store

    args = build_parser().parse_args(["search", "q", "--store", str(tmp_path / "db"), "--image-root", str(tmp_path / "a"),
                                      "--image-root", str(tmp_path / "b")])
    with open_store(args) as store:
        assert store.image_roots == [os.path.realpath(tmp_path / "a"), os.path.realpath(tmp_path / "b")]
    args = build_parser().parse_args(["search", "q", "--store", str(tmp_path / "db")])
    with open_store(args) as store:
        assert store.image_roots is None
