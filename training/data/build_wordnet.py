"""Build real text retrieval sets from Princeton WordNet 3.0, written in the BEIR layout.

Data source: the Debian package ``wordnet-base`` (``apt-get download`` + ``dpkg -x`` into a
cache; no root needed unless ``apt-get update`` must run), or any WordNet ``dict``
directory holding ``data.noun`` etc. (``--wordnet-dir``).

Two tasks over the same sample of synsets (one doc and one query per synset, so every
query has exactly one relevant doc):

* ``wordnet-def2word``: query = a synset's definition, doc = its lemma names joined
  with ", " (e.g. "organism, being").
* ``wordnet-word2def``: query = the lemma names, doc = the definition.

Definitions are the glosses with their quoted example sentences removed (examples
usually contain the word itself). Synsets are kept only when the definition has at
least ``min_definition_words`` words, no lemma word leaks into it, and both its lemma
text and its definition are unique in the sample (so the single relevant doc is well
defined). Queries are split train/dev/test (default 70/10/20) by a seeded shuffle of
the sorted synset ids; the corpus (all sampled synsets, plus optional distractor
synsets that have no query) is shared by the splits, as in BEIR.

Usage::

    python -m training.data.build_wordnet --out data/wordnet [--n-synsets 3000]
        [--pos noun] [--seed 0] [--extra-docs 0] [--cache DIR | --wordnet-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # allow "python training/data/build_wordnet.py"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.data.formats import DataFormatError, Doc, QueryRecord, write_beir

__all__ = [
    "WordNetSynset",
    "LEXNAMES",
    "POS_FILES",
    "default_cache_dir",
    "find_wordnet_dict",
    "find_licence_file",
    "fetch_wordnet",
    "split_gloss",
    "parse_data_line",
    "parse_data_file",
    "load_synsets",
    "definition_leaks_lemma",
    "select_synsets",
    "assign_splits",
    "build_wordnet_tasks",
    "main",
]

#: WordNet data files by part of speech.
POS_FILES: dict[str, str] = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}

#: Lexicographer file names by lex_filenum (lexnames(5WN)).
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)

TASK_DEF2WORD = "wordnet-def2word"
TASK_WORD2DEF = "wordnet-word2def"
LICENCE_NAME = "LICENSE-WordNet.txt"
_DEB = "wordnet-base"


@dataclass
class WordNetSynset:
    """One synset line of a WordNet data file."""

    offset: str
    lex_filenum: int
    ss_type: str
    lemmas: list[str]
    gloss: str
    definition: str
    examples: list[str] = field(default_factory=list)

    @property
    def synset_id(self) -> str:
        """Stable id: synset type letter + 8-digit offset, e.g. ``n00001740``."""
        return f"{self.ss_type}{self.offset}"

    @property
    def lexname(self) -> str:
        return LEXNAMES[self.lex_filenum] if 0 <= self.lex_filenum < len(LEXNAMES) else str(self.lex_filenum)

    @property
    def lemma_text(self) -> str:
        """Lemma names joined with ", " (underscores already turned into spaces)."""
        return ", ".join(self.lemmas)


# --------------------------------------------------------------------------- fetching


def default_cache_dir() -> Path:
    """``$RETRV_R1_CACHE/wordnet`` or ``~/.cache/retrv-r1-plugin/wordnet``."""
    base = os.environ.get("RETRV_R1_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "retrv-r1-plugin") / "wordnet"


def find_wordnet_dict(root: os.PathLike | str) -> Optional[Path]:
    """Directory holding ``data.noun`` under ``root`` (Debian, Princeton or plain layout), or None."""
    r = Path(root)
    for candidate in (r, r / "root" / "usr" / "share" / "wordnet", r / "usr" / "share" / "wordnet", r / "dict"):
        if (candidate / "data.noun").is_file():
            return candidate
    return None


def find_licence_file(root: os.PathLike | str) -> Optional[Path]:
    """The WordNet licence notice for a dict directory or cache ``root``, or None.

    Looks for the Debian ``copyright`` file next to the data, then ``LICENSE``/``COPYING``
    in the directory or its parent (Princeton tarball layout).
    """
    r = Path(root)
    for candidate in (
        r.parent / "doc" / _DEB / "copyright",
        r / "root" / "usr" / "share" / "doc" / _DEB / "copyright",
        r / "usr" / "share" / "doc" / _DEB / "copyright",
        r / "LICENSE",
        r.parent / "LICENSE",
        r / "COPYING",
        r.parent / "COPYING",
    ):
        if candidate.is_file():
            return candidate
    return None


def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)


def fetch_wordnet(cache_dir: os.PathLike | str | None = None) -> Path:
    """Return the WordNet dict directory, downloading ``wordnet-base`` into the cache if needed.

    Runs ``apt-get download wordnet-base`` (then, only on failure, ``apt-get update`` and a
    retry) and ``dpkg -x`` into ``cache_dir/root``. Raises ``RuntimeError`` with apt's
    message when that fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = find_wordnet_dict(cache)
    if found is not None:
        return found
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"{tool} is not available; download WordNet 3.0 yourself and pass its dict "
                "directory with --wordnet-dir"
            )
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{_DEB}_*.deb"))
    if not debs:
        result = _run(["apt-get", "download", _DEB], cache)
        if result.returncode != 0:
            update = _run(["apt-get", "update"], cache)
            if update.returncode != 0:
                raise RuntimeError(
                    f"apt-get download {_DEB} failed ({result.stderr.strip()}) and apt-get update "
                    f"failed too ({update.stderr.strip()}); apt-get update needs root"
                )
            result = _run(["apt-get", "download", _DEB], cache)
            if result.returncode != 0:
                raise RuntimeError(f"apt-get download {_DEB} failed: {result.stderr.strip()}")
        debs = sorted(cache.glob(f"{_DEB}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {_DEB} reported success but no .deb is in {cache}")
    deb = debs[-1]
    target = cache / "root"
    result = _run(["dpkg", "-x", str(deb), str(target)], cache)
    if result.returncode != 0:
        raise RuntimeError(f"dpkg -x {deb} failed: {result.stderr.strip()}")
    version = _run(["dpkg-deb", "-f", str(deb), "Version"], cache)
    if version.returncode == 0:
        (cache / "version.txt").write_text(f"{_DEB} {version.stdout.strip()}\n", encoding="utf-8")
    found = find_wordnet_dict(cache)
    if found is None:
        raise RuntimeError(f"{deb} was extracted into {target} but holds no data.noun")
    return found


# --------------------------------------------------------------------------- parsing

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_EXAMPLE_START = re.compile(r'(?:^|[;:,])\s*"')
_EXAMPLE = re.compile(r'"([^"]*)"')


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a gloss into its definition and its quoted examples.

    ``'a whole of the same kind; "lard was used"; "the shopkeeper"'`` ->
    ``("a whole of the same kind", ["lard was used", "the shopkeeper"])``. Quotes inside
    the definition (not after a ';') are kept.
    """
    match = _EXAMPLE_START.search(gloss)
    if match is None:
        definition, rest = gloss, ""
    else:
        definition, rest = gloss[: match.start()], gloss[match.start():]
    definition = re.sub(r"\s+", " ", definition).strip().rstrip(";").strip()
    examples = [e.strip() for e in _EXAMPLE.findall(rest) if e.strip()]
    return definition, examples


def parse_data_line(line: str, source: str = "<data>", lineno: int = 0) -> Optional[WordNetSynset]:
    """Parse one line of a WordNet ``data.*`` file; None for the licence header lines.

    Format: ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt
    [ptr ...] [frames ...] | gloss`` with ``w_cnt`` in hex.
    """
    if not line.strip() or line.startswith("  "):
        return None
    where = f"{source}:{lineno}"
    head, sep, gloss = line.partition("|")
    if not sep:
        raise DataFormatError(f"{where}: no '|' separating the gloss")
    fields = head.split()
    try:
        offset, lex_filenum, ss_type = fields[0], int(fields[1]), fields[2]
        w_cnt = int(fields[3], 16)
    except (IndexError, ValueError):
        raise DataFormatError(f"{where}: expected 'offset lex_filenum ss_type w_cnt ...'") from None
    if not offset.isdigit() or len(offset) != 8:
        raise DataFormatError(f"{where}: synset offset {offset!r} is not 8 digits")
    if ss_type not in {"n", "v", "a", "s", "r"}:
        raise DataFormatError(f"{where}: unknown synset type {ss_type!r}")
    if w_cnt < 1 or len(fields) < 4 + 2 * w_cnt + 1:
        raise DataFormatError(f"{where}: w_cnt {fields[3]} does not match the word list")
    try:
        p_cnt = int(fields[4 + 2 * w_cnt])
    except ValueError:
        raise DataFormatError(f"{where}: pointer count {fields[4 + 2 * w_cnt]!r} is not a number") from None
    if len(fields) < 5 + 2 * w_cnt + 4 * p_cnt:
        raise DataFormatError(f"{where}: {p_cnt} pointers announced but fewer present")
    lemmas: list[str] = []
    seen: set[str] = set()
    for raw in fields[4 : 4 + 2 * w_cnt : 2]:
        word = _ADJ_MARKER.sub("", raw).replace("_", " ")
        if word.lower() not in seen:
            seen.add(word.lower())
            lemmas.append(word)
    gloss = gloss.strip()
    definition, examples = split_gloss(gloss)
    return WordNetSynset(offset, lex_filenum, ss_type, lemmas, gloss, definition, examples)


def parse_data_file(path: os.PathLike | str) -> list[WordNetSynset]:
    """Parse every synset of a WordNet ``data.*`` file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"WordNet data file not found: {p}")
    out: list[WordNetSynset] = []
    with open(p, encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            syn = parse_data_line(line.rstrip("\n"), str(p), lineno)
            if syn is not None:
                out.append(syn)
    return out


def load_synsets(dict_dir: os.PathLike | str, pos: Iterable[str] = ("noun",)) -> list[WordNetSynset]:
    """Parse the data files of the given parts of speech (``noun``, ``verb``, ``adj``, ``adv``)."""
    out: list[WordNetSynset] = []
    for name in pos:
        if name not in POS_FILES:
            raise ValueError(f"unknown part of speech {name!r}; choose from {sorted(POS_FILES)}")
        out.extend(parse_data_file(Path(dict_dir) / POS_FILES[name]))
    return out


# --------------------------------------------------------------------------- selection

_TOKEN = re.compile(r"[a-z0-9]+")


def definition_leaks_lemma(syn: WordNetSynset) -> bool:
    """True when a word (3+ letters) of a lemma appears in the definition (also as a prefix
    of a definition word when it has 4+ letters, e.g. "dwarf" in "dwarfs")."""
    def_tokens = _TOKEN.findall(syn.definition.lower())
    for lemma in syn.lemmas:
        for tok in _TOKEN.findall(lemma.lower()):
            if len(tok) < 3:
                continue
            for d in def_tokens:
                if d == tok or (len(tok) >= 4 and d.startswith(tok)):
                    return True
    return False


def select_synsets(
    synsets: Sequence[WordNetSynset],
    n: int,
    seed: int = 0,
    *,
    min_definition_words: int = 5,
    exclude_leaks: bool = True,
    exclude: Iterable[str] = (),
) -> list[WordNetSynset]:
    """Pick up to ``n`` synsets with non-trivial, unambiguous definitions, deterministically.

    Candidates (sorted by id, then shuffled by ``seed``) are taken greedily while their
    lemma text and definition are unseen (case-insensitive). Returned sorted by id.
    """
    skip = set(exclude)
    pool = sorted(
        (
            s
            for s in synsets
            if s.synset_id not in skip
            and len(s.definition.split()) >= min_definition_words
            and not (exclude_leaks and definition_leaks_lemma(s))
        ),
        key=lambda s: s.synset_id,
    )
    random.Random(seed).shuffle(pool)
    lemma_seen: set[str] = set()
    def_seen: set[str] = set()
    chosen: list[WordNetSynset] = []
    for s in pool:
        if len(chosen) >= n:
            break
        lk, dk = s.lemma_text.lower(), s.definition.lower()
        if lk in lemma_seen or dk in def_seen:
            continue
        lemma_seen.add(lk)
        def_seen.add(dk)
        chosen.append(s)
    return sorted(chosen, key=lambda s: s.synset_id)


def assign_splits(
    ids: Iterable[str], seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2),
    names: Sequence[str] = ("train", "dev", "test"),
) -> dict[str, str]:
    """Map each id to a split: sort, shuffle with ``seed``, cut by ``fractions`` (rounded)."""
    if len(fractions) != len(names) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions {fractions} must be non-negative, sum to 1 and match {names}")
    order = sorted(set(ids))
    random.Random(seed).shuffle(order)
    out: dict[str, str] = {}
    start = 0
    cum = 0.0
    for i, (frac, name) in enumerate(zip(fractions, names)):
        cum += frac
        end = len(order) if i == len(names) - 1 else round(cum * len(order))
        for item in order[start:end]:
            out[item] = name
        start = end
    return out


