"""The three training stages on tiny models: targets and masks, log-prob equality, learning,
LoRA round trips, exact resume, multimodal inputs, and the command line."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training/ package is not installed with the plugin
    sys.path.insert(0, str(ROOT))

from retrv_r1_plugin.model import RetrvR1Model  # noqa: E402
from retrv_r1_plugin.tokens import tokenize_trusted, tokenize_untrusted  # noqa: E402
from training.align import AlignTrainer  # noqa: E402
from training.cli import main_train  # noqa: E402
from training.config import AlignConfig, LoraSettings, RLConfig, RunConfig, SFTConfig  # noqa: E402
from training.cot import ProgrammaticTeacher, synthesize_cot  # noqa: E402
from training.examples import CandidateRecord, TrainingExample, write_examples  # noqa: E402
from training.grpo import GRPOTrainer, sample_rollouts  # noqa: E402
from training.params import configure_trainable  # noqa: E402
from training.sequences import build_sequence, prepare_example, target_logprobs  # noqa: E402
from training.sft import SFTTrainer  # noqa: E402
from training.trainer import load_model  # noqa: E402

# single-token words of the tiny tokenizer (with a leading space)
WORDS = ["cat", "dog", "apple", "rocket", "sky", "table", "sofa", "light", "sugar", "photo", "blue", "red", "white", "cup", "fox", "step"]
OVERRIDES = {"max_candidates": 8, "system_prompt": "Rerank."}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two contended ones."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_examples(n: int, k: int = 4, seed: int = 0, fixed_positive: int | None = None) -> list[TrainingExample]:
    """Query "a X" among candidates "a W"; the positive holds X (at ``fixed_positive`` if given)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, k)
        pos = rng.randrange(k) if fixed_positive is None else fixed_positive
        cands = [CandidateRecord(id=f"d{i}_{j}", text=f"a {w}", score=1.0 - 0.1 * j) for j, w in enumerate(words)]
        out.append(TrainingExample(id=f"q{i}", query_text=f"a {words[pos]}", candidates=cands, positive=pos))
    return out


def tiny(init: str = "tiny:text", **overrides) -> RetrvR1Model:
    return load_model(RunConfig(init_from=init, model_overrides={**OVERRIDES, **overrides}))


def ids_of(model, *parts) -> list[int]:
    """Token ids of structural token names (``"<...>"``) and plain text pieces."""
    vocab = model.tokenizer.get_vocab()
    out: list[int] = []
    for p in parts:
        out.extend([vocab[p]] if p in vocab and p.startswith("<") else tokenize_untrusted(model.tokenizer, p, model.special.forbidden_in_untrusted))
    return out


INSPECT_2 = ["<inspection-index-start>", "<cand_2>", "<inspection-index-end>"]


# =========================================================================== targets and masks


def test_only_model_written_tokens_are_targets_and_masked_positions_get_zero_gradient():
    model = tiny()
    ex = make_examples(1)[0]
    written = ids_of(model, "look", *INSPECT_2, " fine", "</think>", "<answer>")
    with torch.enable_grad():
        prompt, encoded = prepare_example(model, ex, reasoning_budget=32)
        seq = build_sequence(model, prompt, encoded, written, 1, reasoning_budget=32, max_inspections=2)
        assert [c.role for c in seq.chunks].count("spliced") == 1 and seq.machine.inspected == [1]
        assert seq.target_ids.tolist() == written + [model.special.labels[1]]
        # each target is predicted from the position right before it; the answer at the last position
        assert torch.equal(seq.full.ids[seq.target_positions[:-1] + 1], seq.target_ids[:-1])
        assert int(seq.target_positions[-1]) == len(seq) - 1
        start = 0
        spliced_positions = set()
        for c in seq.chunks:
            if c.role in ("spliced", "prompt", "forced"):
                spliced_positions.update(range(start, start + len(c)))
            start += len(c)
        assert not spliced_positions & set((seq.target_positions[:-1] + 1).tolist())
        configure_trainable(model, lm="lora", train_icm=True, train_token_rows=True, lora=LoraSettings(r=4, alpha=8))
        logp, hidden = target_logprobs(model, seq, return_hidden=True)
        hidden.retain_grad()
        (-logp.sum()).backward()
    grad = hidden.grad[0].abs().sum(-1)
    predicting = set(seq.target_positions.tolist())
    others = [i for i in range(len(seq)) if i not in predicting]
    assert torch.count_nonzero(grad[others]) == 0  # prompt, spliced and forced tokens are never predicted
    assert torch.all(grad[sorted(predicting)] > 0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.icm.parameters())  # grads reach the ICM
    # spliced tokens are still context: inspecting another candidate changes what follows
    other = ids_of(model, "look", "<inspection-index-start>", "<cand_3>", "<inspection-index-end>", " fine", "</think>", "<answer>")
    with torch.no_grad():
        seq2 = build_sequence(model, prompt.__class__(prompt.ids, prompt.embeds.detach()), encoded, other, 1, reasoning_budget=32, max_inspections=2)
        after = target_logprobs(model, seq2)[-3:]
    assert not torch.allclose(after, logp.detach()[-3:])


@pytest.mark.parametrize("temperature,answer_space", [(1.0, "labels"), (0.7, "labels"), (0.7, "vocab")])
def test_recomputed_logprobs_equal_sampling_logprobs(temperature, answer_space):
    model = tiny()
    ex = make_examples(1, seed=3)[0]
    rollouts = sample_rollouts(model, ex, [11, 12, 13], reasoning_budget=10, max_inspections=2, temperature=temperature, answer_space=answer_space)
    scripted = ids_of(model, "x", *INSPECT_2, "y", "<inspection-index-start>", "<cand_4>", "<inspection-index-end>", "</think>", "<answer>")
    if temperature == 1.0:  # scripted tokens carry unscaled log-probs, so only at T = 1
        rollouts += sample_rollouts(model, ex, [14], reasoning_budget=20, max_inspections=2, script=scripted, answer_space=answer_space)
        assert rollouts[-1].inspected == [1, 3] and rollouts[-1].stop_reason == "answer"
    assert len({tuple(r.written) for r in rollouts}) > 1
    for r in rollouts:
        with torch.enable_grad():
            prompt, encoded = prepare_example(model, ex, reasoning_budget=20 if r.inspected else 10)
            seq = build_sequence(model, prompt, encoded, r.written, None, reasoning_budget=20 if r.inspected else 10, max_inspections=2, answer_token=r.answer_token)
            logp = target_logprobs(model, seq, temperature=temperature, answer_space=answer_space)
        assert logp.requires_grad and len(logp) == len(r.sampled_logprobs) == len(r.written) + 1
        torch.testing.assert_close(logp.detach(), torch.tensor(r.sampled_logprobs), atol=1e-4, rtol=0)


