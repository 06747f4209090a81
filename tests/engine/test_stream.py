"""Thinking/answer splitting of streamed text, and the token-level thinking budget."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from kimivl_cli.engine.events import AnswerDelta, ThinkingDelta
from kimivl_cli.engine.stream import Phase, ThinkingBudget, ThinkingSplitter, split_thinking

START, END = "◁think▷", "◁/think▷"


def run_splitter(deltas: list[str], show_thinking: bool = True) -> tuple[str, str, list]:
    splitter = ThinkingSplitter(show_thinking)
    events = [e for d in deltas for e in splitter.feed(d)] + splitter.flush()
    thinking = "".join(e.text for e in events if isinstance(e, ThinkingDelta))
    answer = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    return thinking, answer, events


def reference_split(text: str) -> tuple[str, str]:
    """The rules written as whole-string operations, independently of the state machine."""
    s, e = text.find(START), text.find(END)
    if s == -1 and e == -1:
        return "", text.strip()
    if s == -1 or (e != -1 and e < s):  # a stray end marker first: no thinking
        return "", (text[:e] + text[e + len(END) :]).strip()
    preamble, rest = text[:s], text[s + len(START) :]
    thinking, found, after = rest.partition(END)
    return thinking.strip(), (preamble + after).strip() if found else preamble.strip()


# --- examples -----------------------------------------------------------------------------------


def test_thinking_then_answer() -> None:
    text = f"{START}The user asks 2+2.\nThat is 4.\n{END}\n\nThe answer is **4**."
    assert run_splitter([text])[:2] == ("The user asks 2+2.\nThat is 4.", "The answer is **4**.")


def test_instruct_output_is_all_answer() -> None:
    thinking, answer, events = run_splitter(["Hello", " world", "\n"])
    assert (thinking, answer) == ("", "Hello world")
    assert all(isinstance(e, AnswerDelta) for e in events)


def test_markers_split_across_deltas() -> None:
    deltas = ["◁", "th", "ink▷", "reason", "ing ◁/", "thi", "nk", "▷", " ans", "wer"]
    assert run_splitter(deltas)[:2] == ("reasoning", "answer")


def test_possible_marker_prefix_is_held_then_released() -> None:
    splitter = ThinkingSplitter()
    assert splitter.feed("a ◁th") == [AnswerDelta("a")]
    assert splitter.feed("ought") == [AnswerDelta(" ◁thought")]
    assert splitter.feed("◁/thi") == []
    assert splitter.flush() == [AnswerDelta("◁/thi")]


def test_unfinished_thinking_stays_thinking() -> None:
    assert run_splitter([START, "still going", " "])[:2] == ("still going", "")


def test_text_before_the_marker_is_answer() -> None:
    thinking, answer, _ = run_splitter(["Sure. ", START, "hmm", END, " Here it is."])
    assert (thinking, answer) == ("hmm", "Sure.  Here it is.")


def test_stray_end_marker_without_start() -> None:
    assert run_splitter(["abc", END, "def"])[:2] == ("", "abcdef")


def test_markers_inside_the_answer_are_text() -> None:
    assert run_splitter([START, "t", END, "use ", START, " and ", END])[:2] == ("t", f"use {START} and {END}")


def test_empty_thinking_and_empty_answer() -> None:
    assert run_splitter([START, "  \n", END, "\n"])[:2] == ("", "")
    assert run_splitter([])[:2] == ("", "")


def test_hidden_thinking_is_consumed_not_emitted() -> None:
    splitter = ThinkingSplitter(show_thinking=False)
    events = splitter.feed(f"{START}secret") + splitter.feed(f"{END}shown") + splitter.flush()
    assert events == [AnswerDelta("shown")]


def test_phase_follows_the_markers() -> None:
    splitter = ThinkingSplitter()
    splitter.feed("◁thi")
    assert splitter.phase is Phase.PREAMBLE
    splitter.feed("nk▷x")
    assert splitter.in_thinking
    splitter.feed(f"{END}y")
    assert splitter.phase is Phase.ANSWER


def test_a_whole_reply_splits_like_the_stream() -> None:
    assert split_thinking(f"{START}reason{END}answer") == ("reason", "answer")
    assert split_thinking("answer only") == ("", "answer only")
    assert split_thinking(f"{START}unfinished") == ("unfinished", "")  # thinking cut short, as it was shown


def test_unicode_passes_through() -> None:
    text = f"{START}思考 🙂 ça\u0301{END}答案：é ≠ e"
    assert run_splitter(list(text)) == (*split_thinking(text), run_splitter(list(text))[2])
    assert split_thinking(text) == ("思考 🙂 ça\u0301", "答案：é ≠ e")


# --- properties -------------------------------------------------------------------------------------

pieces = st.sampled_from([START, END, "◁", "▷", "◁/", "think", "/", " ", "\n", "a", "é", "中", "🙂", "◁/thi", "x y"])


@st.composite
def text_and_cuts(draw):
    text = "".join(draw(st.lists(pieces, max_size=14)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(text_and_cuts())
def test_any_split_gives_the_same_parts(case) -> None:
    text, deltas = case
    thinking, answer, events = run_splitter(deltas)
    assert (thinking, answer) == reference_split(text)
    assert all(e.text for e in events), "no empty deltas"
    _, hidden_answer, hidden_events = run_splitter(deltas, show_thinking=False)
    assert hidden_answer == answer
    assert not any(isinstance(e, ThinkingDelta) for e in hidden_events)


# --- thinking budget ----------------------------------------------------------------------------------

# A toy vocabulary in which both markers take several tokens, as plain-text markers would.
VOCAB = {1: "◁", 2: "think▷", 3: "/", 7: "\n", **{i: f"w{i} " for i in range(10, 100)}}
START_IDS, END_IDS = [1, 2], [1, 3, 2]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


def generate(model_ids: list[int], budget: int | None) -> tuple[list[int], ThinkingBudget, list[int]]:
    """The decode loop's use of the helper: forced ids replace samples until they run out."""
    helper = ThinkingBudget(budget, START_IDS, END_IDS, clock=FakeClock())
    samples, out, forced, forced_at = iter(model_ids), [], [], []
    while True:
        if forced:
            tid = forced.pop(0)
            forced_at.append(len(out))
        else:
            tid = next(samples, None)
            if tid is None:
                break
        out.append(tid)
        forced += helper.feed(tid)
    return out, helper, forced_at


