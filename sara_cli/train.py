"""`sara train`: recipe -> model -> adapters -> transformers' Trainer -> adapter folder.

The Trainer brings mixed precision, gradient accumulation, schedulers, checkpoints and
DDP/FSDP/DeepSpeed under torchrun or accelerate. sara adds what is specific to it: adapter-only
checkpoints written atomically, SORSA's regulariser step, SIGINT/SIGTERM handling, logs.
"""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from transformers import Trainer, TrainerCallback

from sara_cli import builtin, checkpoint, distributed, loading, quantize
from sara_cli.errors import SaraError
from sara_cli.files import atomic_dir, check_writable, write_text
from sara_cli.recipe import check_report_to
from sara_cli.rundir import (CHECKPOINT, LOG_NAME, STAGING, is_main_process, locked, plan_output,
                             prepare_output, remove_previous, saved_recipe, trim_log)



class Interrupted(SaraError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint (not a user error)."""

    exit_code = 130
    label = "stopped"


# -- callbacks -------------------------------------------------------------------------------------

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


# -- the trainer -----------------------------------------------------------------------------------

@contextmanager
def quantized_base_allowed():
    """transformers refuses to train a 4-bit/8-bit model unless PEFT wraps it ("purely quantized
    models"). A base carrying sara adapters is what that check asks for, so while our Trainer is
    built it passes models that have adapter layers and checks every other one as before."""
    import transformers.trainer as hf_trainer

    from sara_cli.inject import adapter_layers

    check = hf_trainer.validate_quantization_for_training
    hf_trainer.validate_quantization_for_training = lambda model: None if adapter_layers(model) else check(model)
    try:
        yield
    finally:
        hf_trainer.validate_quantization_for_training = check


class SaraTrainer(Trainer):
    """Trainer whose checkpoints hold only the adapter, appearing at their final path by rename."""

    def __init__(self, *args, adapter_meta: dict, **kwargs):
        with quantized_base_allowed():
            super().__init__(*args, **kwargs)
        self.adapter_meta = adapter_meta

    def _save(self, output_dir=None, state_dict=None):
        from sara_cli.inject import is_adapter_parameter

        if not self.args.should_save:  # DDP: rank 0 alone writes the adapter
            return
        tensors = None
        if state_dict:  # FSDP / DeepSpeed hand over a gathered state dict
            tensors = {k: v for k, v in state_dict.items() if is_adapter_parameter(k)}
        checkpoint.save_adapter(self.model, Path(output_dir or self.args.output_dir), self.adapter_meta,
                                tensors=tensors)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if distributed.enable_fsdp_on_cpu(self.accelerator):  # accelerate would run DDP instead
            self.is_fsdp_enabled = True

    def save_model(self, output_dir=None, _internal_call=False):
        if not distributed.gathers_adapter(self):
            return super().save_model(output_dir, _internal_call)
        # Gather the adapter only (a collective on every rank), not the sharded base.
        tensors = distributed.gather_adapter_tensors(self.model)
        if self.args.should_save:
            checkpoint.save_adapter(self.model, Path(output_dir or self.args.output_dir), self.adapter_meta,
                                    tensors=tensors)

    def _save_optimizer_and_scheduler(self, output_dir):
        """Under FSDP the Trainer also writes the whole sharded model (the frozen base included)
        into every checkpoint, for resuming. sara resumes from adapter_model.safetensors, so that
        copy is skipped; the optimizer, scheduler and RNG states are saved as usual."""
        import transformers.trainer as hf_trainer

        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_model = hf_trainer.save_fsdp_model
        hf_trainer.save_fsdp_model = lambda *args, **kwargs: None
        try:
            return super()._save_optimizer_and_scheduler(output_dir)
        finally:
            hf_trainer.save_fsdp_model = save_model

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Nothing to do: `build` attached this checkpoint's adapter before the model was wrapped
        (under FSDP the Trainer calls this after sharding, when a plain copy no longer fits)."""

    def _save_checkpoint(self, model, trial):
        from transformers.trainer import rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        staging = run_dir / STAGING
        original = self._get_output_dir
        self._get_output_dir = lambda trial=None: str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = original
        # Every rank writes its own RNG state into the staging folder: rename only when all are done.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            target = run_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            try:
                staging.rmdir()
            except OSError:
                pass
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=None, use_mtime=False)


def training_arguments(recipe, output_dir: Path, has_eval: bool, use_cuda: bool):
    from transformers import TrainingArguments

    t = recipe.train
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    bf16 = t.bf16 if t.bf16 is not None else (use_cuda and _bf16_supported())
    warmup = t.warmup_ratio if t.warmup_ratio is not None else t.warmup_steps  # v5: < 1 is a ratio
    return TrainingArguments(
        output_dir=str(output_dir), learning_rate=t.learning_rate, num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=warmup, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        label_smoothing_factor=t.label_smoothing_factor, optim=t.optim, bf16=bf16, fp16=t.fp16,
        **_checkpointing(t.gradient_checkpointing),
        seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps, save_strategy="steps",
        save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no", eval_steps=(t.eval_steps or t.save_steps) if has_eval else None,
        report_to=t.report_to, dataloader_num_workers=t.dataloader_num_workers,
        ddp_backend=t.ddp_backend or (None if use_cuda or not multi_process else "gloo"), disable_tqdm=True,
        # Every adapter parameter takes part in every forward; the default (True without
        # checkpointing) only adds a graph traversal per step and a warning per rank.
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        use_cpu=not use_cuda,
    )


def _checkpointing(enabled: bool) -> dict:
    """Non-reentrant activation checkpointing, under this transformers version's argument name.

    Non-reentrant checkpointing gives the adapters gradients although the frozen base's
    inputs need none (the reentrant variant would silently train nothing).
    """
    import dataclasses

    from transformers import TrainingArguments

    if not enabled:
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def build(recipe, initialize_from: Path | None = None):
    """Load the base and wrap it with adapters (fresh, or from a checkpoint's saved state).

    Returns (model, tokenizer, layers, meta).
    """
    from transformers import set_seed

    from sara_cli.initialize import CheckpointWeights

    compute = quantize.compute_dtype(recipe.train)
    # Moved after loading rather than loaded with a device_map: the Trainer and accelerate
    # treat device-mapped models as model-parallel, which DDP refuses. Under FSDP's RAM-efficient
    # loading the base stays where it loaded (meta on ranks > 0): accelerate places the shards.
    device = None if distributed.ram_efficient_loading() else loading.training_device()
    model, tokenizer, model_dir = loading.load_base_model(recipe.model, device, device_map=False,
                                                          compute_dtype=compute)
    if quantize.mode(recipe.model):
        quantize.prepare_for_training(model)
    set_seed(recipe.train.seed)
    # Init reads W from the files, never from the loaded model; each rank decomposes on its own GPU.
    weights = CheckpointWeights(model_dir, device=loading.training_device())
    layers = add_adapters(model, recipe, weights, initialize_from)
    meta = {
        "method": recipe.adapter.method,
        "options": recipe.adapter.layer_options(),
        "targets": list(layers),
        "base_model": {"name_or_path": recipe.model.name_or_path, "revision": recipe.model.revision,
                       "path": str(model_dir), "dtype": recipe.model.dtype,
                       "trust_remote_code": recipe.model.trust_remote_code,
                       "fingerprint": weights.fingerprint,
                       "quantization": quantize.mode(recipe.model), "compute_dtype": compute,
                       # Where a converted built-in's weights came from (package, file, sha256).
                       "source": builtin.source_info(model_dir)},
        "recipe": saved_recipe(recipe),
    }
    errors = {name: layer.quantization_error for name, layer in layers.items()
              if getattr(layer, "quantization_error", None)}
    if errors:  # PiSSA/SORSA on a quantized base: the QPiSSA residual against quantizing W
        meta["quantization_error"] = errors
    return model, tokenizer, layers, meta


def add_adapters(model, recipe, weights, initialize_from: Path | None = None) -> dict:
    """Fresh adapters, or a checkpoint's, identical on every rank (see distributed.py).

    Returns {module name: layer}.
    """
    from sara_cli.inject import inject_adapters

    sharing = distributed.ram_efficient_loading() and distributed.is_initialized()
    on_meta = sharing and not is_main_process()  # this rank's base is on the meta device
    if initialize_from is not None:  # on meta there is nothing to compute: rank 0's tensors arrive
        return checkpoint.attach_adapter(model, initialize_from, None if on_meta else weights)
    method, options, targets = recipe.adapter.method, recipe.adapter.layer_options(), recipe.adapter.targets
    if on_meta:
        return inject_adapters(model, method, options, targets, ranks=distributed.share_ranks(None),
                               initialize=False)
    layers = inject_adapters(model, method, options, targets, weights=weights)
    if sharing:
        distributed.share_ranks({name: layer.rank() for name, layer in layers.items()})
    elif distributed.is_initialized():
        distributed.check_identical(layers, loading.training_device())
    return layers


def train(recipe, resume: bool = True, overwrite: bool = False, dry_run: bool = False, reporter=None) -> dict:
    """Run a recipe end to end. Returns a summary dict (output folder, steps, final loss, size).

    The output folder is locked for the whole run (not for a dry run, which writes nothing).

    Raises:
        SaraError: any user-fixable problem, another run holding the folder; Interrupted after
            SIGINT/SIGTERM (a checkpoint is saved).
    """
    from contextlib import nullcontext

    check_report_to(recipe.train.report_to)  # also checked by the CLI, before heavy imports
    quantize.check_available(recipe.model)
    distributed.check_supported(quantize.mode(recipe.model))
    output_dir = Path(recipe.train.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise SaraError(f"train.output_dir {output_dir} is a file; give a folder path")
    check_writable(output_dir, "train.output_dir")
    with nullcontext() if dry_run else locked(output_dir):
        return _train(recipe, output_dir, resume, overwrite, dry_run, reporter)


def _train(recipe, output_dir: Path, resume: bool, overwrite: bool, dry_run: bool, reporter) -> dict:
    import torch
    import yaml
    from transformers import DataCollatorForSeq2Seq
    from transformers.trainer_callback import PrinterCallback

    from sara_cli.data import load_split, tokenize_split

    resolved = saved_recipe(recipe)
    plan = plan_output(output_dir, resume, overwrite, resolved)
    use_cuda = torch.cuda.is_available()
    if reporter and is_main_process():
        for notice in plan.notices:
            reporter.notice(notice)
        if not use_cuda:
            reporter.notice("no CUDA GPU: training on the CPU in float32 (fine for the quickstart, slow for real models)")
    import datasets

    datasets.disable_progress_bars()
    records = load_split(recipe.data, recipe.train.seed)  # bad data fails before the model loads
    # Before the model loads: this starts the process group, which FSDP's RAM-efficient loading
    # needs to know which rank holds the weights.
    has_eval = bool(records.evaluation) or bool(recipe.data.val_set_size)
    args = training_arguments(recipe, output_dir, has_eval, use_cuda)
    model, tokenizer, layers, meta = build(recipe, initialize_from=plan.resume_from)
    if reporter:
        reporter.built(recipe, model, layers, meta)
    data = tokenize_split(records, recipe.data, tokenizer, recipe.train.seed)  # a dry run checks data too
    train_set, eval_set = data.train, data.evaluation
    if reporter and is_main_process():
        reporter.data(data.stats, recipe.data)
    model.config.use_cache = False  # also what lets packed records keep to themselves
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8 if use_cuda else None,
                                      label_pad_token_id=-100, return_tensors="pt", padding=True)
    if recipe.data.packing:
        from sara_cli import packing

        collator = packing.collator_for(model, tokenizer)
        packing.check_isolation(model, collator)
    if dry_run:
        return {"dry_run": True, "layers": {n: l.rank() for n, l in layers.items()},
                "train_records": data.stats["train"].records,
                "eval_records": data.stats["eval"].records if "eval" in data.stats else 0}
    prepare_output(plan)
    if is_main_process():
        write_text(output_dir / checkpoint.RECIPE_NAME, yaml.safe_dump(resolved, sort_keys=False))
        if plan.resume_from is None:
            (output_dir / LOG_NAME).unlink(missing_ok=True)
        else:
            trim_log(output_dir / LOG_NAME, int(CHECKPOINT.match(plan.resume_from.name).group(1)))
    signals = SignalCallback()
    log = LogCallback(output_dir / LOG_NAME)
    callbacks = [signals, CadenceCallback(), log]
    if recipe.adapter.method == "sorsa":
        callbacks.insert(0, SorsaCallback(layers.values(), recipe.adapter.gamma, recipe.adapter.sorsa_update))
    if reporter:
        callbacks.append(reporter.progress_callback())
    trainer = SaraTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
                          adapter_meta=meta)
    trainer.remove_callback(PrinterCallback)
    try:
        result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    finally:
        signals.restore()
    if trainer.is_world_process_zero():
        plot_losses(output_dir)
    if signals.received is not None:
        raise Interrupted(f"stopped by {signal.Signals(signals.received).name} at step "
                          f"{trainer.state.global_step}; checkpoint saved in {output_dir}. "
                          "Rerun the same command to resume")
    size = 0
    tensors = distributed.gather_adapter_tensors(model) if distributed.gathers_adapter(trainer) else None
    if trainer.is_world_process_zero():
        with atomic_dir(output_dir / "adapter", overwrite=True) as staging:
            size = checkpoint.save_adapter(model, staging, meta, tensors=tensors)
        if plan.previous is not None:
            kept = remove_previous(plan.previous)
            if kept and reporter:
                reporter.notice(f"kept {', '.join(str(p) for p in kept)}: not made by sara train")
    return {"output_dir": str(output_dir), "adapter_dir": str(output_dir / "adapter"),
            "steps": trainer.state.global_step, "train_loss": result.training_loss,
            "first_loss": next((r["loss"] for r in log.records if "loss" in r), None),
            "last_loss": next((r["loss"] for r in reversed(log.records) if "loss" in r), None),
            "adapter_bytes": size}


def plot_losses(output_dir: Path) -> None:
    """loss.png: training (and eval) loss against step, from trainer_log.jsonl."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sara_cli.files import atomic_path

    path = output_dir / LOG_NAME
    if not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(output_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(output_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