def test_rollouts_and_their_training_sequences_refuse_a_splice_past_the_context_limit():
    """rank() refuses an inspection whose splice would overflow the context; rollouts must do the
    same, and rebuilding a rollout (or a teacher trace) for training must give the same chunks."""
    model = tiny()
    ex = make_examples(1, seed=3)[0]
    long_text = " ".join(["grain"] * 150)
    ex = dataclasses.replace(ex, candidates=[dataclasses.replace(ex.candidates[0], text=long_text)] + ex.candidates[1:])
    budget = 12
    prompt, encoded = prepare_example(model, ex, reasoning_budget=budget)
    model.config.max_context_tokens = len(prompt) + budget + 2 + 20  # room for a short splice, not the long one
    model.config.max_candidate_tokens = 400
    try:
        script = ids_of(model, "x", "<inspection-index-start>", "<cand_1>", "<inspection-index-end>", "y", "</think>", "<answer>")
        [r] = sample_rollouts(model, ex, [5], reasoning_budget=budget, max_inspections=2, script=script)
        assert r.inspected == [] and r.stop_reason == "context_limit"
        prompt, encoded = prepare_example(model, ex, reasoning_budget=budget)
        with torch.enable_grad():
            seq = build_sequence(model, prompt, encoded, r.written, None, reasoning_budget=budget, max_inspections=2,
                                 answer_token=r.answer_token)
            logp = target_logprobs(model, seq, answer_space="labels")  # as sample_rollouts' default
        assert "spliced" not in [c.role for c in seq.chunks] and seq.machine.stop_reason == "context_limit"
        torch.testing.assert_close(logp.detach(), torch.tensor(r.sampled_logprobs), atol=1e-4, rtol=0)
        # the same written tokens as a teacher trace: the splice is refused there too
        seq = build_sequence(model, prompt, encoded, script, 0, reasoning_budget=budget, max_inspections=2)
        assert "spliced" not in [c.role for c in seq.chunks] and len(seq) <= model.config.max_context_tokens
    finally:
        model.config.max_context_tokens = None


# =========================================================================== stage 1


def _pretrain_describer(model, steps: int = 150) -> None:
    """Stand-in for a pretrained LM: teach the tiny LM (full fine-tuning, before it is frozen)
    to describe the token in the align frame ``Candidate: [e_X]\\nDescription: a X``, where the
    slot holds the word's own embedding. Alignment must then make ``t_con`` of the full
    candidate "a X" play that role."""
    tok, sp = model.tokenizer, model.special
    pre, mid = tokenize_trusted(tok, "Candidate: "), tokenize_trusted(tok, "\nDescription: ")
    emb = model.lm.get_input_embeddings()
    word_ids, rows = [], []
    for w in WORDS:
        (wid,) = tok(" " + w, add_special_tokens=False)["input_ids"]
        word_ids.append(wid)
        rows.append(pre + [sp.content_slot] + mid + tokenize_untrusted(tok, "a " + w, sp.forbidden_in_untrusted) + [sp.eos[0]])
    ids = torch.tensor(rows)
    start = len(pre) + 1 + len(mid)
    opt = torch.optim.Adam(model.lm.parameters(), lr=3e-3)
    for _ in range(steps):
        e = emb(ids).clone()
        e[:, len(pre)] = emb.weight[torch.tensor(word_ids)]
        logits = model.lm(inputs_embeds=e).logits[:, start - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, start:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1
    model.icm.output_scale.fill_(model.backbone.embedding_rms())
    model.eval()


def _align_eval(trainer: AlignTrainer, examples) -> float:
    """Content loss on fixed examples (every candidate), no gradient."""
    tot = n = 0.0
    cfg = dataclasses.replace(trainer.cfg, content_per_example=4, relation_per_example=0)
    old, trainer.cfg = trainer.cfg, cfg
    try:
        with torch.no_grad():
            from training.sequences import chunk_targets, forward_hidden, logits_at

            for ex in examples:
                for _, chunks in trainer._items(ex, random.Random(0)):
                    full, pos, ids = chunk_targets(chunks)
                    logits = logits_at(trainer.model, forward_hidden(trainer.model, full), pos)
                    tot += float(torch.nn.functional.cross_entropy(logits, ids, reduction="sum"))
                    n += len(ids)
    finally:
        trainer.cfg = old
    return tot / n


def test_align_lowers_its_loss_and_trains_only_the_icm(tmp_path):
    examples = make_examples(16)
    write_examples(tmp_path / "ex.jsonl", examples)
    model = tiny()
    _pretrain_describer(model)
    cfg = AlignConfig(init_from="tiny:text", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / "align"), steps=30, batch_size=2,
                      lr=3e-3, save_every=15, progress=False, relation_per_example=1, model_overrides=OVERRIDES)
    trainer = AlignTrainer(cfg, model=model)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    icm_before = {k: v.clone() for k, v in model.icm.state_dict().items()}
    before = _align_eval(trainer, examples[:6])
    final = trainer.train()
    after = _align_eval(trainer, examples[:6])
    assert after < before - 1.0, (before, after)  # t_con now tells the frozen LM which word it is
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in lm_before.items())  # LM frozen, bit for bit
    changed = [k for k, v in icm_before.items() if not torch.equal(v, model.icm.state_dict()[k])]
    assert any(k.startswith("relate.") for k in changed) and any(k.startswith("compress.") for k in changed)
    assert trainer.history[-1]["relation_loss"] > 0
    loaded = RetrvR1Model.from_pretrained(final)
    assert all(torch.equal(v, loaded.icm.state_dict()[k]) for k, v in model.icm.state_dict().items())
    assert (tmp_path / "align" / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "align").glob("checkpoint-*")) == ["checkpoint-000015", "checkpoint-000030"]
    assert not list((tmp_path / "align").glob(".tmp-*"))


