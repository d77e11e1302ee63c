"""Data parallelism of the training loop: two CPU processes (gloo) launched with torchrun and
with ``accelerate launch`` must train exactly what one process trains on the same global
batch, resume exactly, and write a single set of checkpoints and metrics.

Every run is a subprocess (``python -m training.cli train sft``) on the tiny text model, so the
in-process accelerate state of other tests does not matter.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training/ package is not installed with the plugin
    sys.path.insert(0, str(ROOT))

from training.cot import ProgrammaticTeacher, synthesize_cot  # noqa: E402
from training.examples import CandidateRecord, TrainingExample  # noqa: E402
from training.trainer import Trainer  # noqa: E402

WORDS = ["cat", "dog", "apple", "rocket", "sky", "table", "sofa", "light", "sugar", "photo", "blue", "red", "white", "cup", "fox", "step"]
STEPS, BATCH = 4, 4
TOL = 1e-5

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_examples(n: int, k: int = 4, seed: int = 0) -> list[TrainingExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, k)
        pos = rng.randrange(k)
        cands = [CandidateRecord(id=f"d{i}_{j}", text=f"a {w}", score=1.0 - 0.1 * j) for j, w in enumerate(words)]
        out.append(TrainingExample(id=f"q{i}", query_text=f"a {words[pos]}", candidates=cands, positive=pos))
    return out


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.pop("RETRV_R1_TEST_KILL_DURING_SAVE", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return env


def run_sft(launcher: list[str], config: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = launcher + ["-m", "training.cli", "train", "sft", "--config", str(config), "--set", f"output_dir={output_dir}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]


def accelerate_launch(port: int) -> list[str]:
    # --multi_gpu starts N processes through torch.distributed.run; with `device: cpu` (or no GPU)
    # they train on the CPU over gloo. (`--cpu --num_processes 2` would start only one process.)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= TOL, worst
    return worst


def assert_same_history(rows: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for r, q in zip(rows, ref):
        assert r.keys() == q.keys()
        for key in r:
            # global metrics: the loss over all 4 examples, the norm of the summed gradient
            assert r[key] == pytest.approx(q[key], rel=1e-5, abs=1e-6), (r["step"], key, r[key], q[key])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Traces, a tiny_smoke-like config with global batch 4, and the single-process reference run."""
    tmp = tmp_path_factory.mktemp("dp")
    traces = tmp / "traces.jsonl"
    _, stats = synthesize_cot(make_examples(8), ProgrammaticTeacher(max_inspections=2), traces)
    assert stats.kept == 8
    smoke = yaml.safe_load((ROOT / "training" / "configs" / "tiny_smoke.yaml").read_text())
    cfg = {**smoke, "model_overrides": {"max_candidates": 8, "system_prompt": "Rerank."}, "data": str(traces), "steps": STEPS, "batch_size": BATCH,
           "save_every": 2, "device": "cpu", "reasoning_budget": 128, "max_inspections": 2, "lora": {"r": 4, "alpha": 8}}
    config = tmp / "sft.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref = tmp / "single"
    run_sft([sys.executable], config, ref)
    return SimpleNamespace(tmp=tmp, config=config, ref=ref, ref_history=metrics(ref),
                           ref_weights=load_file(str(ref / "checkpoint-000004" / "trainable.safetensors")))


