"""Copy a trained checkpoint into the package as a bundled default (``retrv_r1_plugin/checkpoints/NAME``).

It is re-saved through ``save_pretrained`` (only what the backbone package does not provide),
optionally without an ICM that never trained (``--drop-icm``: full-token models) and with
``max_candidates`` lowered to the K it was trained at, so larger lists are refused with a
clear error instead of using untrained label rows. The size is printed; the model card is
written by hand (MODEL_CARD.md in the destination is kept).

    python scripts/bundle_checkpoint.py runs/digits/graft_sft/final retrv-r1-qwen2.5-vl-digits --drop-icm --max-candidates 10
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrv_r1_plugin import RetrvR1Model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a trained checkpoint folder (e.g. a stage's final/)")
    p.add_argument("name", help="bundled name, e.g. retrv-r1-qwen2.5-vl-digits")
    p.add_argument("--drop-icm", action="store_true", help="ship no ICM (the model reads candidates in full tokens)")
    p.add_argument("--max-candidates", type=int, help="lower max_candidates to the K the model was trained at")
    args = p.parse_args()
    model = RetrvR1Model.from_pretrained(args.source)
    if args.drop_icm:
        model.drop_icm()
    if args.max_candidates is not None:
        if not 1 <= args.max_candidates <= model.config.max_candidates:
            raise SystemExit(f"--max-candidates must be between 1 and {model.config.max_candidates}")
        model.config.max_candidates = args.max_candidates
    dest = ROOT / "retrv_r1_plugin" / "checkpoints" / args.name
    card = (dest / "MODEL_CARD.md").read_text() if (dest / "MODEL_CARD.md").is_file() else None
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        model.save_pretrained(tmp)
        if card is not None:
            (Path(tmp) / "MODEL_CARD.md").write_text(card)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(tmp, dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {size / 2**20:.1f} MB")
    for f in sorted(dest.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(dest)}  {f.stat().st_size / 2**20:.2f} MB")


if __name__ == "__main__":
    main()
