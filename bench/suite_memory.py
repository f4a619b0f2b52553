"""memory: peak device memory and step time with the base in bf16 against the base in 4 bits.

The 7B-shaped base is trained with q/v adapters in two forms: the bf16 model the other suites
share, and a 4-bit NF4 copy (double quantization, bf16 compute) loaded from its saved
checkpoint. On each: sara SARA (tau 0.01), sara LoRA r 8 and PEFT LoRA r 8, and on the 4-bit base
PEFT QLoRA at SARA's parameter count too. sara's 4-bit side is what `sara train` builds:
`load_in_4bit`, norms in float32, adapters initialised from the checkpoint files. PEFT's is
`prepare_model_for_kbit_training` + `get_peft_model`, the QLoRA recipe. Steps are the plain
loop of the train suite (bench/suite_train.py). Peak memory is `torch.cuda.max_memory_allocated`
over the steps, base included; "base GiB" is the base's parameters and buffers as loaded.
"""

from __future__ import annotations

from bench.harness import Measurement, Settings, SuiteResult, ratio_target
from bench.models import free_memory
from bench.suite_train import GIB, SARA_TAU, TARGETS, train_steps

LORA = {"rank": 8, "alpha": 16}


def load_4bit(folder, settings: Settings):
    """The saved base as 4-bit NF4, as `sara train` loads it (model.load_in_4bit: true)."""
    from types import SimpleNamespace

    from sara_cli.model import loading, quantize

    spec = SimpleNamespace(name_or_path=str(folder), revision=None, dtype=settings.dtype_name,
                           trust_remote_code=False, attn_implementation=None, load_in_4bit=True,
                           load_in_8bit=False)
    compute = "bfloat16" if settings.device == "cuda" else "float32"
    model, _, _ = loading.load_base_model(spec, settings.device, compute_dtype=compute)
    model.config.use_cache = False
    return model


def case(result: SuiteResult, settings: Settings, build, key: str, name: str, base: str,
         baseline: str | None = None, restore=None) -> Measurement:
    """Build a model with adapters (`build()` returns it), time its steps, then `restore()` (the
    shared bf16 model) or drop it (a 4-bit copy)."""
    from sara_cli.adapters.inject import count_parameters
    from sara_cli.adapters.inject import base_memory_bytes

    model = build()
    try:
        trainable = count_parameters(model)[0]
        base_bytes = base_memory_bytes(model)
        seconds, peak = train_steps(model, settings)
    finally:
        model = None
        if restore is not None:
            restore()
        free_memory()
    extra = {"peak memory GiB": peak, "base GiB": base_bytes / GIB, "trainable params": trainable}
    return result.add(Measurement(key, f"{name} ({base} base)", "q/v", "s/step", seconds, None, baseline,
                                  extra=extra))


def lora_matched_rank(settings: Settings, params: int) -> int:
    """The LoRA rank whose count r * sum(in + out) over q/v is closest to `params`."""
    shape = settings.model
    kv = shape.num_key_value_heads * shape.hidden_size // shape.num_attention_heads
    per_rank = shape.num_hidden_layers * (2 * shape.hidden_size + shape.hidden_size + kv)
    return max(1, round(params / per_rank))


def run(settings: Settings, pool, peft=None, peft_reason=None) -> SuiteResult:
    from sara_cli.model import quantize
    from sara_cli.adapters.initialize import CheckpointWeights
    from sara_cli.adapters.inject import find_targets, inject_adapters

    from bench.models import Snapshot

    result = SuiteResult("memory", info={"batch": settings.train_batch, "sequence": settings.train_seq,
                                         "4-bit": "NF4, double quantization, block 64"})
    folder = pool.checkpoint()
    shared = pool.model()
    shared.config.use_cache = False
    snapshot = Snapshot(shared, find_targets(shared, TARGETS))

    def bf16():
        return shared

    def four():
        model = load_4bit(folder, settings)
        quantize.prepare_for_training(model)
        return model

    def sara_on(make, method, options):
        def build():
            model = make()
            inject_adapters(model, method, options, TARGETS, weights=CheckpointWeights(folder))
            return model
        return build

    def peft_on(make, rank, kbit):
        def build():
            model = make() if not kbit else load_4bit(folder, settings)
            if kbit:
                model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            config = peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
            return peft.get_peft_model(model, config)
        return build

    def skipped(key, name):
        return result.add(Measurement(key, name, "q/v", "s/step", skipped=peft_reason))

    dtype = settings.dtype_name
    sara_bf16 = case(result, settings, sara_on(bf16, "sara", {"tau": SARA_TAU}), "bf16-sara",
                     f"SARA tau {SARA_TAU}", dtype, restore=snapshot.restore)
    case(result, settings, sara_on(bf16, "lora", LORA), "bf16-sara-lora", "sara LoRA r 8", dtype,
         "bf16-peft-lora", restore=snapshot.restore)
    if peft is None:
        skipped("bf16-peft-lora", "PEFT LoRA r 8")
    else:
        case(result, settings, peft_on(bf16, 8, False), "bf16-peft-lora", "PEFT LoRA r 8", dtype,
             restore=snapshot.restore)
    rank = lora_matched_rank(settings, sara_bf16.extra["trainable params"])
    result.info["matched LoRA rank"] = rank
    case(result, settings, sara_on(four, "sara", {"tau": SARA_TAU}), "4bit-sara", f"SARA tau {SARA_TAU}",
         "4-bit", "4bit-peft-qlora-matched")
    case(result, settings, sara_on(four, "lora", LORA), "4bit-sara-lora", "sara LoRA r 8", "4-bit",
         "4bit-peft-qlora")
    if peft is None:
        skipped("4bit-peft-qlora", "PEFT QLoRA r 8")
        skipped("4bit-peft-qlora-matched", f"PEFT QLoRA r {rank}")
    else:
        case(result, settings, peft_on(four, 8, True), "4bit-peft-qlora", "PEFT QLoRA r 8", "4-bit")
        case(result, settings, peft_on(four, rank, True), "4bit-peft-qlora-matched",
             f"PEFT QLoRA r {rank} (SARA's parameter count)", "4-bit")
    add_targets(result)
    return result


def add_targets(result: SuiteResult) -> None:
    get = result.get

    def peak(key):
        return None if get(key).skipped else get(key).extra.get("peak memory GiB")

    sara4, qlora = get("4bit-sara"), get("4bit-peft-qlora-matched")
    result.targets += [
        ratio_target("SARA 4-bit vs PEFT QLoRA (same params): peak memory", sara4, qlora, "<=", 1.02,
                     values=(peak("4bit-sara"), peak("4bit-peft-qlora-matched"))),
        ratio_target("SARA 4-bit vs PEFT QLoRA (same params): step time", sara4, qlora, "<=", 1.05),
        ratio_target("sara LoRA r 8 vs PEFT QLoRA r 8 on 4 bits: peak memory", get("4bit-sara-lora"),
                     get("4bit-peft-qlora"), "<=", 1.02,
                     values=(peak("4bit-sara-lora"), peak("4bit-peft-qlora"))),
        ratio_target("SARA: 4-bit base vs bf16 base, peak memory", sara4, get("bf16-sara"), "<=", 0.5,
                     values=(peak("4bit-sara"), peak("bf16-sara"))),
    ]
