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
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from retrv_r1_plugin.model import RetrvR1Model

from .config import RunConfig
from .params import load_trainable_state, param_groups, trainable_parameters, trainable_state
from .plots import plot_curves

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "DataOrder", "load_model", "atomic_directory", "latest_checkpoint", "FINAL_DIR"]

FINAL_DIR = "final"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "trainable.safetensors"
MODEL_DIR = "model"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}")
    return table[name]


def load_model(cfg: RunConfig, device: torch.device | str | None = None) -> RetrvR1Model:
    """Load ``cfg.init_from`` (checkpoint, backbone, ``pkg:...`` or ``tiny:<kind>[:seed]``)."""
    source = cfg.init_from
    overrides = dict(cfg.model_overrides)
    torch.manual_seed(cfg.seed)  # a fresh ICM (plain backbone) starts the same on every run
    if source.startswith("tiny:"):
        from retrv_r1_plugin.testing import build_tiny_text_backbone, build_tiny_vl_backbone

        kind, _, seed = source[len("tiny:"):].partition(":")
        seed_i = int(seed) if seed else cfg.seed
        backbone = build_tiny_text_backbone(seed_i) if kind == "text" else build_tiny_vl_backbone(kind, seed_i)
        if cfg.dtype is not None:
            backbone.model.to(_dtype(cfg.dtype))
        torch.manual_seed(cfg.seed)
        model = RetrvR1Model.from_backbone(backbone, **overrides)
    else:
        model = RetrvR1Model.from_pretrained(source, gguf_file=cfg.gguf_file, dtype=_dtype(cfg.dtype), **overrides)
    if device is not None:
        model.to(device)
    return model.eval()


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
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


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
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Base class of the stage trainers; subclasses implement :meth:`setup` and :meth:`train_step`."""

    stage = "base"

    def __init__(self, cfg: RunConfig, model: RetrvR1Model | None = None) -> None:
        from accelerate import Accelerator

        cfg.validate()
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.output_dir)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        torch.manual_seed(cfg.seed)
        self.accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
        self.device = self.accelerator.device
        self.model = model if model is not None else load_model(cfg)
        self.model.to(self.device)
        self.model.eval()
        torch.manual_seed(cfg.seed)
        self.setup()
        self.trainable_names = [n for n, _ in trainable_parameters(self.model)]
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = self._scheduler()
        self.history: list[dict[str, Any]] = []
        self.step = 0

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

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        self.accelerator.backward(loss, **kwargs)

    def update(self) -> float:
        """Clip, step the optimizer and the scheduler, clear gradients; returns the grad norm."""
        params = [p for _, p in trainable_parameters(self.model)]
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
        ckpt = latest_checkpoint(self.out)
        if resume:
            if ckpt is None:
                logger.warning("--resume: no checkpoint in %s, starting from step 0", self.out)
            else:
                self.load_checkpoint(ckpt)
        elif ckpt is not None and self.step == 0:
            raise ValueError(f"{self.out} already holds checkpoints ({ckpt.name}): resume them (--resume) or choose another output_dir")
        (self.out / f"{self.stage}_config.yaml").write_text(yaml.safe_dump(asdict(self.cfg), sort_keys=True))
        self._rewrite_metrics()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.stage, disable=not self.cfg.progress, dynamic_ncols=True)
        try:
            while self.step < self.cfg.steps:
                metrics = self.train_step(self.step)
                self.step += 1
                row = {"step": self.step, "lr": self.lr, **metrics}
                self.history.append(row)
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
        with atomic_directory(final) as tmp:
            self.model.save_pretrained(tmp)
        self.plot()
        return final

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
        path = self.out / f"{CHECKPOINT_PREFIX}{self.step:06d}"
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
            if self.cfg.save_model_in_checkpoints:
                self.model.save_pretrained(tmp / MODEL_DIR)
        self._prune()
        self.plot()
        return path

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        ckpts = sorted(self.out.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: p.name)
        for old in ckpts[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, RNG, step and history from ``path``."""
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
        if state.get("stage") != self.stage:
            raise ValueError(f"{path} is a {state.get('stage')!r} checkpoint, not {self.stage!r}")
        if list(state["trainable"]) != self.trainable_names:
            raise ValueError(f"{path}: its trainable parameters differ from this run's (was the config changed?)")
        load_trainable_state(self.model, load_file(str(path / WEIGHTS_FILE)), self.trainable_names)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.model.invalidate_signature()
        logger.info("resumed %s from %s at step %d", self.stage, path, self.step)
