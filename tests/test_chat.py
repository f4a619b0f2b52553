"""`sara chat`: the one-shot mode on a routed Mo-SARA run, a merged checkpoint and a base, each
against an independent greedy generation with transformers; the interactive loop; stopping.

The expected answers are computed here from the model and the prompt text directly (the alpaca
template from data.py's byte-exact prompt, or the tokenizer's chat template), not through
sara_cli.chat.
"""

from __future__ import annotations

import pytest
import torch

from conftest import one_line_error, run_cli
from sara_cli.adapters import checkpoint
from sara_cli.data.dataset import alpaca_prompt

pytestmark = pytest.mark.usefixtures("one_thread")
MESSAGE = "Add 3 and 4."
TOKENS = 10


def greedy_answer(model, tokenizer, prompt: str, special: bool = True, tokens: int = TOKENS) -> str:
    """The answer as a user would compute it: greedy, new tokens only, cut at a new alpaca block."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=special)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.split("### Instruction:")[0].split("### Response:")[0].strip()


def chat_answer(model, tokenizer, messages: list[dict]) -> str:
    """The greedy answer after the tokenizer's chat template (which writes its own special tokens)."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return greedy_answer(model, tokenizer, prompt, special=False)


@pytest.fixture(scope="module")
def base(llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(llama_dir).eval(), AutoTokenizer.from_pretrained(llama_dir)


def answer_of(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_one_shot_on_a_routed_mosara_run(trained_mosara_run, llama_dir):
    """The run's alpaca template, and the adapter applied unmerged with its per-token routing."""
    from transformers import AutoModelForCausalLM

    from sara_cli.adapters.registry import MoSaraLayer

    model, tokenizer, _ = checkpoint.load_adapter_model(trained_mosara_run / "adapter", device="cpu")
    assert any(isinstance(m, MoSaraLayer) for m in model.modules())
    expected = greedy_answer(model, tokenizer, alpaca_prompt(MESSAGE))
    answer = answer_of(run_cli("chat", trained_mosara_run, "--prompt", MESSAGE, "--max-new-tokens", TOKENS))
    assert answer == expected and answer
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    assert greedy_answer(base, tokenizer, alpaca_prompt(MESSAGE)) != expected  # the adapter matters


def test_one_shot_on_a_merged_checkpoint_uses_the_template_its_card_records(trained_mosara_run, tmp_path):
    """The tiny tokenizer has a chat template, so only the recorded recipe says alpaca."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    records = tmp_path / "calibration.json"
    records.write_text('[{"instruction": "Add 1 and 2.", "input": "", "output": "3"}]')
    result = run_cli("merge", trained_mosara_run, "--out", merged, "--routing", "mean", "--calibration", records,
                     "--no-verify")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template
    expected = greedy_answer(model, tokenizer, alpaca_prompt(MESSAGE))
    assert answer_of(run_cli("chat", merged, "--prompt", MESSAGE, "--max-new-tokens", TOKENS)) == expected
    forced = answer_of(run_cli("chat", merged, "--prompt", MESSAGE, "--max-new-tokens", TOKENS,
                               "--template", "chat"))
    assert forced == chat_answer(model, tokenizer, [{"role": "user", "content": MESSAGE}])


def test_one_shot_on_a_base_uses_its_chat_template(llama_dir, base):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MESSAGE}]
    answer = answer_of(run_cli("chat", llama_dir, "--prompt", MESSAGE, "--max-new-tokens", TOKENS,
                               "--system", "Be brief."))
    assert answer == chat_answer(*base, messages)


def test_interactive_session_keeps_the_conversation_and_leaves_on_eof(llama_dir, base):
    """Two messages through stdin, then end of input (Ctrl-D): the second prompt holds the first turn."""
    first = chat_answer(*base, [{"role": "user", "content": "Hello."}])
    second = chat_answer(*base, [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": first},
                                 {"role": "user", "content": MESSAGE}])
    from typer.testing import CliRunner

    from sara_cli.cli.app import app

    result = CliRunner().invoke(app, ["chat", str(llama_dir), "--max-new-tokens", str(TOKENS)],
                                input=f"Hello.\n\n{MESSAGE}\n")
    assert result.exit_code == 0, result.output
    assert "Ctrl-C stops an answer, /reset forgets the conversation, Ctrl-D or /exit leaves" in result.stderr
    assert f"> {first}\n" in result.stdout and f"> {second}\n" in result.stdout


def test_reset_forgets_the_conversation_and_exit_leaves(llama_dir, base):
    """After /reset the next prompt holds no earlier turn; /exit leaves before the next message."""
    fresh = chat_answer(*base, [{"role": "user", "content": MESSAGE}])
    from typer.testing import CliRunner

    from sara_cli.cli.app import app

    result = CliRunner().invoke(app, ["chat", str(llama_dir), "--max-new-tokens", str(TOKENS)],
                                input=f"Hello.\n/reset\n{MESSAGE}\n/exit\nNever answered.\n")
    assert result.exit_code == 0, result.output
    assert "(conversation forgotten)" in result.stderr
    # "> first\n" "> " (the /reset line, no answer) "> fresh\n" "> " (the /exit line): nothing after
    assert result.stdout.count("\n") == 2 and result.stdout.endswith(f"> > {fresh}\n> ")


def test_a_long_conversation_drops_its_oldest_exchanges_to_fit_the_context(base):
    from sara_cli.evaluation.chat import ChatSession

    model, tokenizer = base
    session = ChatSession(model, tokenizer, "chat", {"max_new_tokens": 7}, system="Be brief.")
    exchanges = [[{"role": "user", "content": f"Question {i}: " + "words " * 20},
                  {"role": "assistant", "content": f"Answer {i}."}] for i in range(3)]
    session.history += [turn for pair in exchanges for turn in pair]
    new = {"role": "user", "content": MESSAGE}
    kept = [{"role": "system", "content": "Be brief."}, *exchanges[2], new]
    expected = tokenizer.apply_chat_template(kept, tokenize=False, add_generation_prompt=True)
    fits = len(tokenizer(expected, add_special_tokens=False)["input_ids"]) + 7
    session.context_length = lambda: fits  # room for the last exchange, not for two
    assert session.prompt(MESSAGE) == expected
    assert session.dropped_turns == 2 and session.history == kept[:-1]
    session.context_length = lambda: 1  # nothing fits: the system message and the new message stay
    session.prompt(MESSAGE)
    assert session.history == kept[:1] and session.dropped_turns == 1


def test_stop_ends_the_answer_after_the_current_token(llama_dir):
    """What Ctrl-C does: the generating thread stops at its next step, not at max_new_tokens."""
    from sara_cli.evaluation.chat import ChatSession
    from sara_cli.evaluation.evaluate import load_model

    model, tokenizer, _, _ = load_model(str(llama_dir), device="cpu")
    session = ChatSession(model, tokenizer, "chat", {"max_new_tokens": 200, "do_sample": False})
    pieces = session.reply(MESSAGE)
    next(pieces)
    session.stop()
    list(pieces)
    assert session.generated_tokens < 40, session.generated_tokens  # the random model never says EOS
    assert len(session.history) == 2 and session.history[1]["role"] == "assistant"  # the partial turn stays


def test_alpaca_answers_end_where_the_model_starts_a_new_block():
    from sara_cli.evaluation.chat import ChatSession

    session = ChatSession(None, None, "alpaca", {})
    pieces = ["   The answer", " is 7.\n   ### Ins", "truction: more text", " never shown"]
    assert "".join(session._until_markers(iter(pieces))) == "The answer is 7."
    assert "".join(session._until_markers(iter(["A # B ## C ### D"]))) == "A # B ## C ### D"


def test_bad_chat_options_are_one_line_errors(trained_mosara_run, tmp_path):
    one_line_error(run_cli("chat", trained_mosara_run, "--template", "vicuna", "--prompt", "x"),
                   "--template", "vicuna")
    one_line_error(run_cli("chat", trained_mosara_run, "--max-new-tokens", 0, "--prompt", "x"), "--max-new-tokens")
    one_line_error(run_cli("chat", trained_mosara_run, "--temperature", -1, "--prompt", "x"), "--temperature")
    one_line_error(run_cli("chat", trained_mosara_run, "--top-p", 1.5, "--prompt", "x"), "--top-p")
    one_line_error(run_cli("chat", trained_mosara_run, "--system", "Be brief.", "--prompt", "x"),
                   "--system", "alpaca")
    (tmp_path / "notes.txt").write_text("not a model")
    one_line_error(run_cli("chat", tmp_path, "--prompt", "x"), "neither a model checkpoint")


def test_an_answer_of_only_whitespace_is_named_with_its_token_count(monkeypatch):
    """A model that generates only whitespace (or special tokens) would print a blank line; the
    command says so instead. The session is a stand-in: what is checked is the command's report."""
    from sara_cli.evaluation import chat

    class Blank:
        generated_tokens = 0
        dropped_turns = 0

        def reply(self, message):
            for piece in ("\n", "   ", "\n"):
                self.generated_tokens += 1
                yield piece

    monkeypatch.setattr(chat, "open_session", lambda *args, **kwargs: (Blank(), "a blank model"))
    result = run_cli("chat", "anything", "--prompt", MESSAGE)
    assert result.exit_code == 0, result.output
    assert "(the model produced no visible text: 3 token(s) generated" in result.stderr
