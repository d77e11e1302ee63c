"""Build small image retrieval sets from data that ships in scikit-learn and scikit-image.

Written as M-BEIR-format files under one root (image paths relative to it)::

    images/digits/0000.png ...                     load_digits, upscaled, grey -> RGB
    images/skimage/astronaut.jpg ...               skimage.data photos, longest side <= 256
    query/{split}/mbeir_{task}_{split}.jsonl
    cand_pool/local/mbeir_{task}[_{split}]_cand_pool.jsonl
    dataset_info.json                              counts, sources, licences

Query lines carry UniIR's ``task_id`` (0 for text -> image, 3 for image -> text). Ids are
readable names (``digits-img-0001``), not M-BEIR's numeric ``"{dataset_id}:{n}"``: this
package's readers take any id, UniIR's own scripts (which hash ids as two integers) do not.

Tasks (splits ``train``/``dev``/``test``; load one with
``training.data.formats.load_mbeir_task(root, task, split)``):

* ``digits-text2image``: query = a caption ("a handwritten digit seven"; 3 phrasings per
  digit), candidates = the split's digit images; every image of that digit is relevant
  (grade 1). Images are split per class (default 70/10/20, seeded), so each split has its
  own candidate pool and 30 queries.
* ``digits-image2text``: query = a digit image of the split, candidates = the 10 captions
  "a handwritten digit {word}" (one shared pool); the caption of its class is relevant.
* ``skimage-text2image``: query = one of three hand-written captions of a photo,
  candidates = all photos (shared pool); each photo's three captions go one to each split.
* ``skimage-image2text``: query = a photo, candidates = the captions of the split (one per
  photo); its own caption is relevant. The photo set is tiny (22): a demo/smoke set.

Usage::

    python -m training.data.build_images --out data/images [--digits-size 56]
        [--digits-per-class N] [--photo-max-side 256] [--seed 0] [--only digits|skimage]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # allow "python training/data/build_images.py"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from retrv_r1_plugin._optional import require
from training.data.formats import (
    Doc,
    QueryRecord,
    mbeir_pool_path,
    mbeir_query_path,
    write_mbeir_cand_pool,
    write_mbeir_queries,
)

__all__ = [
    "SPLITS",
    "DIGIT_WORDS",
    "DIGIT_TEMPLATES",
    "SKIMAGE_CAPTIONS",
    "digit_caption",
    "digit_to_image",
    "stratified_splits",
    "build_digits_tasks",
    "build_skimage_tasks",
    "main",
]

SPLITS: tuple[str, ...] = ("train", "dev", "test")
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Query phrasings for digits-text2image; the first is also the digits-image2text caption.
DIGIT_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a small scanned image of a handwritten {word}",
)

DIGITS_SOURCE = (
    "UCI Optical Recognition of Handwritten Digits (Alpaydin & Kaynak, 1998) via "
    "sklearn.datasets.load_digits; licence CC BY 4.0"
)

#: skimage.data function -> (licence note from its docstring, three hand-written captions).
SKIMAGE_CAPTIONS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "astronaut": ("NASA, public domain", (
        "a smiling female astronaut in an orange spacesuit next to a space shuttle model and a US flag",
        "official NASA portrait of an astronaut holding a helmet",
        "a woman in an orange flight suit with mission patches in front of the American flag",
    )),
    "brick": ("CC0 (CC0Textures)", (
        "a wall of grey bricks laid in a running bond pattern",
        "close-up texture of brickwork seen at an angle",
        "rows of long rectangular bricks separated by mortar lines, in black and white",
    )),
    "camera": ("CC0 (Lav Varshney)", (
        "a black-and-white photo of a man filming with a camera on a tripod in a park",
        "a cameraman in a dark coat looking through a video camera on a lawn",
        "a photographer standing on the grass with a tripod, buildings in the distance",
    )),
    "chelsea": ("CC0 (Stefan van der Walt)", (
        "close-up of a tabby cat's face with green-yellow eyes",
        "a striped brown cat looking to the side",
        "portrait of a domestic cat with long white whiskers",
    )),
    "clock": ("public domain (Stefan van der Walt)", (
        "a motion-blurred photo of a wall clock",
        "a round clock on a plain wall, smeared sideways because the camera moved",
        "a blurry grey picture of a circular clock face",
    )),
    "coffee": ("CC0 (Rachel Michetti)", (
        "a cup of espresso on a red saucer with a spoon, on a wooden table",
        "a red coffee cup seen from above with crema on top",
        "espresso served in a porcelain cup on a wooden bar",
    )),
    "coins": ("Brooklyn Museum, no known copyright restrictions", (
        "ancient Greek coins arranged in rows on a grey background",
        "a collection of old round coins from Pompeii",
        "twenty-four worn metal coins laid out in a grid",
    )),
    "colorwheel": ("ships with scikit-image (BSD-3-Clause)", (
        "a colour wheel showing the full spectrum of hues fading to white at the centre",
        "a circular rainbow gradient on a black background",
        "a disc of colours: red, yellow, green, cyan, blue and magenta blending together",
    )),
    "grass": ("CC0 (DeviantArt, linolafett)", (
        "a close-up of blades of grass, in greyscale",
        "texture of a lawn seen from above",
        "dense grass and dry leaves covering the ground",
    )),
    "gravel": ("CC0 (CC0Textures)", (
        "a close-up of small gravel stones",
        "texture of crushed rock pebbles, in greyscale",
        "ground covered with many small angular stones",
    )),
    "horse": ("CC0 (openclipart, Andreas Preuss)", (
        "a black silhouette of a horse on a white background",
        "clip art of a standing horse in profile",
        "the dark outline of a horse facing right",
    )),
    "hubble_deep_field": ("NASA, public domain", (
        "thousands of distant galaxies in a deep space telescope image",
        "the Hubble extreme deep field: colourful specks of light on a black sky",
        "a view of the early universe full of small galaxies",
    )),
    "immunohistochemistry": ("CMMI, no known copyright restrictions", (
        "a microscope image of stained tissue with brown and blue cells",
        "colon glands stained brown by immunohistochemistry with a blue counterstain",
        "a histology slide showing glandular tissue under the microscope",
    )),
    "logo": ("scikit-image logo, ships with scikit-image (BSD-3-Clause)", (
        "the scikit-image logo: a snake drawn inside a green and orange circle",
        "a round logo split by a white S-shaped curve into green and orange halves",
        "a drawing of a snake's head in a circular green and orange emblem",
    )),
    "moon": ("ships with scikit-image (BSD-3-Clause)", (
        "a grey photograph of the surface of the moon with craters",
        "low-contrast image of lunar terrain",
        "a rocky, cratered landscape seen from above, in black and white",
    )),
    "page": ("ships with scikit-image (BSD-3-Clause)", (
        "a scanned page of printed text about region-based segmentation",
        "a photo of a book page with a heading and a line of code, unevenly lit",
        "a paragraph of text from a tutorial, with a shadow across the page",
    )),
    "retina": ("CC0 (Mikael Haggstrom, Wikimedia Commons)", (
        "a fundus photograph of a human retina with blood vessels",
        "the back of an eye: an orange disc with branching red vessels",
        "medical image of a normal left eye showing the optic disc",
    )),
    "rocket": ("SpaceX, public domain", (
        "a rocket standing on the launch pad at night, lit by floodlights",
        "a SpaceX Falcon 9 rocket before launch, between lightning towers",
        "a tall white rocket on a pad at dusk under a deep blue sky",
    )),
    "text": ("Wikipedia, public domain", (
        "handwritten numbers and symbols drawn in chalk on a grey surface",
        "scribbled digits and brackets written at an angle on a flat surface",
        "a greyscale photo of hand-drawn characters on the ground",
    )),
    "microaneurysms": ("CC0 (Andreas Maier, HRF database)", (
        "a small grey crop of a retina showing blood vessels and lesions",
        "a detail of a fundus image, green channel, with tiny microaneurysms",
        "a close-up of retinal tissue with thin dark vessels",
    )),
    "cell": ("CC0 (Paul Mueller et al.)", (
        "a single round cell floating in saline, seen in a phase image",
        "a bright circular cell on a grey background with faint banding",
        "microscope image of one spherical cell",
    )),
    "stereo_motorcycle": ("Middlebury 2014 stereo benchmark (left view)", (
        "a red motorcycle parked in a garage",
        "a classic motorbike on its side stand next to shelves of boxes",
        "a red and chrome motorcycle in a cluttered workshop",
    )),
}


def digit_caption(digit: int, template: int = 0) -> str:
    """Caption of ``digit`` in phrasing ``template`` (index into :data:`DIGIT_TEMPLATES`)."""
    return DIGIT_TEMPLATES[template].format(word=DIGIT_WORDS[digit], digit=digit)


def digit_to_image(pixels: np.ndarray, size: int = 56) -> Image.Image:
    """An 8x8 ``load_digits`` array (values 0..16) as dark ink on white, ``size``x``size`` RGB."""
    arr = np.asarray(pixels, dtype=np.float64).reshape(8, 8)
    grey = np.clip(255.0 * (1.0 - arr / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).resize((size, size), Image.BILINEAR).convert("RGB")


def stratified_splits(
    labels: Sequence[int], seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2)
) -> dict[int, str]:
    """Index -> split, cutting each class's (sorted, then seeded-shuffled) indices by ``fractions``."""
    if len(fractions) != len(SPLITS) or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions {fractions} must be 3 non-negative numbers summing to 1")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    out: dict[int, str] = {}
    for y in sorted(by_class):
        idx = sorted(by_class[y])
        random.Random(seed * 1000 + y).shuffle(idx)
        a = round(fractions[0] * len(idx))
        b = a + round(fractions[1] * len(idx))
        for pos, i in enumerate(idx):
            out[i] = SPLITS[0] if pos < a else SPLITS[1] if pos < b else SPLITS[2]
    return out


