"""`sara chat`: talk to a model the way its run trained it, tokens streamed as they are generated.

The model is loaded as `sara eval` loads it (`evaluate.load_model`): a run or adapter folder is
its base with the adapter (Mo-SARA keeps its per-token routing), a merged checkpoint or a base
is plain transformers.

The prompt is the run's own template (recipe `data.template`; for a merged checkpoint, the
recipe its model card records):
- alpaca, plain: each message is an instruction on its own, since these templates have no
  place for earlier turns; the answer ends at EOS or where the model starts a new
  "### Instruction:" / "### Response:" block;
- chat: the tokenizer's chat template over the whole conversation.
Generation follows the model's generation_config (greedy unless it samples), with
max_new_tokens, temperature and top_p set on top when given.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

from sara_cli.errors import SaraError

TEMPLATES = ("alpaca", "plain", "chat")
STOP_MARKERS = {"alpaca": ("### Instruction:", "### Response:"), "plain": (), "chat": ()}


def recorded_template(reference: str, config: dict | None) -> str | None:
    """The template a run trained with: its recipe, or the recipe in a merged checkpoint's
    model card (sara merge writes it under "## Recipe"); None when neither says."""
    import yaml

    recipe = (config or {}).get("recipe")
    if recipe is None:
        card = Path(reference) / "README.md"
        found = re.search(r"## Recipe\s*```yaml\n(.*?)```", card.read_text(), re.S) if card.is_file() else None
        try:
            recipe = yaml.safe_load(found.group(1)) if found else None
        except yaml.YAMLError:
            recipe = None
    data = (recipe or {}).get("data") if isinstance(recipe, dict) else None
    return (data or {}).get("template", "alpaca") if recipe else None


def choose_template(requested: str | None, recorded: str | None, tokenizer) -> str:
    """--template if given, else the recorded one, else chat when the tokenizer has a chat
    template and alpaca (the LLM-Adapters prompt) when it has none.

    Raises:
        SaraError: chat without a chat template.
    """
    template = requested or recorded or ("chat" if tokenizer.chat_template else "alpaca")
    if template == "chat" and not tokenizer.chat_template:
        raise SaraError("template chat needs a tokenizer with a chat template; this one has none. "
                        "Use --template alpaca or plain")
    return template


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could be the start of a stop marker."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


class ChatSession:
    """One conversation: builds each prompt, streams the answer, keeps the turns (chat template).

    Args:
        generation: keyword arguments for `generate` on top of the model's generation_config.
    """

    def __init__(self, model, tokenizer, template: str, generation: dict, system: str | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.generation = generation
        self.history: list[dict] = [{"role": "system", "content": system}] if system else []
        self.generated_tokens = 0  # in the last answer
        self.dropped_turns = 0  # earlier exchanges left out of the last prompt to fit the context
        self._stop = threading.Event()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = [turn for turn in self.history if turn["role"] == "system"]

    def context_length(self) -> int | None:
        """The model's longest sequence in tokens, from its config; None when it names none."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def prompt(self, message: str) -> str:
        """The text the model continues for `message` (with the conversation so far, chat only).

        A conversation whose prompt and answer budget (`max_new_tokens`) would pass the model's
        context loses its oldest exchanges first, from the prompt and from the history; the
        system message and the new message always stay. `dropped_turns` counts them.
        """
        from sara_cli.data.dataset import alpaca_prompt, plain_prompt

        self.dropped_turns = 0
        if self.template == "alpaca":
            return alpaca_prompt(message)
        if self.template == "plain":
            return plain_prompt(message)
        limit = self.context_length()
        budget = self.generation.get("max_new_tokens", 0)
        while True:
            turns = [*self.history, {"role": "user", "content": message}]
            text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            earlier = [i for i, turn in enumerate(self.history) if turn["role"] != "system"]
            if (limit is None or not earlier
                    or len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + budget <= limit):
                return text
            del self.history[earlier[0]:earlier[0] + 2]  # the oldest user turn and its answer
            self.dropped_turns += 1

    def stop(self) -> None:
        """End the answer being generated after the current token (Ctrl-C)."""
        self._stop.set()

    def reply(self, message: str) -> Iterator[str]:
        """Stream the answer to `message` as text pieces; the turn is kept even if stopped early."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        session = self

        class UntilStopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                session.generated_tokens += 1
                return torch.full((input_ids.shape[0],), session._stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        # Chat templates write their own special tokens; the others get BOS as in training.
        inputs = self.tokenizer(self.prompt(message), return_tensors="pt",
                                add_special_tokens=self.template != "chat").to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._stop.clear()
        self.generated_tokens = 0
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                        streamer=streamer, stopping_criteria=StoppingCriteriaList([UntilStopped()]),
                                        pad_token_id=self.tokenizer.pad_token_id, **self.generation)
            except BaseException as exc:  # shown in the main thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        answer = ""
        try:
            for piece in self._until_markers(streamer):
                answer += piece
                yield piece
        finally:
            self._stop.set()
            worker.join()  # the streamer's queue is unbounded: the worker never waits on it
            if self.template == "chat":
                self.history += [{"role": "user", "content": message},
                                 {"role": "assistant", "content": answer.strip()}]
        if failure:
            raise failure[0]

    def _until_markers(self, pieces) -> Iterator[str]:
        """The streamed text up to the first stop marker, stripped: what could still turn out
        to be a marker, or trailing whitespace, is held back until the next piece decides."""
        markers = STOP_MARKERS[self.template]
        buffer, started = "", False
        for piece in pieces:
            buffer += piece
            if not started:
                buffer = buffer.lstrip()
                started = bool(buffer)
            cut = min((buffer.index(m) for m in markers if m in buffer), default=None)
            if cut is not None:
                if buffer[:cut].rstrip():
                    yield buffer[:cut].rstrip()
                self.stop()
                return
            ready = len(buffer[:len(buffer) - _held_back(buffer, markers)].rstrip())
            if ready:
                yield buffer[:ready]
                buffer = buffer[ready:]
        if buffer.rstrip():
            yield buffer.rstrip()


def generation_settings(max_new_tokens: int, temperature: float | None, top_p: float | None) -> dict:
    """`generate` arguments from the flags; the model's generation_config supplies the rest.

    Raises:
        SaraError: max_new_tokens below 1, a negative temperature, top_p outside (0, 1].
    """
    if max_new_tokens < 1:
        raise SaraError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    settings: dict = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        if temperature < 0:
            raise SaraError(f"--temperature must be 0 (greedy) or more, got {temperature}")
        settings.update(do_sample=temperature > 0, **({"temperature": temperature} if temperature > 0 else {}))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise SaraError(f"--top-p must be in (0, 1], got {top_p}")
        settings["top_p"] = top_p
    return settings


def open_session(reference: str, template: str | None, generation: dict,
                 system: str | None = None, trust_remote_code: bool = False) -> tuple[ChatSession, str]:
    """Load the model and start a conversation. Returns (session, description of what was loaded).

    Raises:
        SaraError: a model that cannot be loaded, a bad template, or --system without chat.
    """
    from sara_cli.evaluation.evaluate import load_model

    if template is not None and template not in TEMPLATES:  # before the model loads
        raise SaraError(f"--template must be alpaca, plain or chat, got '{template}'")
    model, tokenizer, description, config = load_model(reference, trust_remote_code=trust_remote_code)
    chosen = choose_template(template, recorded_template(reference, config), tokenizer)
    if system is not None and chosen != "chat":
        raise SaraError(f"--system needs the chat template; this model uses {chosen}. Drop --system "
                        "or pass --template chat")
    if model.generation_config.eos_token_id is None:
        generation = {"eos_token_id": tokenizer.eos_token_id, **generation}
    return ChatSession(model, tokenizer, chosen, generation, system), f"{description} ({chosen} template)"
