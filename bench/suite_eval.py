"""eval: generated tokens per second of `sara eval`'s two protocols on the same model and prompts.

`evaluate.generate` with protocol `fast` (batched greedy, batch 16) against `llm-adapters`
(4-beam search, one prompt at a time) on a 1B-shaped random Llama and the first 64 gsm8k
prompts of the bundled test set, each with the task's budget of 256 new tokens. Random weights
rarely emit EOS, so nearly every prompt runs to the budget under both protocols. Both protocols
are warmed up on two prompts and eight tokens; `llm-adapters` then typically fits one timed run
in the budget.
"""

from __future__ import annotations

from bench.harness import Measurement, Settings, SuiteResult, measure, ratio_target

TASK = "gsm8k"
PROTOCOLS = {"fast": "sara eval --protocol fast", "llm-adapters": "sara eval --protocol llm-adapters"}


def run(settings: Settings, pool, peft=None, peft_reason=None) -> SuiteResult:
    from sara_cli.evaluation import evaluate, tasks

    from bench.models import build_model, free_memory, load_tokenizer

    task = tasks.TASKS[TASK]
    prompts = [tasks.eval_prompt(r["instruction"]) for r in tasks.load_records(task, None, settings.eval_prompts)]
    max_new_tokens = settings.eval_max_new_tokens or task.max_new_tokens
    result = SuiteResult("eval", info={"task": TASK, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
                                       "batch size (fast)": settings.eval_batch,
                                       "model": settings.eval_model.label()})
    model, tokenizer = build_model(settings.eval_model, settings), load_tokenizer()
    try:
        for protocol, name in PROTOCOLS.items():
            evaluate.generate(model, tokenizer, prompts[:2], protocol, 2, 8)  # warm-up

            def generate(protocol=protocol):  # -> generated tokens
                return evaluate.generate(model, tokenizer, prompts, protocol, settings.eval_batch,
                                         max_new_tokens)[1]

            runs = measure(generate, settings, warmup=False)
            rates = [tokens / seconds for tokens, seconds in zip(runs.values, runs.seconds)]
            result.add(Measurement(protocol, name, "-", "tokens/s", rates, None,
                                   "llm-adapters" if protocol == "fast" else None,
                                   extra={"generated tokens": runs.values[-1], "seconds": runs.seconds[-1]}))
    finally:
        model = None
        free_memory()
    result.targets.append(ratio_target("fast vs llm-adapters: generated tokens/s", result.get("fast"),
                                       result.get("llm-adapters"), ">=", 10))
    return result