def _update_info(root: Path, tasks: Mapping[str, Any]) -> None:
    path = root / "dataset_info.json"
    info: dict[str, Any] = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            info = {}
    info.setdefault("format", "M-BEIR (query/{split}/mbeir_{task}_{split}.jsonl, cand_pool/local/...)")
    info.setdefault("tasks", {}).update(tasks)
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def build_digits_tasks(
    out_root: str | Path,
    *,
    size: int = 56,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    per_class: Optional[int] = None,
) -> dict[str, dict[str, Any]]:
    """Write ``digits-text2image`` and ``digits-image2text``; return their info (counts)."""
    load_digits = require("sklearn.datasets", "train").load_digits

    root = Path(out_root).resolve()  # image paths are written relative to it: a relative root would double up
    digits = load_digits()
    labels = [int(y) for y in digits.target]
    keep = list(range(len(labels)))
    if per_class is not None:
        counts: dict[int, int] = {}
        keep = []
        for i, y in enumerate(labels):
            if counts.get(y, 0) < per_class:
                counts[y] = counts.get(y, 0) + 1
                keep.append(i)
    split_of = stratified_splits([labels[i] for i in keep], seed, fractions)
    img_dir = root / "images" / "digits"
    img_dir.mkdir(parents=True, exist_ok=True)

    images: dict[str, dict[str, Doc]] = {s: {} for s in SPLITS}
    label_of: dict[str, int] = {}
    for pos, i in enumerate(keep):
        path = img_dir / f"{i:04d}.png"
        digit_to_image(digits.images[i], size).save(path, optimize=True)
        did = f"digits-img-{i:04d}"
        label_of[did] = labels[i]
        images[split_of[pos]][did] = Doc(image_path=str(path), metadata={"label": labels[i]})

    captions = {f"digits-cap-{d}": Doc(text=digit_caption(d), metadata={"label": d}) for d in range(10)}
    write_mbeir_cand_pool(mbeir_pool_path(root, "digits-image2text"), captions, root)

    t2i_counts: dict[str, dict[str, int]] = {}
    i2t_counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        pool = images[split]
        write_mbeir_cand_pool(mbeir_pool_path(root, "digits-text2image", split), pool, root)
        queries: dict[str, QueryRecord] = {}
        qrels: dict[str, dict[str, int]] = {}
        for d in range(10):
            positives = {did: 1 for did in pool if label_of[did] == d}
            if not positives:
                continue
            for t in range(len(DIGIT_TEMPLATES)):
                qid = f"digits-t2i-{split}-{d}-{t}"
                queries[qid] = QueryRecord(text=digit_caption(d, t), metadata={"label": d})
                qrels[qid] = positives
        write_mbeir_queries(mbeir_query_path(root, "digits-text2image", split), queries, qrels, root, pool)
        t2i_counts[split] = {"queries": len(queries), "candidates": len(pool)}

        i2t_queries = {
            did.replace("digits-img-", "digits-i2t-"): QueryRecord(image_path=doc.image_path, metadata={"label": label_of[did]})
            for did, doc in pool.items()
        }
        i2t_qrels = {qid: {f"digits-cap-{q.metadata['label']}": 1} for qid, q in i2t_queries.items()}
        write_mbeir_queries(mbeir_query_path(root, "digits-image2text", split), i2t_queries, i2t_qrels, root, captions)
        i2t_counts[split] = {"queries": len(i2t_queries), "candidates": len(captions)}

    common = {"source": DIGITS_SOURCE, "image_size": size, "seed": seed, "fractions": list(fractions)}
    infos = {
        "digits-text2image": {
            **common,
            "modality": "text -> image",
            "relevance": "every image of the caption's digit in the split's pool (grade 1)",
            "splits": t2i_counts,
        },
        "digits-image2text": {
            **common,
            "modality": "image -> text",
            "relevance": "the caption of the image's digit (one of 10 shared candidates)",
            "splits": i2t_counts,
        },
    }
    _update_info(root, infos)
    return infos


