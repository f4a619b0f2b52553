"""The merge suite's baseline: a plain transformers load and save of a checkpoint, on the CPU.

    python bench/plain_roundtrip.py MODEL_DIR OUT_DIR

This is what any merge has to do at least (read every tensor, write every tensor), with nothing
merged and nothing checked.
"""

from __future__ import annotations

import sys


def main(source: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    model.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/plain_roundtrip.py MODEL_DIR OUT_DIR")
    main(sys.argv[1], sys.argv[2])