def test_local_positions_split_every_batch_into_disjoint_blocks():
    for n in (1, 3, 4, 7, 8):
        for world in (1, 2, 3, 4):
            shares = [Trainer.local_positions(SimpleNamespace(rank=r, world_size=world), n) for r in range(world)]
            flat = [j for s in shares for j in s]
            assert flat == list(range(n))  # disjoint, complete, in rank order
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@needs_gloo
def test_two_processes_train_what_one_process_trains_on_the_same_global_batch(setup):
    out = setup.tmp / "torchrun"
    proc = run_sft(torchrun(free_port()), setup.config, out)
    assert "process 0 of 2" in proc.stderr and "process 1 of 2" in proc.stderr  # really two processes
    # one set of outputs, written by the main process only
    assert entries(out) == ["checkpoint-000002", "checkpoint-000004", "curves.png", "final", "metrics.jsonl", "sft_config.yaml"]
    assert entries(out / "checkpoint-000004") == entries(setup.ref / "checkpoint-000004")
    rows = metrics(out)
    assert len(rows) == STEPS  # not one row per process
    assert_same_history(rows, setup.ref_history)  # loss over the global batch, norm of the summed gradient
    weights = load_file(str(out / "checkpoint-000004" / "trainable.safetensors"))
    assert_close_weights(weights, setup.ref_weights)
    # the comparison is not vacuous: training moved every trainable tensor far more than the tolerance
    start = load_file(str(setup.ref / "checkpoint-000002" / "trainable.safetensors"))
    assert min(float((weights[k] - start[k]).abs().max()) for k in weights) > 100 * TOL
    state = torch.load(out / "checkpoint-000004" / "trainer_state.pt", weights_only=False)
    ref_state = torch.load(setup.ref / "checkpoint-000004" / "trainer_state.pt", weights_only=False)
    assert state.keys() == ref_state.keys() and state["step"] == STEPS and state["data"] == ref_state["data"]
    for i, s in ref_state["optimizer"]["state"].items():
        torch.testing.assert_close(state["optimizer"]["state"][i]["exp_avg"], s["exp_avg"], atol=TOL, rtol=0)
    for name in ("icm.safetensors", "adapter/adapter_model.safetensors"):  # final/ is the same model too
        assert_close_weights(load_file(str(out / "final" / name)), load_file(str(setup.ref / "final" / name)))


@needs_gloo
def test_two_processes_resume_a_checkpoint_exactly(setup):
    # the step-2 checkpoint of the single-process run, as if that run had been stopped there
    out = setup.tmp / "resumed"
    out.mkdir()
    shutil.copytree(setup.ref / "checkpoint-000002", out / "checkpoint-000002")
    proc = run_sft(accelerate_launch(free_port()), setup.config, out, "--resume")
    assert "process 1 of 2" in proc.stderr and "resumed sft from" in proc.stderr
    assert entries(out) == ["checkpoint-000002", "checkpoint-000004", "curves.png", "final", "metrics.jsonl", "sft_config.yaml"]
    rows = metrics(out)
    assert rows[:2] == setup.ref_history[:2]  # restored from the checkpoint, bit for bit
    assert_same_history(rows, setup.ref_history)
    state = torch.load(out / "checkpoint-000004" / "trainer_state.pt", weights_only=False)
    assert state["history"][:2] == setup.ref_history[:2] and len(state["history"]) == STEPS
    assert_close_weights(load_file(str(out / "checkpoint-000004" / "trainable.safetensors")), setup.ref_weights)


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["align", "rl"])
def test_align_and_rl_shard_their_batches_exactly(setup, stage):
    """Align draws its per-example random picks in batch order and RL seeds rollouts by global
    position: both must match one process (RL with a reference model and two updates per step)."""
    from training.examples import write_examples

    data = setup.tmp / "examples.jsonl"
    if not data.exists():
        write_examples(data, make_examples(8, seed=1))
    cfg = {"init_from": "tiny:text", "model_overrides": {"max_candidates": 8, "system_prompt": "Rerank."}, "data": str(data), "steps": 2,
           "batch_size": BATCH, "lr": 1e-3, "save_every": 2, "progress": False, "threads": 1, "device": "cpu"}
    if stage == "align":
        cfg.update(content_per_example=2, relation_per_example=2)
    else:
        cfg.update(group_size=3, reasoning_budget=6, max_inspections=1, beta=0.05, num_iterations=2, lora={"r": 4, "alpha": 8})
    config = setup.tmp / f"{stage}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    one, two = setup.tmp / f"{stage}-one", setup.tmp / f"{stage}-two"
    for launcher, out in (([sys.executable], one), (torchrun(free_port()), two)):
        cmd = launcher + ["-m", "training.cli", "train", stage, "--config", str(config), "--set", f"output_dir={out}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-6000:]
    rows, ref = metrics(two), metrics(one)
    assert len(rows) == len(ref) == 2
    for r, q in zip(rows, ref):
        assert r.keys() == q.keys() and all(r[k] == pytest.approx(q[k], rel=1e-5, abs=1e-5) for k in r), (r, q)
    assert_close_weights(load_file(str(two / "checkpoint-000002" / "trainable.safetensors")),
                         load_file(str(one / "checkpoint-000002" / "trainable.safetensors")))