def test_align_self_targets_come_from_the_frozen_lm_reading_full_tokens(tmp_path):
    write_examples(tmp_path / "ex.jsonl", make_examples(2))
    cfg = AlignConfig(init_from="tiny:text", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / "a"), steps=1, batch_size=2,
                      content_target="self", relation_target="self", relation_input="rel", content_per_example=2,
                      relation_per_example=2, max_target_tokens=6, progress=False, model_overrides=OVERRIDES)
    trainer = AlignTrainer(cfg)
    metrics = trainer.train_step(0)
    targets = trainer._self_targets
    assert {k[1] for k in targets} == {"content", "relation"} and len(targets) == 8
    assert all(len(t) <= 7 and (t[-1] in trainer.model.special.eos) for t in targets.values())
    assert metrics["content_loss"] > 0 and metrics["relation_loss"] > 0


# =========================================================================== stage 2


def test_sft_without_inspection_leaves_the_inspection_requests_out_of_its_targets(tmp_path, caplog):
    """compression: none reads every candidate in full tokens; the decoder ignores inspection
    requests and GRPO's format reward refuses them, so SFT must not teach them."""
    examples = make_examples(4)
    traces = _traces(tmp_path, examples)
    common = dict(init_from="tiny:text", data=str(traces), steps=1, batch_size=2, reasoning_budget=128, max_inspections=2,
                  lora=LoraSettings(r=4, alpha=8), progress=False, model_overrides=OVERRIDES)
    icm = SFTTrainer(SFTConfig(output_dir=str(tmp_path / "icm"), **common))
    special = icm.model.special
    assert sum(special.inspect_start in w for _, w in icm.items) > 0  # the programmatic traces do inspect
    with caplog.at_level("WARNING"):
        none = SFTTrainer(SFTConfig(output_dir=str(tmp_path / "none"), compression="none", **common))
    for (_, with_requests), (_, without) in zip(icm.items, none.items):
        assert special.inspect_start not in without and special.inspect_end not in without
        assert without[-1] == special.answer_start
        assert len(with_requests) - len(without) == 3 * with_requests.count(special.inspect_start)  # start, label, end
    stripped = sum(special.inspect_start in w for _, w in icm.items)
    assert any(f"inspection requests of {stripped} of 4 traces were left out" in r.getMessage() for r in caplog.records)
    metrics = none.train_step(0)
    assert metrics["inspections"] == 0


def _traces(tmp_path: Path, examples, name: str = "traces.jsonl") -> Path:
    path = tmp_path / name
    _, stats = synthesize_cot(examples, ProgrammaticTeacher(max_inspections=2), path)
    assert stats.kept == len(examples)
    return path


def test_sft_lowers_its_loss_and_lora_round_trips(tmp_path):
    traces = _traces(tmp_path, make_examples(16))
    cfg = SFTConfig(init_from="tiny:text", data=str(traces), output_dir=str(tmp_path / "sft"), steps=24, batch_size=2, lr=1e-2,
                    save_every=12, reasoning_budget=128, max_inspections=2, lora=LoraSettings(r=8, alpha=16), progress=False,
                    model_overrides=OVERRIDES)
    trainer = SFTTrainer(cfg)
    model = trainer.model
    emb = model.lm.get_input_embeddings().weight
    emb_before = emb.detach().clone()
    icm_before = [p.detach().clone() for p in model.icm.parameters()]
    final = trainer.train()
    losses = [r["loss"] for r in trainer.history]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    assert all(r["inspections"] >= 0 for r in trainer.history) and max(r["inspections"] for r in trainer.history) > 0
    # only LoRA, the ICM and the added tokens' embedding rows changed
    added = sorted(model.tokenizer.added_tokens_decoder.keys())
    rest = [i for i in range(emb.shape[0]) if i not in set(added)]
    assert torch.equal(emb.detach()[rest], emb_before[rest]) and not torch.equal(emb.detach()[added], emb_before[added])
    assert any(not torch.equal(a, b) for a, b in zip(icm_before, model.icm.parameters()))
    assert any(".lora_" in n for n, p in model.lm.named_parameters() if p.requires_grad)
    # round trip: adapters (and the base weights of this config-built backbone) reload exactly
    assert (final / "adapter" / "adapter_model.safetensors").is_file() and (final / "backbone").is_dir()
    loaded = RetrvR1Model.from_pretrained(final)
    ex = make_examples(1, seed=9)[0]
    a = model.rank(ex.query(), ex.candidate_objects(), reasoning_budget=6)
    b = loaded.rank(ex.query(), ex.candidate_objects(), reasoning_budget=6)
    assert a.scores == b.scores and a.reasoning == b.reasoning
    assert {k: v for k, v in model.lm.state_dict().items()}.keys() == loaded.lm.state_dict().keys()


def test_lora_on_a_backbone_with_a_source_saves_adapters_only(tmp_path):
    from retrv_r1_plugin.testing import build_tiny_text_backbone

    bb = build_tiny_text_backbone(0)
    bb.model.save_pretrained(tmp_path / "base")
    bb.tokenizer.save_pretrained(tmp_path / "base")
    traces = _traces(tmp_path, make_examples(4))
    cfg = SFTConfig(init_from=str(tmp_path / "base"), data=str(traces), output_dir=str(tmp_path / "sft"), steps=2, batch_size=2, lr=1e-2,
                    save_every=2, reasoning_budget=128, lora=LoraSettings(r=4, alpha=8), progress=False, model_overrides=OVERRIDES)
    trainer = SFTTrainer(cfg)
    final = trainer.train()
    assert not (final / "backbone").exists() and (final / "adapter").is_dir() and (final / "token_embeddings.safetensors").is_file()
    loaded = RetrvR1Model.from_pretrained(final)
    for k, v in trainer.model.lm.state_dict().items():
        assert torch.equal(v, loaded.lm.state_dict()[k]), k


def test_full_fine_tuning_saves_the_whole_backbone(tmp_path):
    from retrv_r1_plugin.testing import build_tiny_text_backbone

    bb = build_tiny_text_backbone(0)
    bb.model.save_pretrained(tmp_path / "base")
    bb.tokenizer.save_pretrained(tmp_path / "base")
    traces = _traces(tmp_path, make_examples(4))
    cfg = SFTConfig(init_from=str(tmp_path / "base"), data=str(traces), output_dir=str(tmp_path / "sft"), steps=2, batch_size=2, lr=1e-3,
                    save_every=2, reasoning_budget=128, lm="full", progress=False, model_overrides=OVERRIDES)
    trainer = SFTTrainer(cfg)
    layer = trainer.model.lm.model.layers[0].mlp.up_proj.weight
    before = layer.detach().clone()
    final = trainer.train()
    assert not torch.equal(before, layer.detach())  # every LM weight trains, not only adapters
    assert (final / "backbone").is_dir() and not (final / "adapter").exists()
    loaded = RetrvR1Model.from_pretrained(final)
    assert torch.equal(loaded.lm.model.layers[0].mlp.up_proj.weight, layer.detach())