def test_budget_forces_the_end_marker_and_answer_follows() -> None:
    model = [*START_IDS, *range(10, 40)]  # the model would think for 30 tokens
    out, helper, forced_at = generate(model, budget=5)
    assert out == [*START_IDS, 10, 11, 12, 13, 14, *END_IDS, *range(15, 40)]
    assert forced_at == [7, 8, 9]
    thinking, answer = split_thinking(decode(out))
    assert thinking == "w10 w11 w12 w13 w14"
    assert answer.startswith("w15 ")  # the answer starts right after the forced marker
    assert (helper.thinking_tokens, helper.answer_tokens) == (2 + 5 + 3, 25)
    assert helper.phase is Phase.ANSWER


def test_budget_zero_skips_thinking() -> None:
    out, helper, _ = generate([*START_IDS, 10, 11], budget=0)
    assert out == [*START_IDS, *END_IDS, 10, 11]
    assert split_thinking(decode(out)) == ("", "w10 w11")
    assert (helper.thinking_tokens, helper.answer_tokens) == (5, 2)


def test_budget_completes_a_marker_the_model_began() -> None:
    out, _, forced_at = generate([*START_IDS, 10, 11, 1, 50], budget=3)
    assert out == [*START_IDS, 10, 11, 1, 3, 2, 50]
    assert forced_at == [5, 6]


def test_natural_end_within_budget_forces_nothing() -> None:
    model = [*START_IDS, 10, 11, *END_IDS, 7, 12]
    out, helper, forced_at = generate(model, budget=50)
    assert (out, forced_at) == (model, [])
    assert (helper.thinking_tokens, helper.answer_tokens) == (7, 2)
    assert helper.thinking_s == 0.5  # the fake clock ticks 0.5 s per reading: start, end


def test_instruct_stream_is_all_answer() -> None:
    _, helper, forced_at = generate([10, 11, 12], budget=0)
    assert forced_at == []
    assert (helper.thinking_tokens, helper.answer_tokens, helper.thinking_s) == (0, 3, 0.0)


def test_no_budget_only_counts() -> None:
    _, helper, forced_at = generate([*START_IDS, *range(10, 60)], budget=None)
    assert forced_at == [] and helper.in_thinking
    assert helper.thinking_tokens == 52


@settings(max_examples=200, deadline=None)
@given(
    model=st.lists(st.sampled_from([1, 2, 3, 7, 10, 11, 12]), max_size=30),
    budget=st.one_of(st.none(), st.integers(0, 12)),
)
def test_budget_invariants(model, budget) -> None:
    out, helper, forced_at = generate(model, budget)
    assert helper.thinking_tokens + helper.answer_tokens == len(out)
    assert min(helper.thinking_tokens, helper.answer_tokens) >= 0
    if forced_at:
        assert budget is not None
        assert forced_at == list(range(forced_at[0], forced_at[-1] + 1))
        assert out[forced_at[-1] - len(END_IDS) + 1 : forced_at[-1] + 1] == END_IDS
        assert helper.phase is Phase.ANSWER
    if budget is not None and helper.phase is Phase.THINKING:
        assert helper.reasoning_tokens <= budget
