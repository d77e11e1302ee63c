"""Tests for the ranking metrics, the BEIR / M-BEIR readers and writers, and the data builders."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training/ scripts are not an installed package
    sys.path.insert(0, str(ROOT))

from retrv_r1_plugin.evaluation import (  # noqa: E402
    evaluate_rankings,
    fraction_recall_at_k,
    mrr_at_k,
    ndcg_at_k,
    per_query_metrics,
    rankings_from_scores,
    recall_at_k,
)
from training.data import build_wordnet as bw  # noqa: E402
from training.data.formats import (  # noqa: E402
    DataFormatError,
    Doc,
    QueryRecord,
    load_beir,
    load_mbeir,
    load_mbeir_task,
    load_qrels_tsv,
    mbeir_pool_path,
    mbeir_query_path,
    write_beir,
    write_mbeir_cand_pool,
    write_mbeir_queries,
)

# --------------------------------------------------------------------------- metrics

# q1: graded qrels, first relevant doc at rank 2; q2: nothing relevant retrieved;
# q3: no relevant doc (excluded); q4: judged but missing from rankings (scores 0).
RANKINGS = {"q1": ["d3", "d1", "d2"], "q2": ["x", "y"], "q3": ["a"], "q9": ["d1"]}
QRELS = {
    "q1": {"d1": 2, "d2": 1, "d4": 0},
    "q2": {"z": 1},
    "q3": {"a": 0},
    "q4": {"d1": 1},
}
NDCG_Q1 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 + 1 / math.log2(3))


def test_single_query_metrics_by_hand() -> None:
    ranking, judged = RANKINGS["q1"], QRELS["q1"]
    assert recall_at_k(ranking, judged, 1) == 0.0
    assert recall_at_k(ranking, judged, 2) == 1.0
    assert mrr_at_k(ranking, judged, 10) == 0.5
    assert mrr_at_k(ranking, judged, 1) == 0.0
    assert ndcg_at_k(ranking, judged, 10) == pytest.approx(NDCG_Q1)
    assert NDCG_Q1 == pytest.approx(0.669672, abs=1e-6)
    # d4 has grade 0: not relevant, so only 1 of 2 relevant docs is in the top 2
    assert fraction_recall_at_k(ranking, judged, 2) == 0.5
    assert fraction_recall_at_k(ranking, judged, 3) == 1.0


def test_ndcg_is_graded_and_ideal_is_truncated() -> None:
    judged = {"a": 3, "b": 1}
    assert ndcg_at_k(["a", "b"], judged) == pytest.approx(1.0)
    worse = ndcg_at_k(["b", "a"], judged)
    assert worse == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))
    assert worse < 1.0
    # 12 relevant docs, the top 10 all relevant: perfect at cutoff 10
    many = {f"d{i}": 1 for i in range(12)}
    assert ndcg_at_k([f"d{i}" for i in range(10)], many, 10) == pytest.approx(1.0)


def test_duplicates_count_once_and_ids_compare_as_strings() -> None:
    assert mrr_at_k(["x", "x", "d1"], {"d1": 1}) == 0.5
    assert recall_at_k(["x", "x", "x", "x", "x", "d1"], {"d1": 1}, 2) == 1.0
    assert mrr_at_k([7, 3], {"3": 1}) == 0.5


def test_evaluate_rankings_averages_over_evaluable_queries() -> None:
    result = evaluate_rankings(RANKINGS, QRELS)
    assert list(result) == ["R@1", "R@5", "R@10", "nDCG@10", "MRR@10"]
    # evaluable: q1, q2, q4 (q3 has no relevant doc, q9 is not judged)
    assert result["R@1"] == 0.0
    assert result["R@5"] == pytest.approx(1 / 3)
    assert result["R@10"] == pytest.approx(1 / 3)
    assert result["MRR@10"] == pytest.approx(0.5 / 3)
    assert result["nDCG@10"] == pytest.approx(NDCG_Q1 / 3)
    rows = per_query_metrics(RANKINGS, QRELS)
    assert sorted(rows) == ["q1", "q2", "q4"]
    assert rows["q4"]["R@10"] == 0.0


def test_evaluate_rankings_perfect_and_errors() -> None:
    qrels = {"a": {"1": 1}, "b": {"2": 1}}
    perfect = evaluate_rankings({"a": ["1"], "b": ["2", "1"]}, qrels)
    assert perfect == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "nDCG@10": 1.0, "MRR@10": 1.0}
    with pytest.raises(ValueError, match="no query"):
        evaluate_rankings({"a": ["1"]}, {"a": {"1": 0}})
    with pytest.raises(ValueError, match="positive int"):
        recall_at_k(["1"], {"1": 1}, 0)


def test_rankings_from_scores_orders_ties_and_nan() -> None:
    ranked = rankings_from_scores({"q": {"b": 1.0, "a": 1.0, "c": float("nan"), "d": 2.0}})
    assert ranked == {"q": ["d", "a", "b", "c"]}
    assert rankings_from_scores({"q": {"b": 1.0, "a": 3.0}}, k=1) == {"q": ["a"]}


def test_metrics_agree_with_trec_eval_on_random_runs() -> None:
    """The definitions the module doc claims are trec_eval's (via pytrec_eval), per query:
    R@k = ``success_k``, fraction recall = ``recall_k``, nDCG@10 = ``ndcg_cut_10`` (graded,
    linear gain), MRR@10 = ``recip_rank`` of the run cut at 10."""
    import random

    import pytrec_eval

    rng = random.Random(0)
    qrels: dict[str, dict[str, int]] = {}
    rankings: dict[str, list[str]] = {}
    for q in range(300):
        docs = [f"d{i}" for i in range(rng.randint(1, 40))]
        qrels[f"q{q}"] = {d: rng.choice([0, 0, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, len(docs)))}
        qrels[f"q{q}"].setdefault(rng.choice(docs), rng.randint(1, 3))  # a relevant doc, unless that one was judged
        rankings[f"q{q}"] = rng.sample(docs, rng.randint(1, len(docs)))
    # trec_eval orders a run by score (ties by doc id, descending): give distinct scores in our order
    run = {q: {d: float(len(r) - i) for i, d in enumerate(r)} for q, r in rankings.items()}
    cut = {q: {d: s for d, s in scores.items() if s > len(rankings[q]) - 10} for q, scores in run.items()}
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"success.1,5,10", "recall.1,5,10", "ndcg_cut.10"}).evaluate(run)
    trec_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    compared = 0
    for q, ranking in rankings.items():
        judged = qrels[q]
        if not any(r > 0 for r in judged.values()):
            continue
        compared += 1
        for k in (1, 5, 10):
            assert recall_at_k(ranking, judged, k) == trec[q][f"success_{k}"], (q, k)
            assert fraction_recall_at_k(ranking, judged, k) == pytest.approx(trec[q][f"recall_{k}"]), (q, k)
        assert ndcg_at_k(ranking, judged, 10) == pytest.approx(trec[q]["ndcg_cut_10"], abs=1e-9), q
        assert mrr_at_k(ranking, judged, 10) == pytest.approx(trec_rr[q]["recip_rank"], abs=1e-9), q
    assert compared > 200


# --------------------------------------------------------------------------- BEIR


def _sample_beir(tmp_path: Path) -> Path:
    img = tmp_path / "ds" / "img.png"
    img.parent.mkdir(parents=True)
    img.write_bytes(b"not really a png")
    corpus = {
        "d1": Doc(text="first doc", title="One"),
        "d2": Doc(text="second doc ünïcode", metadata={"lang": "de"}),
        "d3": Doc(text="", image_path=str(img)),
    }
    queries = {"q1": QueryRecord(text="find first"), "q2": QueryRecord(text="find second"), "q3": QueryRecord(text="x")}
    qrels = {"train": {"q1": {"d1": 1}}, "dev": {"q2": {"d2": 2, "d1": 0}}, "test": {"q3": {"d3": 1}}}
    return write_beir(tmp_path / "ds", corpus, queries, qrels)


def test_beir_round_trip(tmp_path: Path) -> None:
    out = _sample_beir(tmp_path)
    assert (out / "qrels" / "dev.tsv").read_text().splitlines()[0] == "query-id\tcorpus-id\tscore"
    dev = load_beir(out, "dev")
    assert dev.qrels == {"q2": {"d2": 2, "d1": 0}}
    assert list(dev.queries) == ["q2"]  # filtered to the split
    assert dev.corpus["d2"].text == "second doc ünïcode"
    assert dev.corpus["d2"].metadata == {"lang": "de"}
    assert dev.corpus["d1"].title == "One"
    assert load_beir(out, "validation").qrels == dev.qrels  # alias
    test = load_beir(out, "test", filter_queries=False)
    assert len(test.queries) == 3
    assert Path(test.corpus["d3"].image_path) == (out / "img.png").resolve()
    assert test.corpus["d3"].modality == "image"
    assert json.loads((out / "corpus.jsonl").read_text().splitlines()[2])["image_path"] == "img.png"
    with pytest.raises(FileNotFoundError, match="available splits: dev, test, train"):
        load_beir(out, "other")


def test_beir_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    out = _sample_beir(tmp_path)
    corpus = out / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:3: invalid JSON"):
        load_beir(out, "test")
    # a line cut short is reported where it ends (not at column 1 of the newline after it)
    corpus.write_text("\n".join(lines[:1] + ['{"_id": "cut", "text": "hal']) + "\n")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:2: invalid JSON \(Unterminated string starting at column 24\)"):
        load_beir(out, "test")
    corpus.write_text("\n".join(lines[:1] + ['{"_id": "cut", ']) + "\n")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:2: invalid JSON \(.* at column 16\)"):
        load_beir(out, "test")
    corpus.write_text("\n".join(lines[:1] + ['{"title": "t", "text": "no id"}']) + "\n")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:2: missing field '_id'"):
        load_beir(out, "test")
    corpus.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:4: duplicate _id 'd1' \(first on line 1\)"):
        load_beir(out, "test")
    corpus.write_text("\n".join(lines) + "\n")

    qrels = out / "qrels" / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq3\td3\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:2: expected 3"):
        load_qrels_tsv(qrels)
    qrels.write_text("query-id\tcorpus-id\tscore\nq3\td3\thigh\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:2: score 'high'"):
        load_qrels_tsv(qrels)
    qrels.write_text("query-id\tcorpus-id\tscore\nq3\tnope\t1\n")
    with pytest.raises(DataFormatError, match="corpus-id 'nope'"):
        load_beir(out, "test")
    assert load_beir(out, "test", strict=False).qrels == {}
    (out / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="queries.jsonl"):
        load_beir(out, "test")


def test_qrels_trailing_tab_is_read_and_non_finite_scores_name_file_and_line(tmp_path: Path) -> None:
    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\t\nq1\td1\t1\t\r\nq1\td2\t0\n")  # trailing tabs: empty extra column
    assert load_qrels_tsv(qrels) == {"q1": {"d1": 1, "d2": 0}}
    for bad in ("nan", "inf", "-Infinity"):
        qrels.write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t{bad}\n")
        with pytest.raises(DataFormatError, match=rf"test\.tsv:2: score '{bad}' is not an integer"):
            load_qrels_tsv(qrels)


def test_a_headerless_qrels_file_with_a_bad_first_row_is_an_error_not_a_skipped_header(tmp_path: Path) -> None:
    qrels = tmp_path / "test.tsv"
    qrels.write_text("q1\td1\thigh\nq1\td2\t1\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:1: score 'high' is not an integer"):
        load_qrels_tsv(qrels)
    for header in ("query-id\tcorpus-id\tscore", "qid\tdocid\trel", "q\td\trelevance"):
        qrels.write_text(f"{header}\nq1\td2\t1\n")
        assert load_qrels_tsv(qrels) == {"q1": {"d2": 1}}


def test_undecodable_bytes_name_file_and_line(tmp_path: Path) -> None:
    out = _sample_beir(tmp_path)
    corpus = out / "corpus.jsonl"
    lines = corpus.read_bytes().splitlines(keepends=True)
    corpus.write_bytes(lines[0] + b'{"_id": "dx", "text": "caf\xe9"}\n' + b"".join(lines[1:]))
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:2: not valid UTF-8"):
        load_beir(out, "test")
    qrels = out / "qrels" / "test.tsv"
    qrels.write_bytes(b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq\xff\td1\t1\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:3: not valid UTF-8"):
        load_qrels_tsv(qrels)


def test_beir_writer_rejects_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="tab"):
        write_beir(tmp_path, {"a\tb": Doc(text="x")}, {}, {})
    with pytest.raises(DataFormatError, match="not in corpus"):
        write_beir(tmp_path, {"a": Doc(text="x")}, {"q": QueryRecord(text="y")}, {"test": {"q": {"b": 1}}})
    # qrels fields are read back stripped: such an id would point at a doc that is not there
    with pytest.raises(DataFormatError, match="whitespace"):
        write_beir(tmp_path, {" a": Doc(text="x")}, {"q": QueryRecord(text="y")}, {"test": {"q": {" a": 1}}})


# --------------------------------------------------------------------------- M-BEIR


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sample_mbeir(tmp_path: Path) -> tuple[Path, Path, Path]:
    from PIL import Image

    root = tmp_path / "M-BEIR"
    (root / "mbeir_images" / "toy").mkdir(parents=True)
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("q", (9, 9, 9))):
        Image.new("RGB", (8, 8), colour).save(root / "mbeir_images" / "toy" / f"{name}.png")
    pool = root / "cand_pool" / "local" / "mbeir_toy_task0_cand_pool.jsonl"
    _write_jsonl(pool, [
        {"txt": None, "img_path": "mbeir_images/toy/red.png", "modality": "image", "did": "9:1", "src_content": None},
        {"txt": "a blue square", "img_path": "mbeir_images/toy/blue.png", "modality": "image,text", "did": "9:2"},
        {"txt": "just text", "img_path": None, "modality": "text", "did": "9:3"},
    ])
    query = root / "query" / "test" / "mbeir_toy_task0_test.jsonl"
    _write_jsonl(query, [
        {"qid": "9:10", "query_txt": "something red", "query_img_path": None, "query_modality": "text",
         "query_src_content": None, "pos_cand_list": ["9:1"], "neg_cand_list": ["9:2"], "task_id": 0},
        {"qid": "9:11", "query_txt": "like this but blue", "query_img_path": "mbeir_images/toy/q.png",
         "query_modality": "image,text", "pos_cand_list": ["9:2", "9:3"], "neg_cand_list": []},
    ])
    return root, query, pool


def test_mbeir_reader(tmp_path: Path) -> None:
    root, query, pool = _sample_mbeir(tmp_path)
    ds = load_mbeir(query, pool, check_images=True)  # image root found from the query/ folder
    assert ds.qrels == {"9:10": {"9:1": 1}, "9:11": {"9:2": 1, "9:3": 1}}
    assert ds.queries["9:10"].metadata == {"neg_cand_list": ["9:2"], "task_id": 0}
    assert ds.queries["9:11"].modality == "image,text"
    assert Path(ds.queries["9:11"].image_path) == (root / "mbeir_images" / "toy" / "q.png").resolve()
    assert ds.corpus["9:1"].text == "" and ds.corpus["9:1"].modality == "image"
    assert ds.corpus["9:3"].image_path is None
    assert ds.stats() == {"docs": 3, "queries": 2, "qrels": 3, "relevant": 3}
    ds.validate()


def test_mbeir_errors_name_file_and_line(tmp_path: Path) -> None:
    root, query, pool = _sample_mbeir(tmp_path)
    (root / "mbeir_images" / "toy" / "blue.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"cand_pool\.jsonl:2: image file not found"):
        load_mbeir(query, pool, check_images=True)
    load_mbeir(query, pool)  # not checked by default
    rows = [json.loads(x) for x in query.read_text().splitlines()]
    rows[1]["pos_cand_list"] = ["9:404"]
    _write_jsonl(query, rows)
    with pytest.raises(DataFormatError, match=r"mbeir_toy_task0_test\.jsonl:2: positive candidate '9:404'"):
        load_mbeir(query, pool)
    assert "9:11" not in load_mbeir(query, pool, strict=False).qrels
    rows[1]["pos_cand_list"] = "9:1"
    _write_jsonl(query, rows)
    with pytest.raises(DataFormatError, match=r"test\.jsonl:2: field 'pos_cand_list' must be a list"):
        load_mbeir(query, pool)
    _write_jsonl(query, [{"qid": "1", "query_txt": None, "query_img_path": None}])
    with pytest.raises(DataFormatError, match=r"test\.jsonl:1: query '1' has neither"):
        load_mbeir(query, pool)
    with pytest.raises(FileNotFoundError, match="candidate pool"):
        load_mbeir(query, tmp_path / "missing.jsonl")


def test_mbeir_writer_round_trip(tmp_path: Path) -> None:
    _, query, pool = _sample_mbeir(tmp_path)
    ds = load_mbeir(query, pool)
    out = tmp_path / "copy"
    # copy images under the new root so their paths are written relative to it
    write_mbeir_cand_pool(mbeir_pool_path(out, "toy"), ds.corpus, image_root=query.parents[2])
    write_mbeir_queries(mbeir_query_path(out, "toy", "test"), ds.queries, ds.qrels, image_root=query.parents[2])
    again = load_mbeir_task(out, "toy", "test", image_root=query.parents[2])
    assert again.qrels == ds.qrels
    assert {k: (v.text, v.image_path, v.modality) for k, v in again.corpus.items()} == {
        k: (v.text, v.image_path, v.modality) for k, v in ds.corpus.items()
    }
    assert again.queries["9:10"].metadata["neg_cand_list"] == ["9:2"]
    first = json.loads(mbeir_pool_path(out, "toy").read_text().splitlines()[0])
    assert first["img_path"] == "mbeir_images/toy/red.png" and first["txt"] is None
    # every field of the published M-BEIR candidate-pool line is written (src_content may be null)
    assert {"txt", "img_path", "modality", "did", "src_content"} <= set(first) and first["src_content"] is None


def test_mbeir_query_lines_carry_the_published_task_id(tmp_path: Path) -> None:
    """Every published M-BEIR query line has ``task_id`` (UniIR's number of "query modality ->
    positive modality"; its qrels and held-out-task scripts read it): the writer keeps a
    loaded one and, given the pool, works it out; the image builders' files carry it."""
    from training.data.build_images import build_digits_tasks

    _, query, pool = _sample_mbeir(tmp_path)
    ds = load_mbeir(query, pool)
    out = mbeir_query_path(tmp_path / "copy", "toy", "test")
    write_mbeir_queries(out, ds.queries, ds.qrels, image_root=query.parents[2], corpus=ds.corpus)
    rows = {r["qid"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["9:10"]["task_id"] == 0  # kept from the source line
    assert rows["9:11"]["task_id"] == 8  # image,text query -> image,text positive
    assert list(rows["9:11"])[:8] == ["qid", "query_txt", "query_img_path", "query_modality",
                                      "query_src_content", "pos_cand_list", "neg_cand_list", "task_id"]
    # a loaded task_id is kept even where the pool would give another (9:11's positives give 8)
    from dataclasses import replace

    kept = {"9:11": replace(ds.queries["9:11"], metadata={"task_id": 7})}
    write_mbeir_queries(out, kept, ds.qrels, image_root=query.parents[2], corpus=ds.corpus)
    assert json.loads(out.read_text())["task_id"] == 7
    # without the pool a loaded task_id is still kept; an unknown one is written as null, never left out
    write_mbeir_queries(out, ds.queries, ds.qrels, image_root=query.parents[2])
    rows = {r["qid"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["9:10"]["task_id"] == 0
    assert "task_id" in rows["9:11"] and rows["9:11"]["task_id"] is None

    build_digits_tasks(tmp_path / "img", size=16, per_class=3, seed=0)
    for task, expected in (("digits-text2image", 0), ("digits-image2text", 3)):
        lines = mbeir_query_path(tmp_path / "img", task, "train").read_text().splitlines()
        assert lines and {json.loads(x)["task_id"] for x in lines} == {expected}


# --------------------------------------------------------------------------- WordNet

DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  By obtaining, using  
00003993 03 n 01 congener 0 001 @ 00003553 n 0000 | a whole (a thing or person) of the same kind or category as another; "lard was also used, though its congener, butter, was more frequently employed"; "the American shopkeeper differs from his European congener"  
00005787 03 n 01 benthos 0 002 @ 00004475 n 0000 + 02661575 a 0103 | organisms (plants and animals) that live at or near the bottom of a sea  
00005930 03 n 01 dwarf 0 001 @ 00004475 n 0000 | a plant or animal that is atypically small  
00736375 04 n 0a mischief 0 mischief-making 0 mischievousness 0 deviltry 1 devilry 1 devilment 0 rascality 0 roguery 0 roguishness 0 shenanigan 0 010 @ 00735936 n 0000 + 01224964 a 0902 + 01787973 v 060d + 01787973 v 050d + 01787973 v 040d + 01162633 a 0301 + 01162633 a 0101 ~ 00736786 n 0000 ~ 00736894 n 0000 ~ 01249816 n 0000 | reckless or malicious behavior that causes discomfort or annoyance in others  
02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 002 @ 02083346 n 0000 @ 01317541 n 0000 | a member of the genus Canis (probably descended from the common wolf) that has been domesticated by man since prehistoric times; occurs in many breeds; "the dog barked all night"  
"""
ADJ_LINE = '00019731 00 s 02 handy 0 ready_to_hand(p) 0 002 & 00019131 a 0000 + 04718999 n 0101 | easy to reach; "found a handy spot for the can opener"  '
VERB_LINE = (
    "00002325 29 v 01 respire 1 005 $ 00001740 v 0000 @ 02108395 v 0000 + 03110323 a 0101 + 00831191 n 0103 "
    "+ 00830811 n 0101 01 + 02 00 | undergo the biomedical and metabolic processes of respiration by taking up "
    "oxygen and producing carbon monoxide  "
)


def test_wordnet_gloss_parsing() -> None:
    syns = [bw.parse_data_line(line, "data.noun", i) for i, line in enumerate(DATA_NOUN.splitlines(), 1)]
    assert syns[0] is None and syns[1] is None  # licence header
    congener = syns[2]
    assert congener.synset_id == "n00003993" and congener.lexname == "noun.Tops"
    assert congener.lemmas == ["congener"]
    assert congener.definition == "a whole (a thing or person) of the same kind or category as another"
    assert congener.examples[0].startswith("lard was also used") and len(congener.examples) == 2
    mischief = syns[5]
    assert len(mischief.lemmas) == 10 and mischief.lemmas[1] == "mischief-making"  # hex w_cnt 0a
    dog = syns[6]
    assert dog.lemmas == ["dog", "domestic dog", "Canis familiaris"]
    assert dog.lemma_text == "dog, domestic dog, Canis familiaris"
    assert dog.definition.endswith("prehistoric times; occurs in many breeds")
    assert bw.definition_leaks_lemma(dog)  # "Canis" appears in the definition
    assert not bw.definition_leaks_lemma(syns[3])
    adj = bw.parse_data_line(ADJ_LINE)
    assert adj.lemmas == ["handy", "ready to hand"] and adj.synset_id == "s00019731"
    assert adj.definition == "easy to reach"
    verb = bw.parse_data_line(VERB_LINE)
    assert verb.lemmas == ["respire"] and verb.definition.startswith("undergo the biomedical")
    assert bw.split_gloss('remove gradually: "These customs are chipping away"') == (
        "remove gradually", ["These customs are chipping away"]
    )
    assert bw.split_gloss('as in the phrase "make strides"; "big strides"')[0] == 'as in the phrase "make strides"'


def test_wordnet_malformed_lines() -> None:
    with pytest.raises(DataFormatError, match=r"data\.noun:7: no '\|'"):
        bw.parse_data_line("00005930 03 n 01 dwarf 0 000 a plant", "data.noun", 7)
    with pytest.raises(DataFormatError, match="w_cnt"):
        bw.parse_data_line("00005930 03 n 05 dwarf 0 000 | x", "data.noun", 1)
    with pytest.raises(DataFormatError, match="pointers"):
        bw.parse_data_line("00005930 03 n 01 dwarf 0 003 @ 00004475 n 0000 | x", "data.noun", 1)


def test_wordnet_selection_and_splits() -> None:
    syns = [s for s in (bw.parse_data_line(x) for x in DATA_NOUN.splitlines()) if s is not None]
    chosen = bw.select_synsets(syns, 10, seed=0, min_definition_words=5)
    # dog leaks "Canis" into its definition; the other four pass
    ids = [s.synset_id for s in chosen]
    assert ids == ["n00003993", "n00005787", "n00005930", "n00736375"]
    # dwarf's definition has 8 words
    assert "n00005930" not in [s.synset_id for s in bw.select_synsets(syns, 10, min_definition_words=9)]
    assert len(bw.select_synsets(syns, 2, seed=0)) == 2
    assert [s.synset_id for s in bw.select_synsets(syns, 10, seed=0, exclude_leaks=False)].count("n02084071") == 1
    splits = bw.assign_splits([f"id{i}" for i in range(100)], seed=3)
    assert splits == bw.assign_splits([f"id{i}" for i in reversed(range(100))], seed=3)
    counts = {name: sum(1 for v in splits.values() if v == name) for name in ("train", "dev", "test")}
    assert counts == {"train": 70, "dev": 10, "test": 20}
    assert splits != bw.assign_splits([f"id{i}" for i in range(100)], seed=4)


def test_wordnet_builder_on_inline_sample(tmp_path: Path) -> None:
    dict_dir = tmp_path / "dict"
    dict_dir.mkdir()
    (dict_dir / "data.noun").write_text(DATA_NOUN)
    (tmp_path / "LICENSE").write_text("WordNet 3.0 Copyright 2006 by Princeton University.\n")
    infos = bw.build_wordnet_tasks(dict_dir, tmp_path / "out", n_synsets=10, min_definition_words=3,
                                   fractions=(0.5, 0.25, 0.25))
    assert set(infos) == {"wordnet-def2word", "wordnet-word2def"}
    d2w = tmp_path / "out" / "wordnet-def2word"
    assert "Princeton" in (d2w / "LICENSE-WordNet.txt").read_text()
    total = 0
    for split in ("train", "dev", "test"):
        ds = load_beir(d2w, split)
        total += len(ds.queries)
        for qid, judged in ds.qrels.items():
            assert judged == {qid[2:]: 1}
            assert ds.queries[qid].text == bw.parse_data_line(
                next(x for x in DATA_NOUN.splitlines() if x.startswith(qid[3:]))
            ).definition
    assert total == 4  # congener, benthos, dwarf, mischief (dog leaks)
    w2d = load_beir(tmp_path / "out" / "wordnet-word2def", "train", filter_queries=False)
    assert w2d.corpus["n00005930"].text == "a plant or animal that is atypically small"
    assert w2d.queries["q-n00005930"].text == "dwarf"


_CACHED = bw.find_wordnet_dict(bw.default_cache_dir())


@pytest.mark.skipif(_CACHED is None, reason="wordnet-base not extracted in the cache (run build_wordnet once)")
def test_wordnet_real_data(tmp_path: Path) -> None:
    assert bw.fetch_wordnet() == _CACHED  # cached: no download
    nouns = bw.load_synsets(_CACHED, ["noun"])
    assert len(nouns) == 82115
    infos = bw.build_wordnet_tasks(_CACHED, tmp_path, n_synsets=200, seed=1)
    assert infos["wordnet-def2word"]["queries"] == {"train": 140, "dev": 20, "test": 40}
    ds = load_beir(tmp_path / "wordnet-def2word", "test")
    assert len(ds.corpus) == 200 and len(ds.queries) == 40
    assert len({d.text.lower() for d in ds.corpus.values()}) == 200  # unambiguous docs
    assert not any(re.search(r';\s*"', q.text) for q in ds.queries.values())  # examples stripped


# --------------------------------------------------------------------------- images


def test_digits_builder(tmp_path: Path) -> None:
    from PIL import Image

    from training.data.build_images import DIGIT_TEMPLATES, build_digits_tasks, digit_caption

    assert digit_caption(7) == "a handwritten digit seven"
    assert digit_caption(7, 1) == "the number 7 written by hand"
    infos = build_digits_tasks(tmp_path, size=28, per_class=10, seed=0)
    assert infos["digits-text2image"]["splits"]["test"] == {"queries": 30, "candidates": 20}
    assert infos["digits-text2image"]["splits"]["train"] == {"queries": 30, "candidates": 70}
    test = load_mbeir_task(tmp_path, "digits-text2image", "test", check_images=True)
    assert len(test.corpus) == 20 and len(test.queries) == 10 * len(DIGIT_TEMPLATES)
    for qid, judged in test.qrels.items():
        label = test.queries[qid].metadata["label"]
        assert len(judged) == 2  # every test image of the class is relevant
        assert all(test.corpus[d].metadata["label"] == label for d in judged)
    image = Image.open(next(iter(test.corpus.values())).image_path)
    assert image.size == (28, 28) and image.mode == "RGB"
    train = load_mbeir_task(tmp_path, "digits-text2image", "train")
    assert not set(train.corpus) & set(test.corpus)  # disjoint pools
    i2t = load_mbeir_task(tmp_path, "digits-image2text", "dev")
    assert len(i2t.corpus) == 10 and len(i2t.queries) == 10
    # M-BEIR publishes "val" where our builders write "dev": either name finds the split
    val = load_mbeir_task(tmp_path, "digits-image2text", "val")
    assert val.split == "dev" and set(val.queries) == set(i2t.queries)
    with pytest.raises(FileNotFoundError):
        load_mbeir_task(tmp_path, "digits-image2text", "validation")
    for qid, judged in i2t.qrels.items():
        assert judged == {f"digits-cap-{i2t.queries[qid].metadata['label']}": 1}
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert set(info["tasks"]) == {"digits-text2image", "digits-image2text"}
    # deterministic: a rebuild gives identical files
    before = mbeir_query_path(tmp_path, "digits-text2image", "test").read_text()
    build_digits_tasks(tmp_path, size=28, per_class=10, seed=0)
    assert mbeir_query_path(tmp_path, "digits-text2image", "test").read_text() == before


def test_skimage_builder(tmp_path: Path) -> None:
    from training.data.build_images import build_skimage_tasks

    infos = build_skimage_tasks(tmp_path, max_side=64, names=["astronaut", "coffee", "horse", "logo"])
    assert infos["skimage-text2image"]["splits"]["test"] == {"queries": 4, "candidates": 4}
    seen_captions = set()
    for split in ("train", "dev", "test"):
        t2i = load_mbeir_task(tmp_path, "skimage-text2image", split, check_images=True)
        assert all(len(j) == 1 for j in t2i.qrels.values())
        seen_captions |= {q.text for q in t2i.queries.values()}
        i2t = load_mbeir_task(tmp_path, "skimage-image2text", split, check_images=True)
        assert len(i2t.corpus) == 4 and i2t.queries and all(q.modality == "image" for q in i2t.queries.values())
        # M-BEIR task_id: text -> image is 0, image -> text is 3
        assert {q.metadata.get("task_id") for q in t2i.queries.values()} == {0}
        assert {q.metadata.get("task_id") for q in i2t.queries.values()} == {3}
    assert len(seen_captions) == 12  # three captions per photo, one per split
    with pytest.raises(ValueError, match="no captions"):
        build_skimage_tasks(tmp_path, names=["not_an_image"])


def test_digits_builder_with_a_relative_output_folder(tmp_path: Path, monkeypatch) -> None:
    """Regression: a relative --out wrote image paths relative to the working directory,
    which readers then joined to the root again (``out/out/images/...``)."""
    from training.data.build_images import build_digits_tasks

    monkeypatch.chdir(tmp_path)
    build_digits_tasks("rel/out", size=28, per_class=10, seed=0)
    monkeypatch.chdir("/")
    test = load_mbeir_task(tmp_path / "rel" / "out", "digits-text2image", "test", check_images=True)
    assert all(Path(d.image_path).is_file() for d in test.corpus.values())


def test_random_first_stage_is_seeded_per_query_and_varies_negatives() -> None:
    from training.examples import RandomRetriever

    r = RandomRetriever([f"d{i}" for i in range(100)], seed=0)
    a, b = r.search("seven", 10), r.search("seven", 10)
    assert a == b and len({d for d, _ in a}) == 10  # deterministic, no duplicates
    assert r.search("three", 10) != a  # another query draws other documents
    assert RandomRetriever([f"d{i}" for i in range(100)], seed=1).search("seven", 10) != a
    assert len(r.search("x", 500)) == 100
    with pytest.raises(ValueError, match="at least one document"):
        RandomRetriever([])