# =========================================================================== stage 3


def test_grpo_raises_the_reward_on_a_learnable_task(tmp_path):
    # the first stage is always right here (positive at index 0): the policy can learn to trust it
    write_examples(tmp_path / "ex.jsonl", make_examples(16, fixed_positive=0))
    cfg = RLConfig(init_from="tiny:text", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / "rl"), steps=16, batch_size=2, group_size=4,
                   lr=1e-2, save_every=8, reasoning_budget=4, max_inspections=1, lora=LoraSettings(r=8, alpha=16), progress=False,
                   model_overrides=OVERRIDES)
    trainer = GRPOTrainer(cfg)
    trainer.train()
    h = trainer.history
    first, last = sum(r["reward"] for r in h[:3]) / 3, sum(r["reward"] for r in h[-4:]) / 4
    assert last > first + 0.3 and h[-1]["accuracy"] >= 0.75, [r["reward"] for r in h]
    for key in ("reward_format", "reward_result", "accuracy", "inspections", "reasoning_len", "frac_zero_std_groups", "lambda", "kl", "clip_ratio"):
        assert key in h[0]
    assert [r["lambda"] for r in h] == pytest.approx([t / 15 for t in range(16)])
    assert max(r["logprob_mismatch"] for r in h) < 1e-4  # the loss saw what the sampler saw
    assert h[0]["reasoning_len"] == 4.0  # the budget forced the answer: no format reward yet
    lines = (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 17))


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    write_examples(tmp_path / "ex.jsonl", make_examples(6, seed=1))
    cfg = RLConfig(init_from="tiny:text", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / "full"), steps=4, batch_size=2, group_size=3,
                   lr=5e-3, scheduler="linear", warmup_steps=1, save_every=2, reasoning_budget=6, max_inspections=1, beta=0.05,
                   lora=LoraSettings(r=4, alpha=8), progress=False, model_overrides=OVERRIDES)
    full = GRPOTrainer(cfg)
    full.train()
    part_cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "part"))
    assert GRPOTrainer(part_cfg).train(stop_after=2) is None
    assert (tmp_path / "part" / "checkpoint-000002" / "model" / "retrv_r1.json").is_file()
    assert not (tmp_path / "part" / "final").exists()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        GRPOTrainer(part_cfg).train()  # a fresh run never silently mixes with an earlier one
    resumed = GRPOTrainer(part_cfg)
    assert resumed.train(resume=True) is not None
    assert resumed.step == 4 and resumed.history == full.history
    for (n, p), (m, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert n == m and torch.equal(p, q), n
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert full.lr == resumed.lr and full.history[-1]["kl"] > 0


# =========================================================================== multimodal


def test_multimodal_inputs_reach_the_training_forward(tmp_path):
    paths = {}
    for name, color, size in [("red", (220, 20, 20), (56, 56)), ("green", (20, 200, 20), (84, 56)), ("blue", (20, 20, 220), (56, 56))]:
        paths[name] = tmp_path / f"{name}.png"
        Image.new("RGB", size, color).save(paths[name])
    cands = [CandidateRecord(id=n, text="a square", image=str(paths[n])) for n in ("red", "green", "blue")]
    ex = TrainingExample(id="m", query_text="the green one", query_image=str(paths["green"]), candidates=cands, positive=1)
    model = tiny("tiny:qwen2_5_vl")
    configure_trainable(model, lm="lora", train_icm=True, train_token_rows=True, lora=LoraSettings(r=4, alpha=8))
    script = ids_of(model, "hm", *INSPECT_2, " ok", "</think>", "<answer>")
    (r,) = sample_rollouts(model, ex, [5], reasoning_budget=16, max_inspections=2, script=script)
    assert r.inspected == [1]

    def logprobs(example):
        with torch.enable_grad():
            prompt, encoded = prepare_example(model, example, reasoning_budget=16)
            seq = build_sequence(model, prompt, encoded, r.written, None, reasoning_budget=16, max_inspections=2, answer_token=r.answer_token)
            return seq, target_logprobs(model, seq, answer_space="labels")

    seq, logp = logprobs(ex)
    # the query image sits in the prompt, the inspected candidate's image in its splice (3-D mRoPE positions)
    assert len(seq.full.grids) == 2 and [c for c in seq.chunks if c.role == "spliced"][0].grids
    assert int((seq.full.ids == model.backbone.image_token_id).sum()) > 0
    torch.testing.assert_close(logp.detach(), torch.tensor(r.sampled_logprobs), atol=1e-4, rtol=0)
    # pixels matter: swap the inspected candidate's image (same text) and the query image
    swapped = dataclasses.replace(ex, candidates=[cands[0], dataclasses.replace(cands[1], image=str(paths["blue"])), cands[2]])
    _, logp_cand = logprobs(swapped)
    _, logp_query = logprobs(dataclasses.replace(ex, query_image=str(paths["red"])))
    assert (logp_cand.detach() - logp.detach()).abs().max() > 1e-4 and (logp_query.detach() - logp.detach()).abs().max() > 1e-4
    # gradients reach the ICM from image candidates; the vision tower stays frozen
    (-logp.sum()).backward()
    assert model.icm.in_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.lm.model.visual.parameters())
    # a full SFT step through the trainer on the vision-language model
    write_examples(tmp_path / "ex.jsonl", [ex])
    traces = _traces(tmp_path, [ex])
    cfg = SFTConfig(init_from="tiny:qwen2_5_vl", data=str(traces), output_dir=str(tmp_path / "vl"), steps=2, batch_size=1, lr=1e-3,
                    save_every=2, reasoning_budget=128, lora=LoraSettings(r=4, alpha=8), progress=False, model_overrides=OVERRIDES)
    trainer = SFTTrainer(cfg)
    final = trainer.train()
    assert trainer.history[1]["loss"] < trainer.history[0]["loss"]
    assert RetrvR1Model.from_pretrained(final).backbone.is_vision


