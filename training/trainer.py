"""The loop the three stages share: model loading, optimizer, checkpoints, resume, curves.

Plain PyTorch + transformers, with accelerate for device placement, autocast (mixed
precision) and backward. One sequence is run at a time and gradients are accumulated over
a step's ``batch_size`` examples (the sequences differ in length and structure).

Checkpoints (every ``save_every`` steps and at the end) are written to a temporary
directory and moved into place with ``os.replace``, so a crash never leaves a half-written
``checkpoint-NNNNNN``. Each holds the trainable weights exactly (``trainable.safetensors``),
the optimizer, scheduler, RNG states, step and data order (``trainer_state.pt``), and,
when ``save_model_in_checkpoints``, a loadable model (``model/``). ``resume`` restarts from
the latest one and continues exactly as an uninterrupted run would: the data order, the
per-step sampling seeds and the curriculum are all functions of the step.

The model stays in ``eval()`` mode during training: no dropout, so log-probs recomputed for
the loss equal those of sampling (GRPO's ratio starts at exactly 1).

Data parallelism: under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1) every
process holds the whole model and takes a contiguous, disjoint block of each step's
examples (:meth:`Trainer.local_positions`, a function of the step and the rank). The stages
divide their losses by denominators of the *global* batch, so :meth:`Trainer.update` sums
the trainable parameters' gradients over the processes (``all_reduce``) and every process
steps with the gradient a single process would compute for the same batch. Metrics are
gathered per example (:meth:`Trainer.gather`) and computed in the single-process order.
Only the main process writes checkpoints, ``metrics.jsonl``, curves and ``final/``; the others
wait at barriers. With one process nothing of this runs and the loop is unchanged.

Test hook: ``RETRV_R1_TEST_KILL_DURING_SAVE=<step>`` makes the process SIGKILL itself while
it writes the checkpoint of that step (after the weights and the trainer state are in the
temporary directory, before the rename), to test recovery from a crash during a save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from retrv_r1_plugin.model import RetrvR1Model
from retrv_r1_plugin.progress import hub_progress

from .config import RunConfig, _PolicyConfig
from .params import load_trainable_state, param_groups, prepare_gradients, trainable_parameters, trainable_state
from .plots import plot_curves

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "DataOrder", "load_model", "atomic_directory", "latest_checkpoint", "recover_output_dir", "warn_ignored_images", "FINAL_DIR"]

FINAL_DIR = "final"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "trainable.safetensors"
MODEL_DIR = "model"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
KILL_DURING_SAVE_ENV = "RETRV_R1_TEST_KILL_DURING_SAVE"
"""Test hook: the step whose checkpoint write is interrupted by SIGKILL (see the module docstring)."""
_GRAD_BUCKET = 1 << 24  # elements per all_reduce of flattened gradients


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}")
    return table[name]


def check_model_dir(source: str, what: str = "init_from") -> None:
    """Refuse, naming the model inside, a training run's folder given where a model goes.

    A stage's ``output_dir`` holds its model in ``final/`` and a ``checkpoint-N`` holds one in
    ``model/``; loading the folder itself failed with transformers' "Unrecognized model ...
    Should have a `model_type` key in its config.json"."""
    from retrv_r1_plugin.config import CONFIG_NAME

    p = Path(source)
    if not p.is_dir() or (p / CONFIG_NAME).is_file() or (p / "config.json").is_file():
        return
    if (p / STATE_FILE).is_file():
        inside = f"its model is {p / MODEL_DIR}" if (p / MODEL_DIR / CONFIG_NAME).is_file() else \
            "it holds no model (save_model_in_checkpoints: false); use the run's final/"
        raise ValueError(f"{what} {source!r} is a training checkpoint (what --resume reads), not a model: {inside}")
    if (p / FINAL_DIR / CONFIG_NAME).is_file():
        raise ValueError(f"{what} {source!r} is a training run's output_dir, not a model: its model is {p / FINAL_DIR}")
    ckpt = latest_checkpoint(p)
    if ckpt is not None:
        inside = f"{ckpt / MODEL_DIR}, or " if (ckpt / MODEL_DIR / CONFIG_NAME).is_file() else ""
        raise ValueError(f"{what} {source!r} is the output_dir of a training run that has not finished (no final/): "
                         f"use {inside}finish the run with --resume")