# --------------------------------------------------------------------------- building


def _read_version(dict_dir: Path) -> str:
    """The ``version.txt`` that :func:`fetch_wordnet` leaves in the cache, if any."""
    for parent in [dict_dir, *list(dict_dir.resolve().parents)[:4]]:
        candidate = parent / "version.txt"
        if candidate.is_file():
            return "Princeton WordNet 3.0, Debian package " + candidate.read_text(encoding="utf-8").strip()
    return "Princeton WordNet 3.0"


def build_wordnet_tasks(
    dict_dir: os.PathLike | str,
    out_dir: os.PathLike | str,
    *,
    n_synsets: int = 3000,
    pos: Sequence[str] = ("noun",),
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    min_definition_words: int = 5,
    exclude_leaks: bool = True,
    extra_docs: int = 0,
    licence_file: Optional[os.PathLike | str] = None,
    source: str = "",
) -> dict[str, dict[str, object]]:
    """Write ``wordnet-def2word`` and ``wordnet-word2def`` under ``out_dir`` (BEIR layout).

    Returns each task's ``dataset_info`` (also written as ``dataset_info.json``).
    ``extra_docs`` adds that many more distractor synsets to the corpora (no queries).
    """
    dict_path = Path(dict_dir)
    synsets = load_synsets(dict_path, pos)
    chosen = select_synsets(
        synsets, n_synsets, seed, min_definition_words=min_definition_words, exclude_leaks=exclude_leaks
    )
    distractors: list[WordNetSynset] = []
    if extra_docs > 0:
        used_l = {s.lemma_text.lower() for s in chosen}
        used_d = {s.definition.lower() for s in chosen}
        more = select_synsets(
            [s for s in synsets if s.lemma_text.lower() not in used_l and s.definition.lower() not in used_d],
            extra_docs,
            seed + 1,
            min_definition_words=min_definition_words,
            exclude_leaks=exclude_leaks,
            exclude={s.synset_id for s in chosen},
        )
        distractors = more
    split_of = assign_splits((s.synset_id for s in chosen), seed, fractions)
    split_names = ("train", "dev", "test")
    licence = Path(licence_file) if licence_file else find_licence_file(dict_path)
    if licence is None:
        raise FileNotFoundError(
            f"no WordNet licence notice found near {dict_path}; pass licence_file (it must ship with the data)"
        )
    all_docs = sorted(chosen + distractors, key=lambda s: s.synset_id)
    infos: dict[str, dict[str, object]] = {}
    for task in (TASK_DEF2WORD, TASK_WORD2DEF):
        corpus: dict[str, Doc] = {}
        for s in all_docs:
            meta = {"pos": s.ss_type, "lexname": s.lexname}
            text = s.lemma_text if task == TASK_DEF2WORD else s.definition
            corpus[s.synset_id] = Doc(text=text, metadata=meta)
        queries: dict[str, QueryRecord] = {}
        qrels_by_split: dict[str, dict[str, dict[str, int]]] = {name: {} for name in split_names}
        for s in chosen:
            qid = f"q-{s.synset_id}"
            text = s.definition if task == TASK_DEF2WORD else s.lemma_text
            queries[qid] = QueryRecord(text=text, metadata={"split": split_of[s.synset_id]})
            qrels_by_split[split_of[s.synset_id]][qid] = {s.synset_id: 1}
        task_dir = Path(out_dir) / task
        write_beir(task_dir, corpus, queries, qrels_by_split)
        shutil.copyfile(licence, task_dir / LICENCE_NAME)
        info: dict[str, object] = {
            "name": task,
            "description": (
                "query: a WordNet definition (examples removed); doc: the synset's lemma names"
                if task == TASK_DEF2WORD
                else "query: a synset's lemma names; doc: its WordNet definition (examples removed)"
            ),
            "source": source or _read_version(dict_path),
            "licence": f"Princeton WordNet licence, see {LICENCE_NAME}",
            "pos": list(pos),
            "seed": seed,
            "fractions": list(fractions),
            "min_definition_words": min_definition_words,
            "exclude_leaks": exclude_leaks,
            "docs": len(corpus),
            "distractor_docs": len(distractors),
            "queries": {name: len(qrels_by_split[name]) for name in split_names},
            "relevant_per_query": 1,
            "id_scheme": "doc id = synset type letter + WordNet offset; query id = 'q-' + synset id",
        }
        (task_dir / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        infos[task] = info
    return infos


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory; one sub-directory per task")
    parser.add_argument("--cache", default=None, help=f"cache for the .deb and its files (default {default_cache_dir()})")
    parser.add_argument("--wordnet-dir", default=None, help="use this WordNet dict directory instead of apt")
    parser.add_argument("--licence-file", default=None, help="licence notice to ship (default: found near the data)")
    parser.add_argument("--n-synsets", type=int, default=3000, help="queries per task (default 3000)")
    parser.add_argument("--pos", nargs="+", default=["noun"], choices=sorted(POS_FILES), help="parts of speech")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", type=float, nargs=3, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "DEV", "TEST"))
    parser.add_argument("--min-definition-words", type=int, default=5)
    parser.add_argument("--keep-leaks", action="store_true", help="keep synsets whose definition contains a lemma word")
    parser.add_argument("--extra-docs", type=int, default=0, help="distractor synsets added to the corpus only")
    args = parser.parse_args(argv)
    if args.n_synsets < 1:
        parser.error("--n-synsets must be positive")
    try:
        if args.wordnet_dir:
            dict_dir = find_wordnet_dict(args.wordnet_dir)
            if dict_dir is None:
                parser.error(f"no data.noun under {args.wordnet_dir}")
        else:
            dict_dir = fetch_wordnet(args.cache)
        infos = build_wordnet_tasks(
            dict_dir,
            args.out,
            n_synsets=args.n_synsets,
            pos=args.pos,
            seed=args.seed,
            fractions=args.splits,
            min_definition_words=args.min_definition_words,
            exclude_leaks=not args.keep_leaks,
            extra_docs=args.extra_docs,
            licence_file=args.licence_file,
        )
    except (RuntimeError, FileNotFoundError, DataFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for task, info in infos.items():
        print(f"{task}: {info['docs']} docs, queries {info['queries']} -> {Path(args.out) / task}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