# =========================================================================== command line


def test_cli_chains_the_three_stages(tmp_path, capsys):
    examples = make_examples(6, fixed_positive=0)
    write_examples(tmp_path / "ex.jsonl", examples)
    traces = _traces(tmp_path, examples)
    smoke = str(ROOT / "training" / "configs" / "tiny_smoke.yaml")

    def run(stage, *sets, resume=False):
        argv = [stage, "--config", smoke] + [x for s in sets for x in ("--set", s)] + (["--resume"] if resume else [])
        return main_train(argv)

    assert run("align", f"data={tmp_path / 'ex.jsonl'}", f"output_dir={tmp_path / 'align'}") == 0
    align_final = tmp_path / "align" / "final"
    assert run("sft", f"init_from={align_final}", f"data={traces}", f"output_dir={tmp_path / 'sft'}", "reasoning_budget=128", "lora.r=4") == 0
    sft_final = tmp_path / "sft" / "final"
    assert run("rl", f"init_from={sft_final}", f"data={tmp_path / 'ex.jsonl'}", f"output_dir={tmp_path / 'rl'}", "reasoning_budget=8",
               "group_size=2", "max_inspections=1") == 0
    rl_final = tmp_path / "rl" / "final"
    models = [RetrvR1Model.from_pretrained(p) for p in (align_final, sft_final, rl_final)]
    assert (sft_final / "adapter").is_dir() and (rl_final / "adapter").is_dir()
    # each policy stage's checkpoint ranks under the budget and inspection cap it was trained with
    assert (models[1].config.reasoning_budget, models[2].config.reasoning_budget, models[2].config.max_inspections) == (128, 8, 1)
    icm = [m.icm.in_proj.weight for m in models]
    assert not torch.equal(icm[0], icm[1]) and not torch.equal(icm[1], icm[2])  # each stage trained the ICM further
    assert "final model written to" in capsys.readouterr().out
    for stage in ("align", "sft", "rl"):
        out = tmp_path / stage
        assert (out / "curves.png").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 4
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    # --resume from a finished run only rewrites final/; a bad config is a clean error
    assert run("rl", f"init_from={sft_final}", f"data={tmp_path / 'ex.jsonl'}", f"output_dir={tmp_path / 'rl'}", "reasoning_budget=8",
               "group_size=2", "max_inspections=1", resume=True) == 0
    assert len((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()) == 4
    assert run("rl", "group_size=1") == 2


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_examples_with_more_candidates_than_labels_are_refused_before_the_first_step(tmp_path, capsys, stage):
    # tiny_smoke's model has 16 labels; one example of a mixed data file has 17 candidates.
    # Without the upfront check, rl ran (and checkpointed) until a step drew it, then crashed.
    examples = make_examples(7, fixed_positive=0)
    wide = [CandidateRecord(id=f"w{j}", text=f"a {WORDS[j % len(WORDS)]} {j}") for j in range(17)]
    examples.append(TrainingExample(id="wide", query_text="a cat", candidates=wide, positive=0))
    data = tmp_path / "ex.jsonl"
    write_examples(data, examples)
    if stage == "sft":
        data = _traces(tmp_path, examples)
    out = tmp_path / stage
    smoke = str(ROOT / "training" / "configs" / "tiny_smoke.yaml")
    argv = [stage, "--config", smoke, "--set", f"data={data}", "--set", f"output_dir={out}", "--set", "steps=4",
            "--set", "reasoning_budget=4", "--set", "group_size=2"][: 9 if stage == "sft" else None]
    assert main_train(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}: 1 of 8 examples have more candidates than the model's 16 index labels" in err
    assert "example 'wide' with 17" in err and "--k 16" in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_a_data_file_of_the_other_kind_is_named_as_such(tmp_path, capsys):
    # examples given to sft, traces given to align/rl: the error used to be "not a valid trace:
    # 'example'" or "TrainingExample.__init__() got an unexpected keyword argument 'example'"
    examples = make_examples(4)
    write_examples(tmp_path / "ex.jsonl", examples)
    traces = _traces(tmp_path, examples)
    smoke = str(ROOT / "training" / "configs" / "tiny_smoke.yaml")
    for stage, data, says in (("sft", tmp_path / "ex.jsonl", "this is a training example (from `data examples`), not a CoT trace"),
                              ("align", traces, "this is a CoT trace (from `data cot`), not a training example"),
                              ("rl", traces, "this is a CoT trace (from `data cot`), not a training example")):
        assert main_train([stage, "--config", smoke, "--set", f"data={data}", "--set", f"output_dir={tmp_path / stage}"]) == 2
        err = capsys.readouterr().err
        assert f"{data}:1: {says}" in err and "Traceback" not in err
    from training.cot import read_traces
    from training.data.formats import DataFormatError

    row = json.loads(traces.read_text().splitlines()[0])
    del row["reasoning"]
    (tmp_path / "broken.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataFormatError, match=r"broken.jsonl:1: not a valid trace: missing field 'reasoning'"):
        read_traces(tmp_path / "broken.jsonl")


def test_a_training_run_folder_given_as_the_model_names_the_model_inside(tmp_path, capsys):
    # init_from / eval --model pointing at a stage's output_dir or at one of its checkpoints used to
    # fail with transformers' "Unrecognized model ... Should have a `model_type` key"
    from training.evaluate import main_eval

    examples = make_examples(4, fixed_positive=0)
    write_examples(tmp_path / "ex.jsonl", examples)
    smoke = str(ROOT / "training" / "configs" / "tiny_smoke.yaml")
    align = tmp_path / "align"
    assert main_train(["align", "--config", smoke, "--set", f"data={tmp_path / 'ex.jsonl'}", "--set", f"output_dir={align}"]) == 0
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    import shutil

    shutil.copytree(align / "checkpoint-000002", unfinished / "checkpoint-000002")
    traces = _traces(tmp_path, examples)
    capsys.readouterr()
    for source, says in ((align, f"is a training run's output_dir, not a model: its model is {align / 'final'}"),
                         (align / "checkpoint-000004", f"is a training checkpoint (what --resume reads), not a model: its model is {align / 'checkpoint-000004' / 'model'}"),
                         (unfinished, f"is the output_dir of a training run that has not finished (no final/): use {unfinished / 'checkpoint-000002' / 'model'}, or finish the run with --resume")):
        assert main_train(["sft", "--config", smoke, "--set", f"data={traces}", "--set", f"output_dir={tmp_path / 'sft'}", "--set", f"init_from={source}"]) == 2
        err = capsys.readouterr().err
        assert f"init_from '{source}' {says}" in err and "model_type" not in err
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "a cat"}\n{"_id": "d2", "text": "a dog"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "cat"}\n')
    (beir / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    with pytest.raises(ValueError, match=r"--model '.*align' is a training run's output_dir, not a model: its model is .*final"):
        main_eval(["--beir", str(beir), "--model", str(align), "--top-k", "2", "--quiet"])
    assert main_eval(["--beir", str(beir), "--model", str(align / "checkpoint-000004" / "model"), "--top-k", "2", "--quiet"]) == 0


def test_progress_false_keeps_transformers_load_and_save_bars_out_of_the_log(tmp_path, capsys):
    # tiny_smoke sets progress: false, yet each checkpoint printed a "Writing model shards" bar
    # and loading a checkpoint a "Loading weights" one
    from transformers.utils import logging as hf_logging

    write_examples(tmp_path / "ex.jsonl", make_examples(4, fixed_positive=0))
    smoke = str(ROOT / "training" / "configs" / "tiny_smoke.yaml")
    assert main_train(["align", "--config", smoke, "--set", f"data={tmp_path / 'ex.jsonl'}", "--set", f"output_dir={tmp_path / 'a'}"]) == 0
    assert main_train(["align", "--config", smoke, "--set", f"data={tmp_path / 'ex.jsonl'}", "--set", f"output_dir={tmp_path / 'b'}",
                       "--set", f"init_from={tmp_path / 'a' / 'final'}"]) == 0
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err and "it/s]" not in err
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process


# =========================================================================== position debiasing and the direct mode


def test_permuted_trace_moves_labels_answer_and_inspections_with_their_candidates(tmp_path):
    from training.cot import read_traces

    ex = make_examples(1, k=4, seed=3)[0]
    trace = read_traces(_traces(tmp_path, [ex]))[0]
    order = [2, 0, 3, 1]  # new position -> old index
    moved = trace.permuted(order)
    assert [c.id for c in moved.example.candidates] == [ex.candidates[i].id for i in order]
    assert moved.example.candidates[moved.answer].id == ex.candidates[trace.answer].id
    assert moved.example.candidates[moved.example.positive].id == ex.candidates[ex.positive].id
    assert [moved.example.candidates[i].id for i in moved.inspected] == [ex.candidates[i].id for i in trace.inspected]
    # every label in the reasoning still names the same candidate
    import re

    old = [ex.candidates[int(n) - 1].id for n in re.findall(r"<cand_(\d+)>", trace.reasoning)]
    new = [moved.example.candidates[int(n) - 1].id for n in re.findall(r"<cand_(\d+)>", moved.reasoning)]
    assert old == new and old
    with pytest.raises(ValueError, match="not a permutation"):
        trace.permuted([0, 0, 1, 2])


def test_trace_that_never_closes_its_thinking_is_refused_with_file_and_line(tmp_path):
    from training.cot import CoTTrace, read_traces, write_traces
    from training.data.formats import DataFormatError

    ex = make_examples(1, k=4, seed=3)[0]
    ok = CoTTrace(example=ex, reasoning="<cand_1> names it.</think>", answer=0)
    direct = CoTTrace(example=ex, reasoning="", answer=1)  # direct mode: no reasoning at all
    with pytest.raises(ValueError, match="must be empty or end with '</think>'"):
        CoTTrace(example=ex, reasoning="<cand_1> names it.<answer>", answer=0)
    with pytest.raises(ValueError, match="answer index 4 is outside the 4 candidates"):
        CoTTrace(example=ex, reasoning="", answer=4)
    with pytest.raises(ValueError, match=r"inspected indices \[7\]"):
        CoTTrace(example=ex, reasoning="", answer=0, inspected=[7])
    path = tmp_path / "traces.jsonl"
    write_traces(path, [ok, direct])
    assert [t.answer for t in read_traces(path)] == [0, 1]
    rows = path.read_text().splitlines()
    broken = json.loads(rows[1])
    broken["reasoning"] = "thinking without an end"
    path.write_text(rows[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(DataFormatError, match=r"traces.jsonl:2: not a valid trace"):
        read_traces(path)


def _marker_examples(n: int, seed: int, fixed_positive: int | None) -> list[TrainingExample]:
    """The positive is the one candidate that mentions "sky" (a content cue a tiny random model
    learns quickly); the others are other words."""
    rng = random.Random(seed)
    others = [w for w in WORDS if w != "sky"]
    out = []
    for i in range(n):
        words = rng.sample(others, 4)
        pos = rng.randrange(4) if fixed_positive is None else fixed_positive
        words[pos] = "sky"
        cands = [CandidateRecord(id=f"d{i}_{j}", text=f"a {w}") for j, w in enumerate(words)]
        out.append(TrainingExample(id=f"q{i}", query_text="the sky", candidates=cands, positive=pos))
    return out


@pytest.mark.parametrize("shuffle", [True, False])
def test_direct_sft_with_shuffled_candidates_learns_no_position_prior(tmp_path, shuffle):
    """Every training positive sits at position 0 (a first stage that is always right).
    Without shuffling the model learns "answer 1" whatever the content; with shuffling the
    label it must write is spread over all positions, so no position prior is learned."""
    traces = _traces(tmp_path, _marker_examples(32, seed=1, fixed_positive=0))
    test = [e for e in _marker_examples(40, seed=99, fixed_positive=None) if e.positive != 0][:20]
    cfg = SFTConfig(init_from="tiny:text", data=str(traces), output_dir=str(tmp_path / "direct"), steps=30, batch_size=4, lr=1e-2,
                    save_every=1000, reasoning_budget=0, lm="full", answer_space="labels", shuffle_candidates=shuffle,
                    progress=False, model_overrides=OVERRIDES)
    trainer = SFTTrainer(cfg)
    assert all(written == [] for _, written in trainer.items)  # direct mode: only the label is a target
    trainer.train()
    assert all(r["target_tokens"] == 4.0 for r in trainer.history)
    first = [trainer.model.rank(e.query(), e.candidate_objects(), reasoning_budget=0).scores[0] for e in test]
    mean_first = sum(first) / len(first)
    if shuffle:
        assert mean_first < 0.4, mean_first
    else:
        assert mean_first > 0.8, mean_first


def test_tiny_init_std_spec():
    def std(spec: str) -> float:
        model = load_model(RunConfig(init_from=spec, model_overrides=OVERRIDES))
        return float(model.lm.model.layers[0].self_attn.q_proj.weight.detach().std())

    assert std("tiny:text:0:2:scaled") == pytest.approx(64**-0.5, rel=0.1)
    assert std("tiny:text:0:2:0.05") == pytest.approx(0.05, rel=0.1)
    assert std("tiny:text") == pytest.approx(0.02, rel=0.1)  # transformers' default
    with pytest.raises(ValueError, match="init_std must be a number or 'scaled'"):
        load_model(RunConfig(init_from="tiny:text:0:2:wide"))


def test_scaled_init_learns_to_match_the_query_from_scratch(tmp_path):
    """K=2 one-word candidates, one equal to the query, shuffled: the answer depends on the
    query, so only a model that compares query and candidates gets above chance. From scratch
    with std 1/sqrt(width) our direct SFT learns it (transformers' 0.02 stays at chance for
    thousands of steps: docs/benchmarks.md 4b)."""
    words = ["cat", "dog", "apple", "rocket", "sky", "table", "sofa", "light", "sugar", "photo", "blue", "red"]
    rng = random.Random(0)
    examples = []
    for i in range(256):
        query, other = rng.sample(words, 2)
        pos = rng.randrange(2)
        pair = [other, other]
        pair[pos] = query
        examples.append(TrainingExample(id=f"q{i}", query_text=query, candidates=[CandidateRecord(id=f"d{i}{j}", text=w) for j, w in enumerate(pair)], positive=pos))
    traces = _traces(tmp_path, examples)
    cfg = SFTConfig(init_from="tiny:text:0:2:scaled", data=str(traces), output_dir=str(tmp_path / "match"), steps=300, batch_size=8, lr=1e-3,
                    warmup_steps=20, save_every=10**6, reasoning_budget=0, lm="full", answer_space="labels", compression="none",
                    progress=False, model_overrides={"max_candidates": 8, "system_prompt": "Rerank."})
    trainer = SFTTrainer(cfg)
    trainer.train()
    late = [r["answer_accuracy"] for r in trainer.history[-100:]]
    assert sum(late) / len(late) > 0.7


def test_answer_weight_scales_only_the_answer_term(tmp_path):
    traces = _traces(tmp_path, make_examples(4))

    def one_step(weight: float, budget: int) -> dict[str, torch.Tensor]:
        cfg = SFTConfig(init_from="tiny:text", data=str(traces), output_dir=str(tmp_path / f"w{weight}-{budget}"), steps=1, batch_size=2, lr=1e-2,
                        save_every=1, reasoning_budget=budget, answer_weight=weight, answer_space="labels", lora=LoraSettings(r=4, alpha=8),
                        progress=False, model_overrides=OVERRIDES)
        trainer = SFTTrainer(cfg)
        trainer.train()
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}

    direct_1, direct_20 = one_step(1.0, 0), one_step(20.0, 0)
    assert all(torch.allclose(direct_1[k], direct_20[k], atol=1e-6) for k in direct_1)  # the answer is the only target: the weight cancels
    traced_1, traced_20 = one_step(1.0, 128), one_step(20.0, 128)
    assert any(not torch.allclose(traced_1[k], traced_20[k], atol=1e-6) for k in traced_1)
    with pytest.raises(ValueError, match="answer_weight"):
        SFTConfig(init_from="tiny:text", data=str(traces), answer_weight=0.0).validate()


def test_align_self_targets_are_not_shared_by_examples_that_reuse_an_id(tmp_path):
    """Data sets trained together may reuse query ids (WordNet def2word / word2def): the
    frozen LM's ``self`` target of one example must never be handed to the other."""
    a, b = make_examples(2, fixed_positive=0)
    b = dataclasses.replace(b, id=a.id)
    assert a.candidates[0].text != b.candidates[0].text
    write_examples(tmp_path / "ex.jsonl", [a, b])
    cfg = AlignConfig(init_from="tiny:text", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / "a"), steps=1, batch_size=2,
                      content_target="self", relation_target="self", content_per_example=1, relation_per_example=1,
                      max_target_tokens=4, progress=False, model_overrides=OVERRIDES)
    trainer = AlignTrainer(cfg)
    eos = trainer.model.special.eos[0]
    # a stand-in for the frozen LM's greedy output: a function of the frame it reads
    trainer._greedy = lambda chunks: [10 + int(sum(int(c.ids.sum()) for c in chunks)) % 50, eos]
    for ex in (a, b):
        items = trainer._items(ex, random.Random(0))
        encoded = trainer.model.builder.encode_candidates(ex.candidate_objects(), trainer.model.config.max_candidate_tokens)
        query = trainer.model.builder.encode_query(ex.query(), trainer.model.config.max_query_tokens)
        expected = {
            "content": trainer._greedy(trainer._content_frame(encoded[0].chunk)),
            "relation": trainer._greedy(trainer._relation_frame(query, encoded[0].chunk)),
        }
        for kind, chunks in items:
            assert chunks[-1].ids.tolist() == expected[kind], (ex.query_text, kind)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the test wraps step to record the rate
def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    """metrics.jsonl's lr at step n is the rate of step n's update (not the next step's)."""
    write_examples(tmp_path / "ex.jsonl", make_examples(2))
    cfg = AlignConfig(init_from="tiny:text", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / "a"), steps=4, batch_size=1,
                      lr=1e-3, scheduler="linear", warmup_steps=1, content_per_example=1, relation_per_example=0,
                      max_target_tokens=4, save_every=4, progress=False, model_overrides=OVERRIDES)
    trainer = AlignTrainer(cfg)
    seen: list[float] = []
    step = trainer.optimizer.step

    def record(*args, **kwargs):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = record
    trainer.train()
    assert seen == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])  # one warm-up step, then linear decay
    assert [row["lr"] for row in trainer.history] == pytest.approx(seen)
    logged = [json.loads(x)["lr"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(seen)


def test_resume_refuses_a_run_whose_batches_would_differ(tmp_path):
    """The batches of step s are a function of the data, the seed and batch_size: resuming with
    any of them changed must be refused, not silently continued on other batches."""
    write_examples(tmp_path / "ex.jsonl", make_examples(4))
    cfg = AlignConfig(init_from="tiny:text", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / "a"), steps=3, batch_size=1,
                      content_per_example=1, relation_per_example=0, max_target_tokens=4, save_every=1, progress=False,
                      model_overrides=OVERRIDES)
    assert AlignTrainer(cfg).train(stop_after=1) is None
    write_examples(tmp_path / "more.jsonl", make_examples(5))
    for change, message in [({"data": str(tmp_path / "more.jsonl")}, "data size 4 -> 5"), ({"batch_size": 2}, "batch_size 1 -> 2"),
                            ({"seed": 1}, "seed 0 -> 1")]:
        with pytest.raises(ValueError, match=f"checkpoint-000001: cannot resume.*{message}"):
            AlignTrainer(dataclasses.replace(cfg, **change)).train(resume=True)
    resumed = AlignTrainer(cfg)
    assert resumed.train(resume=True) is not None and resumed.step == 3


def test_existing_lora_adapters_keep_training_and_differing_settings_are_reported(caplog):
    """RL fed an SFT output keeps that output's adapters; a config asking for another rank
    must say that its lora settings were not applied rather than ignore them silently."""
    from training.params import inject_lora

    model = tiny()
    inject_lora(model, LoraSettings(r=4, alpha=8))
    with caplog.at_level("WARNING", logger="training.params"):
        inject_lora(model, LoraSettings(r=4, alpha=8))
    assert not caplog.records
    with caplog.at_level("WARNING", logger="training.params"):
        inject_lora(model, LoraSettings(r=16, alpha=32))
    assert model.lm.peft_config["default"].r == 4
    assert any("r=16" in r.getMessage() and "not applied" in r.getMessage() for r in caplog.records)


def test_dr_grpo_normalises_a_direct_answer_by_one_token(tmp_path):
    """Dr.GRPO divides by sequences x (reasoning_budget + 1), the most targets a rollout can
    have. In direct mode (budget 0) every rollout has exactly that one target (the answer), so
    the normaliser equals dapo's (the count of active tokens) and both give the same gradient."""
    write_examples(tmp_path / "ex.jsonl", make_examples(2, seed=4))
    norms = {}
    for loss_type in ("dapo", "dr_grpo"):
        cfg = RLConfig(init_from="tiny:text", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / loss_type), steps=1, batch_size=2,
                       group_size=4, reasoning_budget=0, loss_type=loss_type, lora=LoraSettings(r=4, alpha=8), progress=False,
                       model_overrides=OVERRIDES)
        metrics = GRPOTrainer(cfg).train_step(0)
        assert metrics["frac_zero_std_groups"] < 1.0  # some advantage is not zero: there is a gradient to compare
        norms[loss_type] = metrics["grad_norm"]
    assert norms["dr_grpo"] > 0 and norms["dr_grpo"] == pytest.approx(norms["dapo"], rel=1e-5)


