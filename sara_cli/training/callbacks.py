"""The Trainer callbacks sara adds: SORSA's regulariser step, SIGINT/SIGTERM handling, the
logging/save/eval cadence a resume may change, and trainer_log.jsonl."""

from __future__ import annotations

import signal
from pathlib import Path

from transformers import TrainerCallback


class SorsaCallback(TrainerCallback):
    """SORSA's orthonormal regulariser, once per optimizer step (docs/methods.md section 3.3).

    reference (the SORSA code's trainer): after gradient clipping, before optimizer.step(), add
    grad of (gamma / learning_rate) * L_reg, L_reg = mean of the 2L norms over L layers, so the
    optimizer (AdamW) sees it. decoupled: after optimizer.step(), W_p <- W_p - gamma * grad R per
    layer, outside the optimizer. The log gets L_reg as `orthonormality`, as the SORSA code's does.
    """

    def __init__(self, layers, gamma: float, update: str = "reference"):
        if update not in ("reference", "decoupled"):
            raise ValueError(f"update must be reference or decoupled, got {update!r}")
        self.layers = list(layers)
        self.gamma = gamma
        self.update = update

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # transformers calls this after clipping, where the SORSA trainer adds its regulariser
        if self.update == "reference" and self.gamma > 0:
            scale = self.gamma / args.learning_rate / (2 * len(self.layers))
            for layer in self.layers:
                layer.add_orthonormal_gradient(scale)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.update == "decoupled":
            for layer in self.layers:
                layer.orthonormal_step(self.gamma)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.layers:
            norms = [norm for layer in self.layers for _, _, norm in layer.orthonormal_gradients()]
            logs["orthonormality"] = sum(norms) / len(norms)


class SignalCallback(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.received = signum

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            control.should_save = True
            control.should_training_stop = True

    def _any_rank_received(self, args) -> bool:
        """Under DDP every rank must stop at the same step, or the others wait forever in the
        next all-reduce; torchrun forwards the signal to each worker, not at the same moment."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received is not None
        import torch

        flag = torch.tensor([0 if self.received is None else 1], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = signal.SIGTERM  # a peer was signalled; stop with it
        return bool(flag.item())

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (also after a crash, when on_train_end never runs)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class CadenceCallback(TrainerCallback):
    """Apply the recipe's logging, eval and save steps also on a resume.

    The Trainer restores them from the checkpoint's trainer_state.json; a resume may change
    them (they cannot change the result), and recipe.yaml records the new values.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


class LogCallback(TrainerCallback):
    """Append every log record to trainer_log.jsonl (main process only)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        import json

        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
