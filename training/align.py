"""Stage 1, ICM self-alignment (Retrv-R1, arXiv 2510.02745): the LM is frozen, only the ICM trains.

BLIP-2-style: the frozen LM, reading compressed tokens, must state what it would state
from the full tokens.

* Content: ``Candidate: [t_con]\\nDescription:`` -> the content target.
* Relation: ``Query: <full query tokens>\\nCandidate: [t_con, t_rel]\\nRelation to the query:``
  (or ``[t_rel]`` alone, ``relation_input: rel``) -> the relation target.

Targets (see :class:`~training.config.AlignConfig`): the candidate's own text, or what the
frozen LM writes greedily when it reads the candidate's *full* tokens in the same frame
(``self``); for the relation, a template (our choice, since the paper gives none):
``"relevant. It is what the query asks for."`` or ``"not relevant. It is not what the query
asks for."`` followed by ``" Shared words: a, b."`` (``none`` when they share no word), so
``t_rel`` must carry both the verdict and query-specific overlap; or ``self``.
Loss: token-mean cross-entropy over the target tokens (and an end-of-text token).

``align: vision`` aligns a new vision tower instead (LLaVA's first stage): the frozen LM reads
``Candidate: <image tokens>\nDescription:`` and must write the image's caption; only the
tower trains. Pairs come from the examples: a query image with the positive's text, and a
positive image with the query's text.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

import torch

from retrv_r1_plugin.context import Chunk, Encoded, cat_chunks, pad_embeddings
from retrv_r1_plugin.tokens import tokenize_untrusted

from .config import AlignConfig
from .examples import TrainingExample, read_examples
from .params import configure_trainable
from .sequences import chunk_targets, forward_hidden, logits_at
from .trainer import DataOrder, Trainer, warn_ignored_images

__all__ = ["AlignTrainer", "relation_template", "train_align"]

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of in on to and or is are for with by at as it its this that which what from be".split())


def relation_template(query: str, candidate: str, relevant: bool, max_words: int = 5) -> str:
    """The template relation statement (``relation_target: template``)."""
    qw = set(_WORD.findall(query.lower())) - _STOP
    shared = [w for w in dict.fromkeys(_WORD.findall(candidate.lower())) if w in qw][:max_words]
    verdict = "relevant. It is what the query asks for." if relevant else "not relevant. It is not what the query asks for."
    return f"{verdict} Shared words: {', '.join(shared) if shared else 'none'}."


def _fingerprint(ex: TrainingExample) -> str:
    """The example id plus a digest of its content: data sets that are trained together may
    reuse ids (WordNet def2word / word2def), and a ``self`` target cached under the bare id
    would be another example's."""
    digest = hashlib.sha1(json.dumps(ex.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{ex.id}#{digest}"


class AlignTrainer(Trainer):
    """ICM self-alignment."""

    stage = "align"
    cfg: AlignConfig

    def setup(self) -> None:
        self.examples: list[TrainingExample] = read_examples(self.cfg.data)[: self.cfg.max_examples]
        self.vision = self.cfg.align == "vision"
        if self.vision:
            if not self.model.backbone.is_vision:
                raise ValueError(f"align: vision needs a vision backbone, {self.cfg.init_from!r} is {self.model.backbone.model_type!r}")
            pairs = sum(len(self._caption_pairs(ex)) for ex in self.examples)
            if not pairs:
                raise ValueError(f"align: vision found no (image, caption) pairs in {self.cfg.data}")
        else:
            warn_ignored_images(self.model, self.examples)
        configure_trainable(self.model, lm="frozen", train_icm=not self.vision, train_token_rows=False, train_vision=self.vision)
        self.order = DataOrder(len(self.examples), self.cfg.seed)
        self._self_targets: dict[tuple[str, str, int], list[int]] = {}
        """``self`` targets of the frozen LM, keyed by (example fingerprint, kind, candidate index)."""
        self.eos = self.model.special.eos[0] if self.model.special.eos else None

    def data_state(self) -> dict[str, Any]:
        return self.order.state(self.step, self.cfg.batch_size)

    # ------------------------------------------------------------------ frames
    def _text(self, s: str) -> Chunk:
        return self.model.builder.trusted(s)

    def _content_frame(self, body: Chunk) -> list[Chunk]:
        return [self._text("Candidate: "), body, self._text("\nDescription: ")]

    def _relation_frame(self, query: Encoded, body: Chunk) -> list[Chunk]:
        return [self._text("Query: "), query.chunk, self._text("\nCandidate: "), body, self._text("\nRelation to the query: ")]

    def _slot(self, vectors: list[torch.Tensor], ids: list[int]) -> Chunk:
        embeds = torch.stack(vectors).to(self.model.backbone.dtype)
        return Chunk(ids=torch.tensor(ids, dtype=torch.long), embeds=embeds, role="prompt")

    def _tokens(self, text: str) -> list[int]:
        ids = tokenize_untrusted(self.model.tokenizer, text, self.model.special.forbidden_in_untrusted)[: self.cfg.max_target_tokens]
        return ids + ([self.eos] if self.eos is not None else [])

    @torch.inference_mode()
    def _greedy(self, chunks: list[Chunk]) -> list[int]:
        """What the frozen LM writes (greedy) after ``chunks``; ends with end-of-text."""
        bb = self.model.backbone
        full = cat_chunks([Chunk(ids=c.ids, embeds=c.embeds.detach(), grids=c.grids, deepstack=c.deepstack) for c in chunks])
        cache = bb.new_cache()
        pos, nxt = bb.positions(full.ids, full.grids, 0)
        deep = mask = None
        if full.deepstack is not None:
            deep, mask = full.deepstack, (full.ids == bb.image_token_id).unsqueeze(0)
        logits, _ = bb.forward(full.embeds.unsqueeze(0), pos, cache, deepstack=deep, visual_mask=mask)
        out: list[int] = []
        for _ in range(self.cfg.max_target_tokens):
            tok = int(torch.argmax(logits[0, -1]))
            out.append(tok)
            if tok in self.model.special.eos:
                return out
            pos, nxt = bb.positions(torch.tensor([tok]), [], nxt)
            logits, _ = bb.forward(bb.embed_ids(torch.tensor([tok])).unsqueeze(0), pos, cache)
        return out + ([self.eos] if self.eos is not None else [])

    # ------------------------------------------------------------------ items
    @staticmethod
    def _caption_pairs(ex: TrainingExample) -> list[tuple[str, str]]:
        """(image, caption) pairs of one example: the image on one side, the text on the other."""
        positive = ex.candidates[ex.positive]
        pairs = []
        if ex.query_image and positive.text.strip():
            pairs.append((ex.query_image, positive.text))
        if positive.image and ex.query_text.strip():
            pairs.append((positive.image, ex.query_text))
        return pairs

    def _vision_items(self, ex: TrainingExample) -> list[tuple[str, list[Chunk]]]:
        """Caption items, the vision tower run under grad."""
        builder = self.model.builder
        items = []
        for image, caption in self._caption_pairs(ex):
            body = builder.encode("", image, max_text_tokens=0).chunk  # the image alone, in full tokens
            items.append(("content", self._content_frame(body) + [builder.text_chunk(self._tokens(caption), role="generated")]))
        return items

    def _pick(self, ex: TrainingExample, rng: random.Random) -> tuple[list[int], list[int]]:
        """The candidates of ``ex`` that get a content and a relation item (all of ``rng``'s draws for it)."""
        cfg = self.cfg
        others = [i for i in range(ex.k) if i != ex.positive]
        content_idx = [ex.positive] + rng.sample(others, min(len(others), max(0, cfg.content_per_example - 1)))
        relation_idx = [ex.positive] + rng.sample(others, min(len(others), max(0, cfg.relation_per_example - 1)))
        return content_idx[: cfg.content_per_example], relation_idx[: cfg.relation_per_example]

    def _items(self, ex: TrainingExample, rng: random.Random) -> list[tuple[str, list[Chunk]]]:
        """The (kind, chunks) sequences of one example, with the ICM run under grad."""
        model, cfg = self.model, self.cfg
        cands = ex.candidate_objects()
        with torch.no_grad():
            encoded = model.builder.encode_candidates(cands, model.config.max_candidate_tokens)
            query = model.builder.encode_query(ex.query(), model.config.max_query_tokens)
        content_idx, relation_idx = self._pick(ex, rng)
        fp = _fingerprint(ex) if "self" in (cfg.content_target, cfg.relation_target) else ex.id
        chosen = sorted(set(content_idx) | set(relation_idx))
        embeds, mask = pad_embeddings([encoded[i].embeds for i in chosen])
        row = {c: j for j, c in enumerate(chosen)}
        t_con = model.icm.content(embeds, mask)
        t_rel = model.icm.relation(embeds, query.embeds.unsqueeze(0), mask, None) if relation_idx else None
        sp = model.special
        items: list[tuple[str, list[Chunk]]] = []
        for i in content_idx:
            if cfg.content_target == "text":
                target = self._tokens(ex.candidates[i].text) if ex.candidates[i].text.strip() else None
            else:
                key = (fp, "content", i)
                if key not in self._self_targets:
                    self._self_targets[key] = self._greedy(self._content_frame(encoded[i].chunk))
                target = self._self_targets[key]
            if not target:
                continue
            frame = self._content_frame(self._slot([t_con[row[i]]], [sp.content_slot]))
            items.append(("content", frame + [model.builder.text_chunk(target, role="generated")]))
        for i in relation_idx:
            if cfg.relation_target == "template":
                target = self._tokens(relation_template(ex.query_text, ex.candidates[i].text, i == ex.positive))
            else:
                key = (fp, "relation", i)
                if key not in self._self_targets:
                    self._self_targets[key] = self._greedy(self._relation_frame(query, encoded[i].chunk))
                target = self._self_targets[key]
            if cfg.relation_input == "con_rel":
                body = self._slot([t_con[row[i]], t_rel[row[i]]], [sp.content_slot, sp.relation_slot])
            else:
                body = self._slot([t_rel[row[i]]], [sp.relation_slot])
            items.append(("relation", self._relation_frame(query, body) + [model.builder.text_chunk(target, role="generated")]))
        return items

    # ------------------------------------------------------------------ step
    def train_step(self, step: int) -> dict[str, float]:
        batch = [self.examples[i] for i in self.order.indices(step, self.cfg.batch_size)]
        rng = random.Random(self.cfg.seed * 7919 + step)
        sums = {"content": 0.0, "relation": 0.0}
        counts = {"content": 0, "relation": 0}
        mine = set(self.local_positions(len(batch)))
        plan: dict[int, list] = {}
        with torch.enable_grad():
            for j, ex in enumerate(batch):
                if j in mine:
                    items = self._vision_items(ex) if self.vision else self._items(ex, rng)
                    plan[j] = [(kind, *chunk_targets(chunks)) for kind, chunks in items]
                else:
                    self._pick(ex, rng)  # another process runs it: make the same draws a single process would
            # target tokens of the global batch (data parallel: summed over the processes' shares)
            total = sum(self.gather({j: sum(int(ids.numel()) for _, _, _, ids in seqs) for j, seqs in plan.items()}, len(batch)))
            local: dict[int, list[tuple[str, float, int]]] = {}
            for j, seqs in plan.items():
                loss_ex = None
                local[j] = []
                for kind, full, positions, ids in seqs:
                    with self.autocast():
                        hidden = forward_hidden(self.model, full)
                        logits = logits_at(self.model, hidden, positions)
                    nll = torch.nn.functional.cross_entropy(logits, ids.to(logits.device), reduction="sum")
                    local[j].append((kind, float(nll.detach()), int(ids.numel())))
                    loss_ex = nll if loss_ex is None else loss_ex + nll
                if loss_ex is not None:
                    # one backward per example: the ICM graph of its candidates is shared by its items
                    self.backward(loss_ex / max(1, total))
        norm = self.update()
        for rows in self.gather(local, len(batch)):  # in batch order
            for kind, nll_i, count_i in rows:
                sums[kind] += nll_i
                counts[kind] += count_i
        n = max(1, counts["content"] + counts["relation"])
        return {
            "loss": (sums["content"] + sums["relation"]) / n,
            "content_loss": sums["content"] / max(1, counts["content"]),
            "relation_loss": sums["relation"] / max(1, counts["relation"]),
            "target_tokens": float(n),
            "grad_norm": norm,
        }


def train_align(cfg: AlignConfig, *, resume: bool = False, model=None, stop_after: int | None = None):
    """Run stage 1; returns the final model directory (``None`` when stopped early)."""
    return AlignTrainer(cfg, model=model).train(resume=resume, stop_after=stop_after)