@pytest.mark.parametrize("compression", ["icm", "none"])
def test_inspection_request_earns_the_format_reward_only_where_inspection_exists(tmp_path, monkeypatch, compression):
    """With compression: none the candidates are already in full tokens and the decoder ignores
    inspection requests: a request is then a stray structural token, never a well-formed output."""
    import training.grpo as grpo

    write_examples(tmp_path / "ex.jsonl", make_examples(1, seed=5))
    cfg = RLConfig(init_from="tiny:text", data=str(tmp_path / "ex.jsonl"), output_dir=str(tmp_path / compression), steps=1, batch_size=1,
                   group_size=2, reasoning_budget=8, max_inspections=1, compression=compression, lora=LoraSettings(r=4, alpha=8),
                   progress=False, model_overrides=OVERRIDES)
    trainer = GRPOTrainer(cfg)
    script = ids_of(trainer.model, "x", *INSPECT_2, "</think>", "<answer>")
    real = grpo.sample_rollouts
    monkeypatch.setattr(grpo, "sample_rollouts", lambda *a, **kw: real(*a, **kw, script=script))
    metrics = trainer.train_step(0)
    assert metrics["inspections"] == (1.0 if compression == "icm" else 0.0)
    assert metrics["format_ok"] == (1.0 if compression == "icm" else 0.0)


