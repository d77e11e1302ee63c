"""Training killed with SIGKILL while it writes a checkpoint: ``--resume`` continues from the
last complete checkpoint, the partial one is never read and is cleaned up, and the finished
run equals an uninterrupted one (weights, optimizer, metrics).

The kill is deterministic: the test hook ``RETRV_R1_TEST_KILL_DURING_SAVE=<step>`` makes the
trainer SIGKILL itself after the weights and the trainer state of that step's checkpoint are
in the temporary directory, before its rename.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training/ package is not installed with the plugin
    sys.path.insert(0, str(ROOT))

from training.cot import ProgrammaticTeacher, synthesize_cot  # noqa: E402
from training.examples import CandidateRecord, TrainingExample  # noqa: E402
from training.trainer import KILL_DURING_SAVE_ENV, latest_checkpoint, recover_output_dir  # noqa: E402

WORDS = ["cat", "dog", "apple", "rocket", "sky", "table", "sofa", "light", "sugar", "photo", "blue", "red", "white", "cup", "fox", "step"]
STEPS = 6


def make_examples(n: int, k: int = 4, seed: int = 0) -> list[TrainingExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, k)
        pos = rng.randrange(k)
        cands = [CandidateRecord(id=f"d{i}_{j}", text=f"a {w}", score=1.0 - 0.1 * j) for j, w in enumerate(words)]
        out.append(TrainingExample(id=f"q{i}", query_text=f"a {words[pos]}", candidates=cands, positive=pos))
    return out


def run_sft(config: Path, out: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", KILL_DURING_SAVE_ENV)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    if kill_at is not None:
        env[KILL_DURING_SAVE_ENV] = str(kill_at)
    cmd = [sys.executable, "-m", "training.cli", "train", "sft", "--config", str(config), "--set", f"output_dir={out}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path):
    traces = tmp_path / "traces.jsonl"
    synthesize_cot(make_examples(8), ProgrammaticTeacher(max_inspections=2), traces)
    smoke = yaml.safe_load((ROOT / "training" / "configs" / "tiny_smoke.yaml").read_text())
    cfg = {**smoke, "model_overrides": {"max_candidates": 8, "system_prompt": "Rerank."}, "data": str(traces), "steps": STEPS,
           "batch_size": 2, "save_every": 2, "device": "cpu", "reasoning_budget": 128, "max_inspections": 2, "lora": {"r": 4, "alpha": 8},
           "scheduler": "linear", "warmup_steps": 1}
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(cfg))

    full = tmp_path / "full"
    ok = run_sft(config, full)
    assert ok.returncode == 0, ok.stderr[-4000:]

    out = tmp_path / "killed"
    killed = run_sft(config, out, kill_at=4)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-4000:])
    # it died inside the write of checkpoint-000004: the temporary directory holds its weights and
    # state (it would look complete if it were read), but no checkpoint-000004 is visible
    (tmp,) = [p for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-000004-")]
    assert (tmp / "trainable.safetensors").is_file() and (tmp / "trainer_state.pt").is_file() and not (tmp / "model").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002"]
    assert latest_checkpoint(out) == out / "checkpoint-000002"
    assert not (out / "final").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # logged before the save began

    # a fresh start refuses to mix with the interrupted run; --resume continues it
    again = run_sft(config, out)
    assert again.returncode == 2 and "already holds checkpoints (checkpoint-000002)" in again.stderr
    resumed = run_sft(config, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"removed {tmp.name}" in resumed.stderr and "checkpoint-000002 at step 2" in resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full.iterdir())  # no partial directory left
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000004", "checkpoint-000006"]
    # nothing lost: the same metrics, weights, optimizer and scheduler as the uninterrupted run
    assert metrics(out) == metrics(full) and len(metrics(out)) == STEPS
    for name in ("checkpoint-000004", "checkpoint-000006"):
        a, b = load_file(str(out / name / "trainable.safetensors")), load_file(str(full / name / "trainable.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sa = torch.load(out / "checkpoint-000006" / "trainer_state.pt", weights_only=False)
    sb = torch.load(full / "checkpoint-000006" / "trainer_state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == STEPS and sa["history"] == sb["history"] and sa["scheduler"] == sb["scheduler"]
    assert all(torch.equal(sa["optimizer"]["state"][i][key], s[key]) for i, s in sb["optimizer"]["state"].items() for key in ("exp_avg", "exp_avg_sq"))
    for name in ("icm.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(out / "final" / name)), load_file(str(full / "final" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_recovery_restores_a_set_aside_checkpoint_and_removes_leftovers(tmp_path):
    def ckpt(path: Path, tag: str) -> Path:
        path.mkdir()
        (path / "trainer_state.pt").write_text(tag)
        (path / "trainable.safetensors").write_text(tag)
        return path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ckpt(tmp_path / "checkpoint-000002", "2")
        # died between the two renames of a replace: checkpoint-000004 moved aside, the new one not in place
        ckpt(tmp_path / f".old-checkpoint-000004-{dead.pid}", "4")
        ckpt(tmp_path / f".tmp-checkpoint-000004-{dead.pid}", "partial")
        ckpt(tmp_path / f".old-checkpoint-000002-{dead.pid}", "stale")  # checkpoint-000002 exists: the copy is stale
        ckpt(tmp_path / f".trash-checkpoint-000000-{dead.pid}", "pruned")
        ckpt(tmp_path / f".tmp-final-{alive.pid}", "someone else's write in progress")
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000002"  # hidden directories are never read
        done = recover_output_dir(tmp_path)
        assert f"restored checkpoint-000004 from .old-checkpoint-000004-{dead.pid}" in done
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-final-{alive.pid}", "checkpoint-000002", "checkpoint-000004"]
        assert (tmp_path / "checkpoint-000004" / "trainer_state.pt").read_text() == "4"
        assert (tmp_path / "checkpoint-000002" / "trainer_state.pt").read_text() == "2"
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000004"
    finally:
        alive.kill()
        alive.wait()


def test_latest_checkpoint_skips_folders_that_are_not_numbered_checkpoints(tmp_path):
    """A stray ``checkpoint-foo`` or a renamed ``checkpoint-000004.bak`` must not crash resume."""
    from training.trainer import CHECKPOINT_PREFIX, STATE_FILE, WEIGHTS_FILE, latest_checkpoint

    for name in ("000002", "000004.bak", "foo", "000003"):
        d = tmp_path / f"{CHECKPOINT_PREFIX}{name}"
        d.mkdir()
        (d / STATE_FILE).write_text("{}")
        (d / WEIGHTS_FILE).write_text("")
    assert latest_checkpoint(tmp_path).name == f"{CHECKPOINT_PREFIX}000003"


def test_cot_cache_resumes_after_a_kill_in_the_middle_of_a_line(tmp_path):
    """A kill while a cache line is written leaves a torn last line (maybe cut inside a UTF-8
    character): the next run must start, redo only that call, and leave a cache that a third
    run reads completely."""
    examples = make_examples(4)
    cache = tmp_path / "cache.jsonl"
    _, stats = synthesize_cot(examples[:3], ProgrammaticTeacher(), cache_path=cache)
    assert stats.called == 3
    for torn in ('{"teacher": "programmatic", "id": "q3#x", "raw": "caf\u00e9'.encode()[:-1],  # cut inside "é"
                 b'{"teacher": "programmatic", "id": "q3#x", "ra'):
        cache.write_bytes(b"".join(cache.read_bytes().splitlines(keepends=True)[:3]) + torn)
        _, stats = synthesize_cot(examples, ProgrammaticTeacher(), cache_path=cache)
        assert stats.cached == 3 and stats.called == 1
        _, stats = synthesize_cot(examples, ProgrammaticTeacher(), cache_path=cache)
        assert stats.cached == 4 and stats.called == 0  # the line after the torn one was kept
        assert [json.loads(line)["id"].split("#")[0] for line in cache.read_text(encoding="utf-8").splitlines()] == ["q0", "q1", "q2", "q3"]
    # a complete last line that only lacks its newline is kept
    cache.write_bytes(cache.read_bytes().rstrip(b"\n"))
    _, stats = synthesize_cot(examples, ProgrammaticTeacher(), cache_path=cache)
    assert stats.cached == 4 and stats.called == 0 and cache.read_bytes().endswith(b"\n")


def test_cot_cache_never_truncates_a_line_another_process_is_writing(tmp_path):
    """Shards synthesised in parallel may share one cache. While another process holds the
    cache lock with its line half written, a starting run must wait instead of repairing
    that line as if a kill had torn it; once the line is complete the run reuses it."""
    import threading

    from filelock import FileLock

    examples = make_examples(2)
    cache = tmp_path / "cache.jsonl"
    _, stats = synthesize_cot(examples[:1], ProgrammaticTeacher(), cache_path=cache)
    assert stats.called == 1
    other = tmp_path / "other.jsonl"
    synthesize_cot(examples[1:], ProgrammaticTeacher(), cache_path=other)
    second_line = other.read_bytes()
    result: dict = {}
    with FileLock(f"{cache}.lock"):
        with open(cache, "ab") as fh:  # the other process has written half of its line
            fh.write(second_line[:20])
        worker = threading.Thread(target=lambda: result.update(stats=synthesize_cot(examples, ProgrammaticTeacher(), cache_path=cache)[1]))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive(), "the run did not wait for the lock"
        with open(cache, "ab") as fh:
            fh.write(second_line[20:])
    worker.join(30)
    assert result["stats"].cached == 2 and result["stats"].called == 0
    assert len(cache.read_text(encoding="utf-8").splitlines()) == 2


def test_resume_restores_cuda_rng_on_a_machine_with_fewer_gpus(monkeypatch):
    """A checkpoint holds one CUDA RNG state per GPU its process saw (8 on a training node);
    resuming where fewer GPUs are visible sets those that exist instead of failing at the 2nd."""
    from training import trainer as trainer_module

    saved = trainer_module._rng_state()
    saved["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    set_states: list[tuple[int, int]] = []

    def set_rng_state(state, device):
        if device >= 1:
            raise IndexError(f"no CUDA device {device}")
        set_states.append((device, int(state[0])))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [set_rng_state(s, i) for i, s in enumerate(states)])
    trainer_module._set_rng_state(saved)
    assert set_states == [(0, 0)]


class _Payload:
    """A pickle that runs code when loaded (here: creates ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_trainer_state_is_loaded_without_running_code_from_it(tmp_path):
    """``--resume`` reads trainer_state.pt with weights_only=True: a checkpoint folder from
    elsewhere cannot run code through its pickle; a real state (optimizer, NumPy RNG, ...) loads."""
    from training.trainer import _rng_state, load_trainer_state

    marker = tmp_path / "pwned"
    torch.save({"stage": "sft", "step": 1, "evil": _Payload(marker)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: not a trainer state"):
        load_trainer_state(tmp_path / "bad.pt")
    assert not marker.exists()
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    state = {"stage": "sft", "step": 2, "optimizer": opt.state_dict(), "rng": _rng_state(),
             "history": [{"step": 1, "loss": 0.5}], "config": {"lora": {"r": 4}, "targets": ["q_proj"], "seed": None}}
    torch.save(state, tmp_path / "good.pt")
    loaded = load_trainer_state(tmp_path / "good.pt")
    assert loaded["history"] == state["history"] and loaded["config"] == state["config"]
    assert (loaded["rng"]["numpy"][1] == state["rng"]["numpy"][1]).all()
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_pruning_removes_only_the_loops_own_checkpoint_folders(tmp_path):
    from types import SimpleNamespace

    from training.trainer import Trainer

    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    (tmp_path / "checkpoint-notes.txt").write_text("mine")
    (tmp_path / "checkpoint-best").mkdir()
    fake = SimpleNamespace(out=tmp_path, cfg=SimpleNamespace(keep_last=1))
    Trainer._prune(fake)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000003", "checkpoint-best", "checkpoint-notes.txt"]