def load_model(cfg: RunConfig, device: torch.device | str | None = None) -> RetrvR1Model:
    """Load ``cfg.init_from`` (checkpoint, backbone, ``pkg:...`` or ``tiny:<kind>[:seed[:layers]]``)."""
    source = cfg.init_from
    check_model_dir(source)
    overrides = dict(cfg.model_overrides)
    torch.manual_seed(cfg.seed)  # a fresh ICM (plain backbone) starts the same on every run
    if source.startswith("tiny:"):
        from retrv_r1_plugin.testing import build_tiny_text_backbone, build_tiny_vl_backbone

        # tiny:<kind>[:seed[:layers[:init_std]]]; kind text or a Qwen-VL model type; init_std a
        # number or "scaled" (1/sqrt(width): what training from scratch needs, see testing.py)
        kind, *rest = source[len("tiny:"):].split(":")
        seed_i = int(rest[0]) if rest and rest[0] else cfg.seed
        layers = int(rest[1]) if len(rest) > 1 and rest[1] else 2
        init_std = rest[2] if len(rest) > 2 and rest[2] else None  # checked by the builder
        if kind == "text":
            backbone = build_tiny_text_backbone(seed_i, num_layers=layers, init_std=init_std)
        else:
            backbone = build_tiny_vl_backbone(kind, seed_i, num_layers=layers, init_std=init_std)
        if cfg.dtype is not None:
            backbone.model.to(_dtype(cfg.dtype))
        torch.manual_seed(cfg.seed)
        model = RetrvR1Model.from_backbone(backbone, **overrides)
    elif cfg.vision_graft is not None:
        model = _grafted_model(cfg, overrides)
    else:
        model = RetrvR1Model.from_pretrained(source, gguf_file=cfg.gguf_file, dtype=_dtype(cfg.dtype), **overrides)
    if device is not None:
        model.to(device)
    return model.eval()


def _grafted_model(cfg: RunConfig, overrides: dict[str, Any]) -> RetrvR1Model:
    """A fresh Retrv-R1 model on a Qwen2.5-VL graft of the text backbone ``cfg.init_from``."""
    from retrv_r1_plugin.backbone import load_backbone
    from retrv_r1_plugin.config import CONFIG_NAME
    from retrv_r1_plugin.graft import VisionGraftConfig, graft_vision_tower
    from retrv_r1_plugin.model import bundled_checkpoint

    source = cfg.init_from
    if bundled_checkpoint(source) is not None or (Path(source) / CONFIG_NAME).is_file():
        raise ValueError(f"vision_graft needs a plain text backbone as init_from, not the Retrv-R1 checkpoint {source!r}")
    vision = VisionGraftConfig(**cfg.vision_graft)
    text = load_backbone(source, gguf_file=cfg.gguf_file, dtype=_dtype(cfg.dtype))
    max_pixels = overrides.get("image_max_pixels")
    backbone = graft_vision_tower(text, vision, max_pixels=max_pixels)
    torch.manual_seed(cfg.seed)
    return RetrvR1Model.from_backbone(backbone, backbone_source=source, gguf_file=cfg.gguf_file, vision_graft=vision.to_dict(), **overrides)


def warn_ignored_images(model: RetrvR1Model, examples: list) -> int:
    """Log one warning when a text-only backbone will train on examples that carry images.

    Inference records such an image in its notes; training builds its prompts without them,
    so the images would be dropped in silence and the model trained on the text alone.
    Returns the number of such examples.
    """
    if model.backbone.is_vision:
        return 0
    n = sum(1 for ex in examples if ex.query_image or any(c.image for c in ex.candidates))
    if n:
        logger.warning("%d of %d examples carry images, but backbone %r is text-only: it ignores them and trains on their "
                       "text alone (use a Qwen-VL backbone or a vision_graft to train on images)", n, len(examples), model.backbone.model_type)
    return n


def check_candidate_counts(model: RetrvR1Model, examples: list, data: str | os.PathLike) -> None:
    """Refuse, before the first step, examples with more candidates than the model has labels.

    Ranking such an example fails, so without this check a run would stop at the first step
    that draws one (after hours, with a data file that mixes K). The error names the file,
    the first such example and what to change."""
    limit = model.config.max_candidates
    over = [ex for ex in examples if ex.k > limit]
    if over:
        first = over[0]
        raise ValueError(
            f"{data}: {len(over)} of {len(examples)} examples have more candidates than the model's {limit} index labels "
            f"(max_candidates), e.g. example {first.id!r} with {first.k}; rebuild the examples with "
            f"`data examples --k {limit}` (and their traces with `data cot`), or train a model with more labels"
        )