@pytest.mark.parametrize("stage", ["align", "sft", "rl"])
def test_images_a_text_only_backbone_cannot_see_are_reported_when_training_starts(tmp_path, caplog, stage):
    """Inference notes an image the text-only backbone ignores; training builds its prompts
    without those notes, so a run on image data would train on the captions alone in silence."""
    Image.new("RGB", (56, 56), (200, 20, 20)).save(tmp_path / "red.png")
    examples = make_examples(3, seed=6)
    examples[0] = dataclasses.replace(examples[0], query_image=str(tmp_path / "red.png"))
    examples[1] = dataclasses.replace(examples[1], candidates=[dataclasses.replace(examples[1].candidates[0], image=str(tmp_path / "red.png"))]
                                      + examples[1].candidates[1:])
    write_examples(tmp_path / "ex.jsonl", examples)
    common = dict(init_from="tiny:text", output_dir=str(tmp_path / stage), steps=1, batch_size=1, progress=False, model_overrides=OVERRIDES)
    if stage == "align":
        cfg, cls = AlignConfig(data=str(tmp_path / "ex.jsonl"), **common), AlignTrainer
    elif stage == "sft":
        cfg, cls = SFTConfig(data=str(_traces(tmp_path, examples)), reasoning_budget=128, lora=LoraSettings(r=4, alpha=8), **common), SFTTrainer
    else:
        cfg, cls = RLConfig(data=str(tmp_path / "ex.jsonl"), group_size=2, lora=LoraSettings(r=4, alpha=8), **common), GRPOTrainer
    with caplog.at_level("WARNING"):
        cls(cfg)
    warned = [r.getMessage() for r in caplog.records if "text-only" in r.getMessage()]
    assert len(warned) == 1 and "2 of 3 examples" in warned[0], warned
    caplog.clear()
    write_examples(tmp_path / "ex.jsonl", make_examples(3, seed=6))  # no images: nothing to report
    with caplog.at_level("WARNING"):
        cls(dataclasses.replace(cfg, data=str(_traces(tmp_path, make_examples(3, seed=6), "plain.jsonl")) if stage == "sft" else cfg.data))
    assert not [r for r in caplog.records if "text-only" in r.getMessage()]
