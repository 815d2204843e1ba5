"""answers.Answer: one answer's tokens to text deltas, stop strings, hold-back and the Result."""

from llama.answers import Answer
from llama.batch import RowUpdate

# A toy vocabulary: token i decodes to WORDS[i], so expectations are built by hand.
WORDS = ["a", "b", "cd", "STO", "P", "x", "é"]


def decode(tokens):
    return "".join(WORDS[t] for t in tokens)


def run(answer, *updates):
    deltas, result = [], None
    for tokens, finish in updates:
        text, r = answer.add(RowUpdate(0, tokens, [-0.5] * len(tokens), finish))
        deltas.append(text)
        result = r or result
    return deltas, result


def test_deltas_join_to_the_text_and_the_end_says_why():
    deltas, result = run(Answer(decode, prompt_tokens=7), ([0], None), ([1, 2], None), ([5], "stop"))
    assert deltas == ["a", "bcd", "x"]
    assert (result.text, result.finish_reason, result.stop_type) == ("abcdx", "stop", "eos")
    assert (result.prompt_tokens, result.completion_tokens) == (7, 4)
    _, result = run(Answer(decode), ([0], "length"))
    assert (result.finish_reason, result.stop_type) == ("length", "limit")


def test_stop_string_cuts_the_text_and_text_that_may_begin_one_is_held_back():
    answer = Answer(decode, stop=["STOP", "zz"])
    deltas, result = run(answer, ([0, 1], None), ([3], None), ([4, 5], None))
    # The last len("STOP") - 1 = 3 characters may begin a stop string: "ab" is held, then "abSTO"
    # lets "ab" out, then "P" completes "STOP" and the answer ends before it.
    assert deltas == ["", "ab", ""]
    assert (result.text, result.finish_reason, result.stop_type, result.stopping_word) == ("ab", "stop", "word", "STOP")


def test_earliest_stop_string_wins_and_logprobs_keep_only_tokens_before_the_cut():
    answer = Answer(decode, piece=lambda t: f"<{WORDS[t]}>", stop=["x", "cd"], logprobs=True)
    _, result = run(answer, ([0, 2, 1, 5], None))
    assert (result.text, result.stopping_word) == ("a", "cd")
    assert (result.tokens, result.logprobs, result.offsets) == (["<a>"], [-0.5], [0])


def test_held_back_text_comes_out_at_the_end():
    deltas, result = run(Answer(decode, stop=["STOP"]), ([0, 3], None), ([], "stop"))
    assert deltas == ["a", "STO"] and result.text == "aSTO"
