"""Readers and writers for retrieval data sets in the BEIR layout and in M-BEIR files.

Everything loads into one framework-free shape, :class:`RetrievalDataset`:
``corpus`` (doc id -> :class:`Doc`), ``queries`` (query id -> :class:`QueryRecord`) and
``qrels`` (query id -> {doc id: graded relevance}).

BEIR layout (one directory per data set)::

    corpus.jsonl        {"_id": ..., "title": ..., "text": ...}
    queries.jsonl       {"_id": ..., "text": ...}
    qrels/{split}.tsv   header "query-id<TAB>corpus-id<TAB>score", then one row per pair

As an extension, corpus and query lines may carry ``"image_path"`` (relative to the data
set directory) and ``"metadata"`` (a JSON object); plain BEIR readers ignore them.

M-BEIR files::

    query jsonl   {"qid", "query_txt", "query_img_path", "query_modality",
                   "query_src_content", "pos_cand_list", "neg_cand_list", "task_id"}
    pool jsonl    {"txt", "img_path", "modality", "did", "src_content"}

(UniIR's layout: ``task_id`` is the number of "query modality -> positive modality" in
:data:`MBEIR_TASK_IDS`; published ids are ``"{dataset_id}:{n}"``, which the readers do not
require.)

with image paths relative to an image root (the M-BEIR root directory). Loaded image
paths are absolute. Every parse problem raises :class:`DataFormatError` naming the file
and line; missing files raise ``FileNotFoundError`` naming the path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from retrv_r1_plugin.jsonl import DataFormatError, read_jsonl
from retrv_r1_plugin.jsonl import decode_error as _decode_error
from retrv_r1_plugin.jsonl import require_file as _require_file

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "DataFormatError",
    "Doc",
    "doc_text",
    "QueryRecord",
    "RetrievalDataset",
    "read_jsonl",
    "load_beir_corpus",
    "load_beir_queries",
    "load_qrels_tsv",
    "beir_splits",
    "load_beir",
    "write_beir",
    "load_mbeir",
    "load_mbeir_task",
    "mbeir_query_path",
    "mbeir_pool_path",
    "MBEIR_TASK_IDS",
    "mbeir_task_id",
    "write_mbeir_queries",
    "write_mbeir_cand_pool",
]

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "dev": ("dev", "validation", "val"),
    "validation": ("validation", "dev", "val"),
    "val": ("val", "dev", "validation"),
}


def _modality(text: str, image_path: Optional[str]) -> str:
    if image_path and text:
        return "image,text"
    return "image" if image_path else "text"


@dataclass
class Doc:
    """A corpus document / M-BEIR candidate: text, an optional image, or both."""

    text: str = ""
    title: str = ""
    image_path: Optional[str] = None
    modality: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality is None:
            self.modality = _modality(self.text, self.image_path)


def doc_text(doc: Doc) -> str:
    """The text a document is ranked by: ``"title: text"`` (just one of them when the other is
    empty), as ``retrv-r1 index`` writes a BEIR corpus into the store, so training examples and
    evaluation show the model the text it will rank in use."""
    if doc.title and doc.text:
        return f"{doc.title}: {doc.text}"
    return doc.text or doc.title


@dataclass
class QueryRecord:
    """A query: text, an optional image, or both."""

    text: str = ""
    image_path: Optional[str] = None
    modality: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality is None:
            self.modality = _modality(self.text, self.image_path)


@dataclass
class RetrievalDataset:
    """Corpus, queries and graded qrels of one split."""

    corpus: dict[str, Doc]
    queries: dict[str, QueryRecord]
    qrels: dict[str, dict[str, int]]
    name: str = ""
    split: str = ""

    def validate(self) -> None:
        """Raise :class:`DataFormatError` if qrels name unknown queries or docs."""
        for qid, judged in self.qrels.items():
            if qid not in self.queries:
                raise DataFormatError(f"{self.name or 'dataset'}: qrels name unknown query {qid!r}")
            for doc_id in judged:
                if doc_id not in self.corpus:
                    raise DataFormatError(
                        f"{self.name or 'dataset'}: qrels of query {qid!r} name unknown doc {doc_id!r}"
                    )

    def stats(self) -> dict[str, int]:
        """Counts: docs, queries, qrel pairs, relevant pairs."""
        return {
            "docs": len(self.corpus),
            "queries": len(self.queries),
            "qrels": sum(len(j) for j in self.qrels.values()),
            "relevant": sum(1 for j in self.qrels.values() for r in j.values() if r > 0),
        }


# --------------------------------------------------------------------------- helpers


def _get_id(obj: Mapping[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise DataFormatError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
        raise DataFormatError(f"{where}: field {key!r} must be a non-empty string or int, got {value!r}")
    return str(value)


def _get_text(obj: Mapping[str, Any], key: str, where: str, required: bool = False) -> str:
    if key not in obj:
        if required:
            raise DataFormatError(f"{where}: missing field {key!r}")
        return ""
    value = obj[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _get_metadata(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise DataFormatError(f"{where}: field 'metadata' must be a JSON object")
    return dict(meta)


def _resolve(root: Path, rel: Optional[str]) -> Optional[str]:
    if not rel:
        return None
    p = Path(rel)
    return str(p if p.is_absolute() else (root / p).resolve())


def _relativize(path: Optional[str], root: Path) -> Optional[str]:
    """Express ``path`` relative to ``root`` when it lies under it (POSIX separators)."""
    if not path:
        return None
    p = Path(path)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return str(p)
    return p.as_posix()


def _check_id(value: str, what: str) -> str:
    if not value or any(c in value for c in "\t\r\n"):
        raise DataFormatError(f"{what} {value!r} is empty or holds a tab/newline; it cannot be written")
    if value != value.strip():  # the qrels reader strips fields: the id would no longer match
        raise DataFormatError(f"{what} {value!r} starts or ends with whitespace; it cannot be written")
    return value


def _write_lines(path: Path, lines: Iterator[str]) -> None:
    """Write lines to ``path`` through a temporary file (no half-written file on error)."""
    def write(fh) -> None:
        for line in lines:
            fh.write(line)
            fh.write("\n")

    atomic_write(path, write)


def atomic_write(path: PathLike, write: Any) -> None:
    """Call ``write(fh)`` on a new temporary file next to ``path`` (created exclusively, so a
    planted symlink is never followed), sync it, then rename it over ``path``: a kill or an
    error leaves the old ``path`` (or none), never half a file, and no temporary file. A
    symlink at ``path`` is replaced, not written through."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8", newline="\n") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` as :func:`atomic_write` does."""
    atomic_write(path, lambda fh: fh.write(text))


def _umask() -> int:
    """The process umask. Read from /proc where it is there (Linux 4.7+): setting and
    restoring it with ``os.umask`` is process-wide for a moment, so a file another thread
    creates then would get loose permissions."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dump(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False)


def write_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write dicts as JSON lines through a temporary file; returns how many were written."""
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        for row in rows:
            count += 1
            yield _dump(row)

    _write_lines(Path(path), lines())
    return count


# --------------------------------------------------------------------------- BEIR


def load_beir_corpus(path: PathLike, image_root: Optional[PathLike] = None, *, check_images: bool = False) -> dict[str, Doc]:
    """Read a BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``); ``check_images`` verifies
    that every ``image_path`` exists (the error names the line)."""
    p = Path(path)
    root = Path(image_root) if image_root is not None else p.parent
    corpus: dict[str, Doc] = {}
    lines: dict[str, int] = {}
    for lineno, obj in read_jsonl(p):
        where = f"{p}:{lineno}"
        doc_id = _get_id(obj, "_id", where)
        if doc_id in corpus:
            raise DataFormatError(f"{where}: duplicate _id {doc_id!r} (first on line {lines[doc_id]})")
        lines[doc_id] = lineno
        corpus[doc_id] = Doc(
            text=_get_text(obj, "text", where, required=True),
            title=_get_text(obj, "title", where),
            image_path=_resolve(root, _get_text(obj, "image_path", where)),
            metadata=_get_metadata(obj, where),
        )
        if check_images:
            _check_image(corpus[doc_id].image_path, where)
    return corpus


def load_beir_queries(path: PathLike, image_root: Optional[PathLike] = None, *, check_images: bool = False) -> dict[str, QueryRecord]:
    """Read a BEIR ``queries.jsonl`` (``_id``, ``text``); ``check_images`` as in :func:`load_beir_corpus`."""
    p = Path(path)
    root = Path(image_root) if image_root is not None else p.parent
    queries: dict[str, QueryRecord] = {}
    lines: dict[str, int] = {}
    for lineno, obj in read_jsonl(p):
        where = f"{p}:{lineno}"
        qid = _get_id(obj, "_id", where)
        if qid in queries:
            raise DataFormatError(f"{where}: duplicate _id {qid!r} (first on line {lines[qid]})")
        lines[qid] = lineno
        queries[qid] = QueryRecord(
            text=_get_text(obj, "text", where, required=True),
            image_path=_resolve(root, _get_text(obj, "image_path", where)),
            metadata=_get_metadata(obj, where),
        )
        if check_images:
            _check_image(queries[qid].image_path, where)
    return queries


def _parse_score(raw: str) -> Optional[int]:
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or value != int(value):
        return None
    return int(value)


_QRELS_HEADER_IDS = {"query-id", "query_id", "queryid", "qid", "query"}
_QRELS_HEADER_SCORES = {"score", "relevance", "rel", "label", "grade", "judgment", "judgement"}


def _is_qrels_header(qid: str, score: str) -> bool:
    """A first line that names its columns (not a data row with a bad score, which must fail)."""
    return qid.lower() in _QRELS_HEADER_IDS or score.lower() in _QRELS_HEADER_SCORES


def load_qrels_tsv(path: PathLike) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels file: ``query-id  corpus-id  score`` (tab separated, header optional).

    Scores must be integers (``"1.0"`` is accepted). Conflicting duplicate pairs raise.
    """
    p = _require_file(Path(path), "qrels file")
    qrels: dict[str, dict[str, int]] = {}
    with open(p, encoding="utf-8-sig") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()  # also drops a trailing tab (an empty extra column)
                if not line:
                    continue
                fields = line.split("\t") if "\t" in line else line.split()
                if len(fields) != 3:
                    raise DataFormatError(
                        f"{p}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                        f"got {len(fields)}"
                    )
                qid, doc_id, raw = (f.strip() for f in fields)
                score = _parse_score(raw)
                if score is None:
                    if lineno == 1 and _is_qrels_header(qid, raw):
                        continue  # header line, e.g. "query-id corpus-id score"
                    raise DataFormatError(f"{p}:{lineno}: score {raw!r} is not an integer")
                if not qid or not doc_id:
                    raise DataFormatError(f"{p}:{lineno}: empty query-id or corpus-id")
                judged = qrels.setdefault(qid, {})
                if doc_id in judged and judged[doc_id] != score:
                    raise DataFormatError(
                        f"{p}:{lineno}: pair ({qid!r}, {doc_id!r}) already has score {judged[doc_id]}, now {score}"
                    )
                judged[doc_id] = score
        except UnicodeDecodeError as exc:
            raise _decode_error(p, exc) from None
    return qrels


def beir_splits(data_dir: PathLike) -> list[str]:
    """Names of the splits that have a ``qrels/{split}.tsv`` file, sorted."""
    qdir = Path(data_dir) / "qrels"
    return sorted(p.stem for p in qdir.glob("*.tsv")) if qdir.is_dir() else []


def _qrels_path(data_dir: Path, split: str) -> Path:
    for name in SPLIT_ALIASES.get(split, (split,)):
        candidate = data_dir / "qrels" / f"{name}.tsv"
        if candidate.is_file():
            return candidate
    have = beir_splits(data_dir)
    raise FileNotFoundError(
        f"qrels file not found: {data_dir / 'qrels' / (split + '.tsv')} "
        f"(available splits: {', '.join(have) if have else 'none'})"
    )


def load_beir(
    data_dir: PathLike,
    split: str = "test",
    *,
    filter_queries: bool = True,
    strict: bool = True,
    check_images: bool = False,
) -> RetrievalDataset:
    """Load a BEIR-layout data set directory for one split.

    ``split`` ``"dev"``, ``"validation"`` and ``"val"`` are aliases of each other.
    ``filter_queries`` keeps only the queries judged in this split (as BEIR does).
    ``strict`` raises on qrels naming unknown queries/docs; otherwise those pairs are dropped.
    ``check_images`` verifies that every referenced image file exists.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"BEIR data set directory not found: {d}")
    corpus = load_beir_corpus(_require_file(d / "corpus.jsonl", "BEIR corpus"), check_images=check_images)
    queries = load_beir_queries(_require_file(d / "queries.jsonl", "BEIR queries"), check_images=check_images)
    qpath = _qrels_path(d, split)
    raw = load_qrels_tsv(qpath)
    qrels: dict[str, dict[str, int]] = {}
    for qid, judged in raw.items():
        if qid not in queries:
            if strict:
                raise DataFormatError(f"{qpath}: query-id {qid!r} is not in {d / 'queries.jsonl'}")
            continue
        kept = {}
        for doc_id, score in judged.items():
            if doc_id not in corpus:
                if strict:
                    raise DataFormatError(f"{qpath}: corpus-id {doc_id!r} (query {qid!r}) is not in {d / 'corpus.jsonl'}")
                continue
            kept[doc_id] = score
        if kept:
            qrels[qid] = kept
    if filter_queries:
        queries = {qid: q for qid, q in queries.items() if qid in qrels}
    return RetrievalDataset(corpus=corpus, queries=queries, qrels=qrels, name=d.name, split=split)


def write_beir(
    out_dir: PathLike,
    corpus: Mapping[str, Doc],
    queries: Mapping[str, QueryRecord],
    qrels_by_split: Mapping[str, Mapping[str, Mapping[str, int]]],
) -> Path:
    """Write a BEIR-layout directory: corpus.jsonl, queries.jsonl, qrels/{split}.tsv.

    The corpus and queries are shared by all splits; each split gets its qrels file.
    Image paths are written relative to ``out_dir`` when they lie under it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def doc_lines() -> Iterator[str]:
        for doc_id, doc in corpus.items():
            row: dict[str, Any] = {"_id": _check_id(str(doc_id), "doc id"), "title": doc.title, "text": doc.text}
            if doc.image_path:
                row["image_path"] = _relativize(doc.image_path, out)
            if doc.metadata:
                row["metadata"] = doc.metadata
            yield _dump(row)

    def query_lines() -> Iterator[str]:
        for qid, q in queries.items():
            row: dict[str, Any] = {"_id": _check_id(str(qid), "query id"), "text": q.text}
            if q.image_path:
                row["image_path"] = _relativize(q.image_path, out)
            if q.metadata:
                row["metadata"] = q.metadata
            yield _dump(row)

    for split, qrels in qrels_by_split.items():
        for qid, judged in qrels.items():
            if str(qid) not in queries and qid not in queries:
                raise DataFormatError(f"split {split!r}: qrels name query {qid!r}, which is not in queries")
            for doc_id in judged:
                if str(doc_id) not in corpus and doc_id not in corpus:
                    raise DataFormatError(f"split {split!r}: qrels of query {qid!r} name doc {doc_id!r}, not in corpus")

    _write_lines(out / "corpus.jsonl", doc_lines())
    _write_lines(out / "queries.jsonl", query_lines())
    for split, qrels in qrels_by_split.items():
        _check_id(split, "split name")

        def qrel_lines(qrels: Mapping[str, Mapping[str, int]] = qrels) -> Iterator[str]:
            yield "query-id\tcorpus-id\tscore"
            for qid, judged in qrels.items():
                for doc_id, score in judged.items():
                    yield f"{_check_id(str(qid), 'query id')}\t{_check_id(str(doc_id), 'doc id')}\t{int(score)}"

        _write_lines(out / "qrels" / f"{split}.tsv", qrel_lines())
    return out


# --------------------------------------------------------------------------- M-BEIR


def _default_image_root(query_file: Path) -> Path:
    """The M-BEIR root: the parent of the nearest ancestor named ``query``, else the file's dir."""
    for parent in query_file.resolve().parents:
        if parent.name == "query":
            return parent.parent
    return query_file.resolve().parent


def _id_list(obj: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise DataFormatError(f"{where}: field {key!r} must be a list of ids")
    return [str(v) for v in value]


def _check_image(path: Optional[str], where: str) -> None:
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image file not found: {path}")


def load_mbeir(
    query_file: PathLike,
    cand_pool_file: PathLike,
    image_root: Optional[PathLike] = None,
    *,
    check_images: bool = False,
    strict: bool = True,
) -> RetrievalDataset:
    """Load an M-BEIR query file and its candidate pool.

    ``image_root`` is the directory image paths are relative to; by default the parent
    of the ``query/`` directory holding ``query_file`` (the M-BEIR root), else the
    query file's own directory. ``pos_cand_list`` entries become qrels with relevance 1;
    ``neg_cand_list`` is kept in ``QueryRecord.metadata["neg_cand_list"]``. With
    ``strict``, positives missing from the pool raise; otherwise they are dropped.
    ``check_images`` verifies that every referenced image file exists.
    """
    qpath, ppath = Path(query_file), Path(cand_pool_file)
    _require_file(qpath, "M-BEIR query file")
    _require_file(ppath, "M-BEIR candidate pool file")
    root = Path(image_root) if image_root is not None else _default_image_root(qpath)

    corpus: dict[str, Doc] = {}
    lines: dict[str, int] = {}
    for lineno, obj in read_jsonl(ppath):
        where = f"{ppath}:{lineno}"
        did = _get_id(obj, "did", where)
        if did in corpus:
            raise DataFormatError(f"{where}: duplicate did {did!r} (first on line {lines[did]})")
        lines[did] = lineno
        text = _get_text(obj, "txt", where)
        image = _resolve(root, _get_text(obj, "img_path", where))
        if not text and not image:
            raise DataFormatError(f"{where}: candidate {did!r} has neither 'txt' nor 'img_path'")
        if check_images:
            _check_image(image, where)
        extra = {k: v for k, v in obj.items() if k not in {"did", "txt", "img_path", "modality"} and v is not None}
        corpus[did] = Doc(text=text, image_path=image, modality=obj.get("modality") or None, metadata=extra)

    queries: dict[str, QueryRecord] = {}
    qrels: dict[str, dict[str, int]] = {}
    qlines: dict[str, int] = {}
    for lineno, obj in read_jsonl(qpath):
        where = f"{qpath}:{lineno}"
        qid = _get_id(obj, "qid", where)
        if qid in queries:
            raise DataFormatError(f"{where}: duplicate qid {qid!r} (first on line {qlines[qid]})")
        qlines[qid] = lineno
        text = _get_text(obj, "query_txt", where)
        image = _resolve(root, _get_text(obj, "query_img_path", where))
        if not text and not image:
            raise DataFormatError(f"{where}: query {qid!r} has neither 'query_txt' nor 'query_img_path'")
        if check_images:
            _check_image(image, where)
        positives = _id_list(obj, "pos_cand_list", where)
        negatives = _id_list(obj, "neg_cand_list", where)
        missing = [d for d in positives if d not in corpus]
        if missing and strict:
            raise DataFormatError(f"{where}: positive candidate {missing[0]!r} is not in pool {ppath}")
        positives = [d for d in positives if d in corpus]
        meta = {
            k: v
            for k, v in obj.items()
            if k not in {"qid", "query_txt", "query_img_path", "query_modality", "pos_cand_list", "neg_cand_list"}
            and v is not None
        }
        if negatives:
            meta["neg_cand_list"] = negatives
        queries[qid] = QueryRecord(
            text=text, image_path=image, modality=obj.get("query_modality") or None, metadata=meta
        )
        if positives:
            qrels[qid] = {d: 1 for d in positives}
    return RetrievalDataset(corpus=corpus, queries=queries, qrels=qrels, name=qpath.stem)


def mbeir_query_path(root: PathLike, task: str, split: str) -> Path:
    """``root/query/{split}/mbeir_{task}_{split}.jsonl`` (M-BEIR naming)."""
    return Path(root) / "query" / split / f"mbeir_{task}_{split}.jsonl"


def mbeir_pool_path(root: PathLike, task: str, split: Optional[str] = None) -> Path:
    """``root/cand_pool/local/mbeir_{task}[_{split}]_cand_pool.jsonl`` (M-BEIR naming)."""
    name = f"mbeir_{task}_{split}_cand_pool.jsonl" if split else f"mbeir_{task}_cand_pool.jsonl"
    return Path(root) / "cand_pool" / "local" / name


def load_mbeir_task(root: PathLike, task: str, split: str, **kwargs: Any) -> RetrievalDataset:
    """Load ``task``/``split`` from an M-BEIR-style root (per-split pool, else a shared one).

    ``dev`` and ``val`` name the same split: M-BEIR publishes ``val``, our builders write
    ``dev``; the one that exists is read."""
    qpath = mbeir_query_path(root, task, split)
    alias = {"dev": "val", "val": "dev"}.get(split)
    if not qpath.is_file() and alias and mbeir_query_path(root, task, alias).is_file():
        split = alias
        qpath = mbeir_query_path(root, task, split)
    pool = mbeir_pool_path(root, task, split)
    if not pool.is_file():
        pool = mbeir_pool_path(root, task)
    if not pool.is_file():
        raise FileNotFoundError(
            f"candidate pool not found: {mbeir_pool_path(root, task, split)} or {mbeir_pool_path(root, task)}"
        )
    kwargs.setdefault("image_root", root)
    ds = load_mbeir(qpath, pool, **kwargs)
    ds.name, ds.split = task, split
    return ds


def write_mbeir_cand_pool(path: PathLike, corpus: Mapping[str, Doc], image_root: PathLike) -> Path:
    """Write an M-BEIR candidate pool jsonl; image paths relative to ``image_root``."""
    root = Path(image_root)

    def lines() -> Iterator[str]:
        for did, doc in corpus.items():
            row: dict[str, Any] = {
                "txt": doc.text or None,
                "img_path": _relativize(doc.image_path, root),
                "modality": doc.modality,
                "did": _check_id(str(did), "did"),
                "src_content": doc.metadata.get("src_content"),
            }
            row.update({k: v for k, v in doc.metadata.items() if k not in row})
            yield _dump(row)

    p = Path(path)
    _write_lines(p, lines())
    return p


#: UniIR's M-BEIR task numbers, by (query modality, positive candidate modality).
MBEIR_TASK_IDS: dict[tuple[str, str], int] = {
    ("text", "image"): 0,
    ("text", "text"): 1,
    ("text", "image,text"): 2,
    ("image", "text"): 3,
    ("image", "image"): 4,
    ("image", "text,image"): 5,
    ("image,text", "text"): 6,
    ("image,text", "image"): 7,
    ("image,text", "image,text"): 8,
}


def mbeir_task_id(query_modality: Optional[str], cand_modality: Optional[str]) -> Optional[int]:
    """The M-BEIR ``task_id`` of a query -> candidate modality pair (None when it has none)."""
    return MBEIR_TASK_IDS.get((str(query_modality), str(cand_modality)))


def write_mbeir_queries(
    path: PathLike,
    queries: Mapping[str, QueryRecord],
    qrels: Mapping[str, Mapping[str, int]],
    image_root: PathLike,
    corpus: Optional[Mapping[str, Doc]] = None,
) -> Path:
    """Write an M-BEIR query jsonl. ``pos_cand_list`` = docs with relevance > 0 in ``qrels``;
    ``neg_cand_list`` comes from ``metadata["neg_cand_list"]`` when present.

    ``task_id`` is ``metadata["task_id"]`` when present, else (given the candidate pool
    ``corpus``) the number of "query modality -> first positive's modality", else null.
    """
    root = Path(image_root)

    def lines() -> Iterator[str]:
        for qid, q in queries.items():
            judged = qrels.get(qid, {})
            meta = dict(q.metadata)
            positives = [str(d) for d, r in judged.items() if r > 0]
            task_id = meta.pop("task_id", None)
            if task_id is None and corpus is not None:
                first = next((corpus[d] for d in positives if d in corpus), None)
                task_id = mbeir_task_id(q.modality, first.modality) if first is not None else None
            row: dict[str, Any] = {
                "qid": _check_id(str(qid), "qid"),
                "query_txt": q.text or None,
                "query_img_path": _relativize(q.image_path, root),
                "query_modality": q.modality,
                "query_src_content": meta.pop("query_src_content", None),
                "pos_cand_list": positives,
                "neg_cand_list": [str(d) for d in meta.pop("neg_cand_list", [])],
                "task_id": task_id,
            }
            row.update({k: v for k, v in meta.items() if k not in row})
            yield _dump(row)

    p = Path(path)
    _write_lines(p, lines())
    return p
