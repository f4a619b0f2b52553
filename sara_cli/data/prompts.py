"""Records -> prompts -> tokens and labels.

`alpaca` and `plain` are single-turn prompt templates: the prompt is masked (train_on_inputs:
false) and the response is the target. `chat` renders a conversation with the tokenizer's own
chat template, and the targets are the assistant turns (all, or the last), found without
assuming a model family:
- a template that marks assistant text with `{% generation %}` says where it is, and
  transformers' `return_assistant_tokens_mask` reads that;
- otherwise each assistant turn is the text that rendering the conversation up to and including
  the turn adds to rendering it up to the turn with a generation prompt. Its end-of-turn marker
  (`</s>`, `<|eot_id|>`, `<|im_end|>`) is part of that text, so the model learns to stop. The
  text spans are mapped to tokens of the whole rendered conversation by their character offsets,
  so the tokens are exactly those of tokenizing the conversation at once.
"""

from __future__ import annotations

import re

from sara_cli.errors import SaraError
from sara_cli.data.records import _instruction_conversation, _text, conversation

# The LLM-Adapters training prompt (finetune.py, generate_prompt), whitespace included:
# every line after the preamble is indented by 16 spaces, with a line of 16 spaces between
# blocks. Upstream's preambles end in two spaces (no input) and one space (with input): those
# are what is left of a `# noqa: E501` that an earlier version had inside the string.
INDENT = " " * 16
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.  \n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                         "provides further context. Write a response that appropriately completes "
                         "the request. \n\n")
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
IGNORE = -100


def alpaca_prompt(instruction: str, input_text: str = "", output: str = "") -> str:
    """The LLM-Adapters training prompt; with output="" it is the prompt part alone."""
    if input_text:
        return (f"{ALPACA_PREAMBLE_INPUT}{INDENT}### Instruction:\n{INDENT}{instruction}\n{INDENT}\n"
                f"{INDENT}### Input:\n{INDENT}{input_text}\n{INDENT}\n"
                f"{INDENT}### Response:\n{INDENT}{output}")
    return (f"{ALPACA_PREAMBLE}{INDENT}### Instruction:\n{INDENT}{instruction}\n{INDENT}\n"
            f"{INDENT}### Response:\n{INDENT}{output}")


def plain_prompt(instruction: str, input_text: str = "", output: str = "") -> str:
    """Instruction, optional input, then the output, separated by newlines."""
    prompt = instruction + (f"\n{input_text}" if input_text else "") + "\n"
    return prompt + output


