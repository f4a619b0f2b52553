"""`sara train`: recipe -> model -> adapters -> transformers' Trainer -> adapter folder.

The Trainer brings mixed precision, gradient accumulation, schedulers, checkpoints and
DDP/FSDP/DeepSpeed under torchrun or accelerate. sara adds what is specific to it: adapter-only
checkpoints written atomically, SORSA's regulariser step, SIGINT/SIGTERM handling, logs.
"""

from __future__ import annotations

import signal
from pathlib import Path

from sara_cli.model import builtin, loading, quantize
from sara_cli.adapters import checkpoint
from sara_cli.training import distributed
from sara_cli.errors import SaraError
from sara_cli.files import atomic_dir, check_apart, check_writable, no_space, write_text
from sara_cli.recipe import check_report_to
from sara_cli.training.rundir import (CHECKPOINT, LOG_NAME, is_main_process, locked, plan_output,
                             prepare_output, remove_previous, saved_recipe, trim_log)
from sara_cli.training.callbacks import CadenceCallback, LogCallback, SignalCallback, SorsaCallback
from sara_cli.training.trainer import SaraTrainer, training_arguments


class Interrupted(SaraError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint (not a user error)."""

    exit_code = 130
    label = "stopped"


def build(recipe, initialize_from: Path | None = None):
    """Load the base and wrap it with adapters (fresh, or from a checkpoint's saved state).

    Returns (model, tokenizer, layers, meta).
    """
    from transformers import set_seed

    from sara_cli.adapters.initialize import CheckpointWeights

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
    from sara_cli.adapters.inject import inject_adapters

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
    check_apart([("train.output_dir", output_dir)], train_inputs(recipe), "train")
    with nullcontext() if dry_run else locked(output_dir):
        try:
            return _train(recipe, output_dir, resume, overwrite, dry_run, reporter)
        except Exception as exc:
            full = no_space(exc, output_dir)
            if full is None:
                raise
            raise SaraError(f"{full}; {what_is_left(output_dir)}") from None


def what_is_left(output_dir: Path) -> str:
    """After a failed run: the checkpoint a rerun continues from, or that it starts over."""
    from sara_cli.training.rundir import checkpoint_folders, resume_problem

    complete = [c for c in checkpoint_folders(output_dir) if resume_problem(c) is None]
    if complete:
        return (f"the last complete checkpoint is {complete[-1]}: rerun the same command to resume "
                "from it")
    return "no checkpoint was complete yet: a rerun starts from the beginning"


def report_left_out(recipe, model, reporter) -> None:
    """With all-linear, name the weights no target reaches (MoE experts, routers) and why."""
    from sara_cli.adapters.inject import ALL_LINEAR, left_out, parse_targets

    left = left_out(model) if parse_targets(recipe.adapter.targets) == [ALL_LINEAR] else []
    if left and is_main_process():
        reporter.notice(f"all-linear left out (not linear layers; sara adapts nn.Linear layers only): "
                        f"{'; '.join(left)}")


def train_inputs(recipe) -> list[tuple[str, Path]]:
    """(label, path) of the local files and folders a run reads: the base, the data files, the
    spectrum cache. A built-in or hub reference is resolved later, inside caches of its own."""
    from sara_cli.model.cache import cache_root

    inputs = []
    base = Path(recipe.model.name_or_path).expanduser()
    if not builtin.is_builtin(recipe.model.name_or_path) and base.exists():
        inputs.append(("the base model (model.name_or_path)", base))
    for which in ("train", "eval"):
        for data in recipe.data.files(which):
            path = Path(data.path).expanduser()
            if not builtin.is_builtin(data.path) and path.exists():
                inputs.append((f"the data file (data.{which}_file)", path))
    inputs.append(("the spectrum cache", cache_root()))
    return inputs


def _train(recipe, output_dir: Path, resume: bool, overwrite: bool, dry_run: bool, reporter) -> dict:
    import torch
    import yaml
    from transformers import DataCollatorForSeq2Seq
    from transformers.trainer_callback import PrinterCallback

    from sara_cli.data.dataset import load_split, tokenize_split

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
        report_left_out(recipe, model, reporter)
    data = tokenize_split(records, recipe.data, tokenizer, recipe.train.seed)  # a dry run checks data too
    train_set, eval_set = data.train, data.evaluation
    if reporter and is_main_process():
        reporter.data(data.stats, recipe.data)
    model.config.use_cache = False  # also what lets packed records keep to themselves
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8 if use_cuda else None,
                                      label_pad_token_id=-100, return_tensors="pt", padding=True)
    if recipe.data.packing:
        from sara_cli.data import packing

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
