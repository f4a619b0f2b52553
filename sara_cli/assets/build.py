"""Rebuild the bundled assets (a maintainer tool; sara never runs it).

    python -m sara_cli.assets.build /path/to/shared/data

- data/mawps_quickstart.json: the first 400 records of the MAWPS training split from
  LLM-Adapters (dataset/mawps/trainset.json, commit 816657208af4), converted to instruction
  records: instruction = original_text, output = "<equation> = <ans>\\nThe answer is <ans>".
- tiny-llama/: a byte-level BPE tokenizer (vocabulary 1024) trained on those records, and a
  4-layer Llama config. The weights are random and built on first use (`sara_cli.model.builtin`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
NUM_RECORDS = 400


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def build_data(shared: Path) -> list[dict]:
    source = json.loads((shared / "math" / "train" / "mawps" / "trainset.json").read_text())
    records = []
    for row in source[:NUM_RECORDS]:
        expression = row["equation"].split("=", 1)[1].strip()
        answer = _number(float(row["ans"]))
        records.append({"instruction": row["original_text"].strip(), "input": "",
                        "output": f"{expression} = {answer}\nThe answer is {answer}"})
    (HERE / "data" / "mawps_quickstart.json").write_text(json.dumps(records, indent=1) + "\n")
    return records


def build_tokenizer(records: list[dict]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    from sara_cli.data.dataset import alpaca_prompt
    from sara_cli.evaluation.tasks import eval_prompt

    # Train on the prompts as sara writes them, so the template's whitespace runs and markers
    # become single tokens and a prompt costs ~40 tokens, not ~130.
    texts = [alpaca_prompt(r["instruction"], r["input"], r["output"]) for r in records]
    texts += [eval_prompt(r["instruction"]) for r in records[:100]]
    texts += ["the correct answer is true false solution1 solution2 answer1 answer2 answer3 "
              "answer4 answer5 option1 option2 ending1 ending2 ending3 ending4"] * 20
    tok.train_from_iterator(texts, trainer)
    # Like Llama's tokenizer, prepend <s> to every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = (
        "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
        "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    fast.save_pretrained(HERE / "tiny-llama")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=344,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         tie_word_embeddings=False)
    config.save_pretrained(HERE / "tiny-llama")


if __name__ == "__main__":
    build_tokenizer(build_data(Path(sys.argv[1])))