def record_messages(record: dict, fmt: str = "auto", tags: dict | None = None) -> list[dict]:
    """A record as chat messages: its conversation, or its instruction as one user/assistant turn."""
    return conversation(record, fmt, tags) or _instruction_conversation(record)


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`.

    Raises:
        SaraError: the tokenizer has no chat template.
        ValueError: the template refused the conversation (e.g. roles that do not alternate).
    """
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise SaraError("template 'chat' needs a tokenizer with a chat template; this one has "
                        "none. Use template: alpaca or plain")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except SaraError:
        raise
    except Exception as exc:  # jinja2 TemplateError and friends: the caller names the record
        raise ValueError(f"the chat template refused it ({type(exc).__name__}: {exc})") from None


def record_texts(record: dict, template: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, prompt + completion) of a record under a template; `chat` needs the tokenizer.

    For a conversation the prompt is everything before its last message.
    """
    instruction, input_text, output = (_text(record.get(k)) for k in ("instruction", "input", "output"))
    if template == "alpaca":
        return alpaca_prompt(instruction, input_text), alpaca_prompt(instruction, input_text, output)
    if template == "plain":
        return plain_prompt(instruction, input_text), plain_prompt(instruction, input_text, output)
    messages = record_messages(record)
    return render(tokenizer, messages[:-1], generation_prompt=True), render(tokenizer, messages)


class NotPrefixStable(ValueError):
    """Rendering a conversation's start is not a prefix of rendering all of it."""


def assistant_spans(tokenizer, messages: list[dict], last_only: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns.

    Raises:
        NotPrefixStable: the template renders a turn differently depending on what follows it
            (some templates drop earlier turns' reasoning), so a turn's text cannot be found.
    """
    full = render(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for i in turns[-1:] if last_only else turns:
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        after = full if i == len(messages) - 1 else render(tokenizer, messages[:i + 1])
        if not (after.startswith(before) and full.startswith(after)):
            raise NotPrefixStable(f"assistant message {i}")
        spans.append((len(before), len(after)))
    return full, spans


def _span_mask(offsets, spans) -> list[bool]:
    """Tokens whose characters overlap a span (a token straddling a boundary counts as inside, as
    transformers' assistant mask does)."""
    mask = []
    for start, end in offsets:
        mask.append(any(start < e and (end > s or (start == end and start >= s)) for s, e in spans))
    return mask


def _last_run(mask: list[bool]) -> list[bool]:
    """Only the last contiguous run of True (the last assistant turn)."""
    if True not in mask:
        return mask
    end = len(mask) - mask[::-1].index(True)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [start <= i < end for i in range(len(mask))]


class Tokenize:
    """Turn one record into input_ids / attention_mask / labels.

    alpaca/plain: the prompt's ids followed by the answer's, each tokenized on its own (as
    LLaMA-Factory does), so the ids a generation starts from (the prompt alone) are exactly a
    prefix of what was trained; `joint=True` tokenizes prompt + answer as one string, as
    LLM-Adapters does, where a BPE merge can join the prompt's last whitespace with the answer's
    first word. Then: truncate to cutoff_len, append EOS when there is room, and with
    train_on_inputs=False set the prompt's labels to -100. chat: the rendered conversation,
    labels on the assistant turns `loss_on` names (everything with train_on_inputs=True); EOS is
    appended only when the template writes none after the last turn's start.
    """

    def __init__(self, tokenizer, template: str, cutoff_len: int, train_on_inputs: bool,
                 loss_on: str | None = None, fmt: str = "auto", tags: dict | None = None,
                 joint: bool = False):
        self.tokenizer = tokenizer
        self.joint = joint
        self.template = template
        self.cutoff_len = cutoff_len
        self.train_on_inputs = bool(train_on_inputs)
        self.last_only = loss_on == "last_turn"
        self.fmt = fmt
        self.tags = tags or {}

    def texts(self, record: dict) -> tuple[str, str]:
        """(prompt, prompt + completion) for a record."""
        return record_texts(record, self.template, self.tokenizer)

    def __call__(self, record: dict) -> dict:
        row = self.encode(record)
        return {k: row[k] for k in ("input_ids", "attention_mask", "labels")}

    def encode(self, record: dict) -> dict:
        """__call__'s fields plus `num_tokens`, `truncated` (the text ran past cutoff_len) and
        `num_targets` (labels the loss uses: not -100, after the first token, which nothing predicts).

        Raises:
            ValueError: the chat template refused the record, or its turns cannot be found.
        """
        if self.template == "chat":
            input_ids, targets, truncated = self._chat(record)
            labels = [t if keep else IGNORE for t, keep in zip(input_ids, targets)]
        else:
            input_ids, labels, truncated = self._single_turn(record)
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
                "num_tokens": len(input_ids), "truncated": truncated,
                "num_targets": sum(1 for label in labels[1:] if label != IGNORE)}

    def _single_turn(self, record: dict) -> tuple[list[int], list[int], bool]:
        prompt, full = self.texts(record)
        if self.joint:
            encoding = self.tokenizer(full, truncation=True, max_length=self.cutoff_len)
            input_ids = encoding["input_ids"]
            truncated = _overflowed(self.tokenizer, encoding, full, self.cutoff_len)
            prompt_len = len(self.tokenizer(prompt, truncation=True, max_length=self.cutoff_len)["input_ids"])
        else:
            prompt_ids = self.tokenizer(prompt)["input_ids"]  # as generation sees it, BOS included
            answer_ids = self.tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
            truncated = len(prompt_ids) + len(answer_ids) > self.cutoff_len
            input_ids = (prompt_ids + answer_ids)[:self.cutoff_len]
            prompt_len = len(prompt_ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not input_ids or input_ids[-1] != eos) and len(input_ids) < self.cutoff_len:
            input_ids = input_ids + [eos]
        labels = list(input_ids)
        if not self.train_on_inputs:
            labels[:prompt_len] = [IGNORE] * min(prompt_len, len(labels))
        return input_ids, labels, truncated

    def _chat(self, record: dict) -> tuple[list[int], list[bool], bool]:
        messages = record_messages(record, self.fmt, self.tags)
        if self.train_on_inputs:
            input_ids = self._ids(render(self.tokenizer, messages))
            targets = [True] * len(input_ids)
        elif GENERATION_TAG.search(self.tokenizer.chat_template or ""):
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
            input_ids, targets = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
            targets = _last_run(targets) if self.last_only else targets
        else:
            try:
                text, spans = assistant_spans(self.tokenizer, messages, self.last_only)
            except NotPrefixStable as exc:
                raise ValueError(
                    f"cannot be split into turns: this chat template renders {exc} differently once later "
                    "messages follow, so its tokens cannot be found; set data.loss_on: last_turn, or use a "
                    "template that marks assistant text with {% generation %}") from None
            if not self.tokenizer.is_fast:
                raise SaraError("template 'chat' with train_on_inputs: false needs a fast tokenizer "
                                "(character offsets); this one is a slow tokenizer")
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            input_ids, targets = encoding["input_ids"], _span_mask(encoding["offset_mapping"], spans)
        truncated = len(input_ids) > self.cutoff_len
        input_ids, targets = input_ids[:self.cutoff_len], targets[:self.cutoff_len]
        eos = self.tokenizer.eos_token_id
        last_turn = _last_run(targets)
        start = last_turn.index(True) if True in last_turn else 0
        if eos is not None and eos not in input_ids[start:] and len(input_ids) < self.cutoff_len:
            targets = targets + [bool(targets and targets[-1])]
            input_ids = input_ids + [eos]
        return input_ids, targets, truncated

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own


def _overflowed(tokenizer, encoding, text: str, cutoff_len: int) -> bool:
    """Whether truncation to cutoff_len dropped tokens (fast tokenizers record the overflow)."""
    encodings = getattr(encoding, "encodings", None)
    if encodings:
        return bool(encodings[0].overflowing)
    return len(tokenizer(text)["input_ids"]) > cutoff_len