def _skimage_array(name: str) -> np.ndarray:
    skimage_data = require("skimage.data", "train")

    arr = getattr(skimage_data, name)()
    if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
        arr = arr[0]
    return np.asarray(arr)


def _to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
    image = Image.fromarray(arr)
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, "white")
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[3])
        return background
    return image.convert("RGB")


def build_skimage_tasks(
    out_root: str | Path,
    *,
    max_side: int = 256,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
) -> dict[str, dict[str, Any]]:
    """Write ``skimage-text2image`` and ``skimage-image2text``; return their info (counts).

    Each photo's three captions are dealt one per split (order shuffled by ``seed``).
    """
    root = Path(out_root).resolve()
    chosen = list(names) if names is not None else list(SKIMAGE_CAPTIONS)
    unknown = [n for n in chosen if n not in SKIMAGE_CAPTIONS]
    if unknown:
        raise ValueError(f"no captions for skimage images {unknown}; known: {sorted(SKIMAGE_CAPTIONS)}")
    img_dir = root / "images" / "skimage"
    img_dir.mkdir(parents=True, exist_ok=True)

    photos: dict[str, Doc] = {}
    caption_split: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for name in chosen:
        licence, captions = SKIMAGE_CAPTIONS[name]
        image = _to_rgb(_skimage_array(name))
        image.thumbnail((max_side, max_side), Image.LANCZOS)
        path = img_dir / f"{name}.jpg"
        image.save(path, quality=88, optimize=True)
        photos[f"skimage-img-{name}"] = Doc(
            image_path=str(path), metadata={"name": name, "source": f"skimage.data.{name}", "licence": licence}
        )
        order = list(range(len(captions)))
        random.Random(f"{seed}-{name}").shuffle(order)
        for split, k in zip(SPLITS, order):
            caption_split[split].append((name, k))

    write_mbeir_cand_pool(mbeir_pool_path(root, "skimage-text2image"), photos, root)
    t2i_counts: dict[str, dict[str, int]] = {}
    i2t_counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        queries: dict[str, QueryRecord] = {}
        qrels: dict[str, dict[str, int]] = {}
        cap_pool: dict[str, Doc] = {}
        i2t_queries: dict[str, QueryRecord] = {}
        i2t_qrels: dict[str, dict[str, int]] = {}
        for name, k in caption_split[split]:
            text = SKIMAGE_CAPTIONS[name][1][k]
            qid = f"skimage-t2i-{name}-{k}"
            queries[qid] = QueryRecord(text=text, metadata={"name": name})
            qrels[qid] = {f"skimage-img-{name}": 1}
            cap_id = f"skimage-cap-{name}-{k}"
            cap_pool[cap_id] = Doc(text=text, metadata={"name": name})
            iq = f"skimage-i2t-{split}-{name}"
            i2t_queries[iq] = QueryRecord(image_path=photos[f"skimage-img-{name}"].image_path, metadata={"name": name})
            i2t_qrels[iq] = {cap_id: 1}
        write_mbeir_queries(mbeir_query_path(root, "skimage-text2image", split), queries, qrels, root, photos)
        write_mbeir_cand_pool(mbeir_pool_path(root, "skimage-image2text", split), cap_pool, root)
        write_mbeir_queries(mbeir_query_path(root, "skimage-image2text", split), i2t_queries, i2t_qrels, root, cap_pool)
        t2i_counts[split] = {"queries": len(queries), "candidates": len(photos)}
        i2t_counts[split] = {"queries": len(i2t_queries), "candidates": len(cap_pool)}

    common = {
        "source": "scikit-image skimage.data; per-image licence in each candidate's 'licence' field",
        "max_side": max_side,
        "seed": seed,
        "note": "22 photos with 3 hand-written captions each; a demo/smoke set, images shared by all splits",
    }
    infos = {
        "skimage-text2image": {**common, "modality": "text -> image", "splits": t2i_counts},
        "skimage-image2text": {**common, "modality": "image -> text", "splits": i2t_counts},
    }
    _update_info(root, infos)
    return infos


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output root (M-BEIR layout)")
    parser.add_argument("--only", choices=["digits", "skimage"], default=None, help="build only one family")
    parser.add_argument("--digits-size", type=int, default=56, help="digit image side in pixels (default 56)")
    parser.add_argument("--digits-per-class", type=int, default=None, help="cap images per digit (default all)")
    parser.add_argument("--photo-max-side", type=int, default=256, help="longest photo side (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", type=float, nargs=3, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "DEV", "TEST"))
    args = parser.parse_args(argv)
    if args.digits_size < 8:
        parser.error("--digits-size must be at least 8")
    infos: dict[str, dict[str, Any]] = {}
    if args.only in (None, "digits"):
        infos.update(
            build_digits_tasks(
                args.out, size=args.digits_size, seed=args.seed, fractions=args.splits, per_class=args.digits_per_class
            )
        )
    if args.only in (None, "skimage"):
        infos.update(build_skimage_tasks(args.out, max_side=args.photo_max_side, seed=args.seed))
    for task, info in infos.items():
        counts = ", ".join(f"{s}: {c['queries']} q / {c['candidates']} cand" for s, c in info["splits"].items())
        print(f"{task}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
