"""train: steady-state time per optimizer step and peak device memory, q/v targets.

Both sides run the same plain loop, so the comparison is of the adapters alone: forward with
labels (batch 4 x 512 random tokens), backward, `torch.optim.AdamW` over the trainable
parameters, `zero_grad(set_to_none=True)`. The base stays in bf16; both tools keep adapter
weights and the adapter branch in fp32. Adapter dropout is 0.05 on both sides, as in the
recipes. After `train_warmup_steps` steps, `train_steps` steps are timed with CUDA events
recorded between steps (one synchronisation at the end) and the median step is reported.
Peak memory is `torch.cuda.max_memory_allocated` from the first warm-up step on.
"""

from __future__ import annotations

import time

from bench.harness import Measurement, Settings, SuiteResult, ratio_target
from bench.models import Snapshot

TARGETS = ["q_proj", "v_proj"]
DROPOUT = 0.05
SARA_TAU = 0.01  # the recipes' SARA tau
MOSARA_TAU = 0.5  # the recipes' Mo-SARA tau
GIB = 2**30


def timed_steps(step, settings: Settings) -> list[float]:
    """Seconds per step for `settings.train_steps` consecutive steps."""
    import torch

    n = settings.train_steps
    if settings.device != "cuda":
        seconds = []
        for _ in range(n):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        return seconds
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    events[0].record()
    for i in range(n):
        step()
        events[i + 1].record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1000 for start, end in zip(events, events[1:])]


def train_steps(module, settings: Settings) -> tuple[list[float], float | None]:
    """Warm up, then time steps of `module`; returns (seconds per step, peak memory GiB or None)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.train_batch, settings.train_seq)
    batch = torch.randint(0, settings.model.vocab_size, shape, generator=generator).to(settings.device)

    def step():
        loss = module(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = settings.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    module.train()
    for _ in range(settings.train_warmup_steps):
        step()
    seconds = timed_steps(step, settings)
    module.eval()
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    return seconds, peak


def train_case(result: SuiteResult, settings: Settings, model, key: str, name: str, attach,
               baseline: str | None = None) -> Measurement:
    """Attach adapters with `attach(model)` (returns the module to train), time, and undo."""
    from sara_cli.adapters.inject import adapter_layers, count_parameters, find_targets

    snapshot = Snapshot(model, find_targets(model, TARGETS))
    try:
        module = attach(model)
        trainable = count_parameters(model)[0]
        ranks = [layer.rank() for layer in adapter_layers(model).values()]
        seconds, peak = train_steps(module, settings)
    finally:
        module = None
        snapshot.restore()
    extra = {"peak memory GiB": peak, "trainable params": trainable,
             "warm-up steps": settings.train_warmup_steps}
    if ranks:
        extra["mean rank"] = sum(ranks) / len(ranks)
    return result.add(Measurement(key, name, "q/v", "s/step", seconds, None, baseline, extra=extra))


def sara(method: str, options: dict):
    from sara_cli.adapters.inject import inject_adapters

    def attach(model):
        inject_adapters(model, method, {"dropout": DROPOUT, **options}, TARGETS)
        return model
    return attach


def peft_lora(peft, rank: int):
    config = peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=DROPOUT, target_modules=TARGETS)
    return lambda model: peft.get_peft_model(model, config)


def matched_rank(model, sara_params: int) -> int:
    """The LoRA rank whose parameter count r * sum(in + out) is closest to SARA's."""
    from sara_cli.adapters.inject import find_targets

    modules = [model.get_submodule(name) for name in find_targets(model, TARGETS)]
    per_rank = sum(m.in_features + m.out_features for m in modules)
    return max(1, round(sara_params / per_rank))


def run(settings: Settings, pool, peft=None, peft_reason=None) -> SuiteResult:
    result = SuiteResult("train", info={"batch": settings.train_batch, "sequence": settings.train_seq,
                                        "timed steps": settings.train_steps})
    model = pool.model()
    model.config.use_cache = False

    def baseline(key, name, rank):
        if peft is None:
            return result.add(Measurement(key, name, "q/v", "s/step", skipped=peft_reason))
        return train_case(result, settings, model, key, name, peft_lora(peft, rank))

    baseline("peft-lora-r8", "PEFT LoRA r 8", 8)
    train_case(result, settings, model, "sara-lora-r8", "sara LoRA r 8",
               sara("lora", {"rank": 8, "alpha": 16}), "peft-lora-r8")
    sara_run = train_case(result, settings, model, "sara-sara", f"sara SARA tau {SARA_TAU}",
                          sara("sara", {"tau": SARA_TAU}), "peft-lora-matched")
    rank = matched_rank(model, sara_run.extra["trainable params"])
    result.info["matched LoRA rank"] = rank
    baseline("peft-lora-matched", f"PEFT LoRA r {rank} (SARA's parameter count)", rank)
    for m, base in ((1, "peft-lora-r8"), (5, "peft-lora-r8"), (9, "mosara-m1")):
        train_case(result, settings, model, f"mosara-m{m}", f"sara Mo-SARA tau {MOSARA_TAU} m {m}",
                   sara("mosara", {"tau": MOSARA_TAU, "num_experts": m}), base)
    add_targets(result)
    return result


def add_targets(result: SuiteResult) -> None:
    get = result.get
    sara_run, matched = get("sara-sara"), get("peft-lora-matched")
    result.targets += [
        ratio_target("SARA vs PEFT LoRA (same params): step time", sara_run, matched, "<=", 1.03),
        ratio_target("SARA vs PEFT LoRA (same params): peak memory", sara_run, matched, "<=", 1.02,
                     values=(sara_run.extra.get("peak memory GiB"), matched.extra.get("peak memory GiB"))),
        ratio_target("sara LoRA r 8 vs PEFT LoRA r 8: step time", get("sara-lora-r8"), get("peft-lora-r8"),
                     "<=", 1.02),
        ratio_target("Mo-SARA m 5 vs PEFT LoRA r 8: step time", get("mosara-m5"), get("peft-lora-r8"),
                     "<=", 1.12),
        ratio_target("Mo-SARA m 9 vs m 1: step time", get("mosara-m9"), get("mosara-m1"), "<=", 1.03),
    ]
