"""Rebuild the bundled assets (a maintainer tool; sara never runs it).

    python -m sara_cli.assets.build /path/to/shared/data

- data/mawps_quickstart.json: the first 400 records of the MAWPS training split from
  LLM-Adapters (dataset/mawps/trainset.json, commit 816657208af4), converted to instruction
  records: instruction = original_text, output = "<equation> = <ans>\\nThe answer is <ans>".
- data/mawps_train.json.gz, data/mawps_valid.json.gz: the whole MAWPS training and validation
  splits (LLM-Adapters dataset/mawps/trainset.json and validset.json, ODC-By) in the same
  instruction format. Training records whose question (case and spacing ignored) also appears in
  the validation split or in the bundled mawps test set are dropped; `build_splits` returns how
  many, and docs/results.md states it.
- tiny-llama/: a byte-level BPE tokenizer (vocabulary 1024) trained on those records, and a
  4-layer Llama config. The weights are random and built on first use (`sara_cli.model.builtin`).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
NUM_RECORDS = 400


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def instruction_record(row: dict) -> dict:
    """A MAWPS row as an instruction record with the equation, then the answer."""
    expression = row["equation"].split("=", 1)[1].strip()
    answer = _number(float(row["ans"]))
    return {"instruction": row["original_text"].strip(), "input": "",
            "output": f"{expression} = {answer}\nThe answer is {answer}"}


def build_data(shared: Path) -> list[dict]:
    source = json.loads((shared / "math" / "train" / "mawps" / "trainset.json").read_text())
    records = [instruction_record(row) for row in source[:NUM_RECORDS]]
    (HERE / "data" / "mawps_quickstart.json").write_text(json.dumps(records, indent=1) + "\n")
    return records


def _question(text: str) -> str:
    return " ".join(text.lower().split())


def build_splits(shared: Path) -> dict:
    """The full MAWPS train and validation splits, gzipped, the train split without the questions
    that the validation split or the mawps test set also hold. Returns the counts."""
    folder = shared / "math" / "train" / "mawps"
    train = json.loads((folder / "trainset.json").read_text())
    valid = json.loads((folder / "validset.json").read_text())
    with gzip.open(HERE / "eval" / "mawps" / "test.json.gz", "rt") as f:
        test = {_question(r["instruction"]) for r in json.load(f)}
    in_valid = {_question(r["original_text"]) for r in valid}
    kept = [r for r in train if _question(r["original_text"]) not in in_valid | test]
    counts = {"train": len(train), "valid": len(valid), "kept": len(kept),
              "dropped_valid": sum(_question(r["original_text"]) in in_valid for r in train),
              "dropped_test": sum(_question(r["original_text"]) in test for r in train)}
    for name, rows in (("mawps_train", kept), ("mawps_valid", valid)):
        text = json.dumps([instruction_record(r) for r in rows], indent=1) + "\n"
        # mtime=0: the same records give the same bytes.
        (HERE / "data" / f"{name}.json.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    return counts


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
    shared = Path(sys.argv[1])
    print(build_splits(shared))
    build_tokenizer(build_data(shared))
