"""The Trainer subclass and its arguments: adapter-only checkpoints that appear at their final path
by rename, FSDP/DeepSpeed gathering of the adapter, and a recipe's `train` section as
`TrainingArguments`."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from transformers import Trainer

from sara_cli.adapters import checkpoint
from sara_cli.training import distributed
from sara_cli.training.rundir import STAGING


@contextmanager
def quantized_base_allowed():
    """transformers refuses to train a 4-bit/8-bit model unless PEFT wraps it ("purely quantized
    models"). A base carrying sara adapters is what that check asks for, so while our Trainer is
    built it passes models that have adapter layers and checks every other one as before."""
    import transformers.trainer as hf_trainer

    from sara_cli.adapters.inject import adapter_layers

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
        from sara_cli.adapters.inject import is_adapter_parameter

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
        except BaseException:  # a full disk, say: a half-written checkpoint never stays
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
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