class DataOrder:
    """A seeded permutation per epoch; the examples of step ``s`` are a function of ``s`` only."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("no training data")
        self.size, self.seed = size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.size, generator=g).tolist()
        return self._perms[epoch]

    def indices(self, step: int, batch_size: int) -> list[int]:
        out = []
        for j in range(step * batch_size, (step + 1) * batch_size):
            out.append(self._perm(j // self.size)[j % self.size])
        return out

    def state(self, step: int, batch_size: int) -> dict[str, int]:
        consumed = step * batch_size
        return {"size": self.size, "seed": self.seed, "epoch": consumed // self.size, "position": consumed % self.size}


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, if any."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file() and (p / WEIGHTS_FILE).is_file()]
    found = [p for p in found if p.name[len(CHECKPOINT_PREFIX):].isdigit()]  # not checkpoint-foo or checkpoint-000004.bak
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def recover_output_dir(output_dir: str | os.PathLike) -> list[str]:
    """Clean up what a killed run left in ``output_dir``; returns what was done (for the log).

    * ``.tmp-NAME-PID``: a write :func:`atomic_directory` never finished (the process died
      before the rename): removed. Such directories are never read as checkpoints.
    * ``.old-NAME-PID``: the previous ``NAME`` set aside while a new one replaced it. If the
      process died between the two renames, ``NAME`` is missing and this complete copy is
      moved back; otherwise it is removed.
    * ``.trash-NAME-PID``: a pruned checkpoint whose deletion was cut short: removed.

    Directories of a still-running process (another PID that is alive) are left alone.
    """
    out = Path(output_dir)
    done: list[str] = []
    if not out.is_dir():
        return done
    for p in sorted(out.iterdir()):
        kind = next((k for k in ("tmp", "old", "trash") if p.name.startswith(f".{k}-")), None)
        if kind is None or not p.is_dir():
            continue
        name, _, pid = p.name[len(kind) + 2:].rpartition("-")
        if not name or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            logger.warning("%s: left in place, process %s is still running", p, pid)
            continue
        if kind == "old" and not (out / name).exists():
            os.replace(p, out / name)
            done.append(f"restored {name} from {p.name}")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
    return done


def _numpy_safe_globals() -> list[Any]:
    """What a trainer state's NumPy RNG state (``np.random.get_state()``: a uint32 array) needs
    besides tensors and plain containers under ``torch.load(weights_only=True)``."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    found: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct,
                        (reconstruct, "numpy.core.multiarray._reconstruct")]  # a state saved under NumPy 1
    return found


def load_trainer_state(file: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.pt``, read with ``torch.load(weights_only=True)``:
    tensors, numbers, strings, containers and NumPy's RNG state only, so a checkpoint folder
    from elsewhere cannot run code on ``--resume`` (a pickle can). A file holding anything
    else is a ``ValueError`` naming it."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{file}: not a trainer state this code wrote (refused by safe loading, which runs no "
                         f"code from the file: {first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: not a trainer state (a {type(state).__name__}, not a mapping)")
    return state


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the saving process saw: a run saved where 8 GPUs were visible
        # resumes where fewer are (set_rng_state_all would index past the last device)
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


class Trainer:
    """Base class of the stage trainers; subclasses implement :meth:`setup` and :meth:`train_step`."""

    stage = "base"

    def __init__(self, cfg: RunConfig, model: RetrvR1Model | None = None) -> None:
        from accelerate import Accelerator

        cfg.validate()
        if cfg.device == "cuda" and not torch.cuda.is_available():
            # accelerate would quietly run on the CPU: a GPU run must not turn into a CPU one unnoticed
            raise ValueError("device: cuda, but no CUDA device is available (use device: auto or cpu)")
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.output_dir)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        torch.manual_seed(cfg.seed)
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # accelerate launch / torchrun
        # several processes without a GPU: accelerate needs cpu=True to pick gloo (MULTI_CPU)
        cpu = cfg.device == "cpu" or (launched and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)
        self.device = self.accelerator.device
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        with hub_progress(cfg.progress):
            self.model = model if model is not None else load_model(cfg)
            self.model.to(self.device)
            self.model.eval()
            self._record_generation_defaults()
            torch.manual_seed(cfg.seed)
            self.setup()
        self.trainable_names = [n for n, _ in trainable_parameters(self.model)]
        if self.distributed:
            self._sync_trainable()
            if cfg.batch_size % self.world_size:
                logger.warning("batch_size=%d is not a multiple of the %d processes: their shares differ", cfg.batch_size, self.world_size)
            logger.info("data parallel: process %d of %d on %s", self.rank, self.world_size, self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = self._scheduler()
        self.history: list[dict[str, Any]] = []
        self.step = 0

    def _record_generation_defaults(self) -> None:
        """A policy stage (sft, rl) trains under a reasoning budget, an inspection cap and a
        compression mode; the checkpoints it writes rank under the same ones by default (a
        model trained to reason for 96 tokens would otherwise be asked to answer directly)."""
        cfg = self.cfg
        if isinstance(cfg, _PolicyConfig):
            conf = self.model.config
            conf.reasoning_budget, conf.max_inspections, conf.compression = cfg.reasoning_budget, cfg.max_inspections, cfg.compression

    # ---------------------------------------------------------------- to override
    def setup(self) -> None:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        """Run one step (forward, backward and :meth:`update` calls); return its metrics."""
        raise NotImplementedError

    def total_updates(self) -> int:
        return self.cfg.steps

    # ---------------------------------------------------------------- helpers
    def _scheduler(self):
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[self.cfg.scheduler]
        return get_scheduler(name, self.optimizer, num_warmup_steps=self.cfg.warmup_steps, num_training_steps=self.total_updates())

    # ---------------------------------------------------------------- data parallelism
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def local_positions(self, n: int) -> list[int]:
        """Positions (0..n-1) in a step's global batch of ``n`` examples that this process runs.

        A contiguous block by rank; the blocks are disjoint and cover the batch. One process: all.
        """
        return list(range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size))

    def gather(self, local: dict[int, Any], n: int) -> list[Any]:
        """Per-position values (picklable) from every process, in global batch order."""
        if not self.distributed:
            return [local[j] for j in range(n)]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, local)
        merged: dict[int, Any] = {}
        for part in parts:
            merged.update(part)
        return [merged[j] for j in range(n)]

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def _sync_trainable(self) -> None:
        """Start every process from the main process's trainable weights."""
        import torch.distributed as dist

        with torch.no_grad():
            for _, p in trainable_parameters(self.model):
                dist.broadcast(p.data, src=0)

    def _all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over the processes (each holds its share of the global batch's loss).

        A parameter no process has a gradient for keeps ``grad is None`` (the optimizer skips
        it, as with one process); one that some process lacks gets zeros there.
        """
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        has = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        dist.all_reduce(has)
        grads: list[torch.Tensor] = []
        for p, h in zip(params, has.tolist()):
            if h == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        buckets: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
        for g in grads:
            lists = buckets.setdefault((g.dtype, g.device), [[]])
            if lists[-1] and sum(t.numel() for t in lists[-1]) + g.numel() > _GRAD_BUCKET:
                lists.append([])
            lists[-1].append(g)
        for lists in buckets.values():
            for bucket in lists:
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat)
                for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    g.copy_(reduced)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        self.accelerator.backward(loss, **kwargs)

    def update(self) -> float:
        """Clip, step the optimizer and the scheduler, clear gradients; returns the grad norm."""
        params = [p for _, p in trainable_parameters(self.model)]
        prepare_gradients(params)
        if self.distributed:
            self._all_reduce_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.invalidate_signature()
        return float(norm)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------- loop
    def train(self, resume: bool = False, stop_after: int | None = None) -> Path | None:
        """Train to ``cfg.steps``; returns the final model directory.

        ``stop_after`` ends the run after that many steps without writing ``final/``
        (an interruption, for tests); a later ``train(resume=True)`` continues it.
        """
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        if not resume and self.step == 0 and latest_checkpoint(self.out) is not None:
            self._refuse(latest_checkpoint(self.out))  # before any clean-up: a refused start changes nothing
        if self.is_main:
            for line in recover_output_dir(self.out):
                logger.warning("%s: %s (left by an interrupted run)", self.out, line)
        self.barrier()
        ckpt = latest_checkpoint(self.out)
        if resume:
            if ckpt is None:
                logger.warning("--resume: no checkpoint in %s, starting from step 0", self.out)
            else:
                self.load_checkpoint(ckpt)
        elif ckpt is not None and self.step == 0:
            self._refuse(ckpt)
        if self.is_main:
            (self.out / f"{self.stage}_config.yaml").write_text(yaml.safe_dump(asdict(self.cfg), sort_keys=True))
            self._rewrite_metrics()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.stage, disable=not self.cfg.progress or not self.is_main, dynamic_ncols=True)
        try:
            while self.step < self.cfg.steps:
                lr = self.lr  # the rate this step's (first) update uses: update() then advances the scheduler
                metrics = self.train_step(self.step)
                self.step += 1
                row = {"step": self.step, "lr": lr, **metrics}
                self.history.append(row)
                if self.is_main:
                    with open(self.out / METRICS_FILE, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4] if isinstance(v, (int, float))})
                if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                    self.save_checkpoint()
                if stop_after is not None and self.step >= stop_after and self.step < self.cfg.steps:
                    return None
        finally:
            bar.close()
        final = self.out / FINAL_DIR
        if self.is_main:
            with atomic_directory(final) as tmp, hub_progress(self.cfg.progress):
                self.model.save_pretrained(tmp)
            self.plot()
        self.barrier()
        return final

    def _refuse(self, ckpt: Path) -> None:
        raise ValueError(f"{self.out} already holds checkpoints ({ckpt.name}): resume them (--resume) or choose another output_dir")

    def plot(self) -> Path | None:
        try:
            return plot_curves(self.history, self.out / CURVES_FILE, title=f"{self.stage}: {self.out.name}")
        except Exception as exc:  # a plotting problem must never lose a run
            logger.warning("could not plot curves: %s", exc)
            return None

    def _rewrite_metrics(self) -> None:
        with open(self.out / METRICS_FILE, "w", encoding="utf-8") as fh:
            for row in self.history:
                fh.write(json.dumps(row) + "\n")

    # ---------------------------------------------------------------- checkpoints
    def data_state(self) -> dict[str, Any]:
        return {}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` (main process only; the others wait for it)."""
        path = self.out / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        if self.is_main:
            self._write_checkpoint(path)
        self.barrier()
        return path

    def _write_checkpoint(self, path: Path) -> None:
        with atomic_directory(path) as tmp:
            save_file(trainable_state(self.model), str(tmp / WEIGHTS_FILE))
            state = {
                "stage": self.stage,
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
                "history": self.history,
                "data": self.data_state(),
                "trainable": self.trainable_names,
                "config": asdict(self.cfg),
            }
            torch.save(state, tmp / STATE_FILE)
            if os.environ.get(KILL_DURING_SAVE_ENV, "") == str(self.step):  # test hook
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
            if self.cfg.save_model_in_checkpoints:
                with hub_progress(self.cfg.progress):
                    self.model.save_pretrained(tmp / MODEL_DIR)
        self._prune()
        self.plot()

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        # only the checkpoint-<step> folders this loop writes: never a user's checkpoint-notes.txt
        # or checkpoint-best/ that happens to sit in output_dir
        ckpts = sorted((p for p in self.out.glob(f"{CHECKPOINT_PREFIX}*")
                        if p.name[len(CHECKPOINT_PREFIX):].isdigit() and p.is_dir() and not p.is_symlink()),
                       key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
        for old in ckpts[: -self.cfg.keep_last]:
            # out of sight first: a kill during the deletion never leaves a half-deleted checkpoint
            trash = old.parent / f".trash-{old.name}-{os.getpid()}"
            try:
                os.replace(old, trash)
            except OSError:
                trash = old
            shutil.rmtree(trash, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, RNG, step and history from ``path``."""
        state = load_trainer_state(path / STATE_FILE)
        if state.get("stage") != self.stage:
            raise ValueError(f"{path} is a checkpoint of stage {state.get('stage')!r}, not {self.stage!r}")
        if list(state["trainable"]) != self.trainable_names:
            raise ValueError(f"{path}: its trainable parameters differ from this run's (was the config changed?)")
        # the examples of step s are a function of (data, seed, batch_size): with any of them
        # changed, the resumed run would silently train on another sequence of batches
        saved_cfg, saved_data, data = state.get("config", {}), state.get("data", {}), self.data_state()
        changed = [f"{k} {saved_cfg[k]!r} -> {getattr(self.cfg, k)!r}" for k in ("seed", "batch_size") if k in saved_cfg and saved_cfg[k] != getattr(self.cfg, k)]
        changed += [f"data {k} {saved_data[k]!r} -> {data[k]!r}" for k in ("size", "dropped_traces") if k in saved_data and k in data and saved_data[k] != data[k]]
        if changed:
            raise ValueError(f"{path}: cannot resume, the run differs from the checkpoint's: {'; '.join(changed)}")
        load_trainable_state(self.model, load_file(str(path / WEIGHTS_FILE)), self.trainable_names)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.model.invalidate_signature()
        logger.info("resumed %s from %s at step %d", self.stage, path, self.step)
