"""Exact prompt tokens of every format.

Expectations are spelled out with sentencepiece directly (`sp.encode`), never by calling the code
under test another way: these formats are how the models were trained, so every id must match."""

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from llama.formats import (
    chat_prompt_tokens,
    chat_stop_ids,
    check_dialog,
    completion_prompt_tokens,
    dialog_prompt_tokens,
    has_special_tags,
    infilling_prompt_tokens,
    infilling_stop_ids,
    render_chat_template,
    template_variables,
)
from llama.sampling import sample_top_p
from llama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer(str(tiny_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def sp(tiny_dir):
    return SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def step_tok(tiny_step_dir):
    return Tokenizer(str(tiny_step_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def step_sp(tiny_step_dir):
    return SentencePieceProcessor(model_file=str(tiny_step_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def ids(sp):
    """Special ids looked up in sentencepiece."""
    return {name: sp.piece_to_id(piece) for name, piece in
            [("pre", "▁<PRE>"), ("mid", "▁<MID>"), ("suf", "▁<SUF>"), ("eot", "▁<EOT>")]}


def encode_no_space(sp, s):
    """s without sentencepiece's implicit leading space: encode "☺" + s, drop "▁" and "☺"."""
    t = sp.encode("☺" + s)
    assert [sp.id_to_piece(i) for i in t[:2]] == ["▁", "☺"]
    return t[2:]


def user(content, **kw):
    return {"role": "user", "content": content, **kw}


def assistant(content, **kw):
    return {"role": "assistant", "content": content, **kw}


def system(content, **kw):
    return {"role": "system", "content": content, **kw}


BOS, EOS = 1, 2

# Completion ----------------------------------------------------------------------------------


def test_completion(tok, sp):
    assert completion_prompt_tokens(tok, "def fib(n):") == [BOS] + sp.encode("def fib(n):")


def test_completion_empty_prompt(tok):
    assert completion_prompt_tokens(tok, "") == [BOS]


# Infilling -----------------------------------------------------------------------------------

PREFIX = "def remove_non_ascii(s: str) -> str:\n    "
SUFFIX = "\n    return result\n"


def test_infilling_prefix_suffix_middle(tok, sp, ids):
    expected = (
        [BOS, ids["pre"]] + sp.encode(PREFIX)
        + [ids["suf"]] + encode_no_space(sp, SUFFIX)
        + [ids["mid"]]
    )
    assert infilling_prompt_tokens(tok, PREFIX, SUFFIX) == expected


def test_infilling_suffix_first(tok, sp, ids):
    expected = (
        [BOS, ids["pre"], ids["suf"]] + encode_no_space(sp, SUFFIX)
        + [ids["mid"]] + sp.encode(PREFIX)
    )
    assert infilling_prompt_tokens(tok, PREFIX, SUFFIX, suffix_first=True) == expected


def test_infilling_suffix_starting_with_space(tok, sp, ids):
    """A suffix " x" keeps its one real space: "▁x", not the "▁▁" plain encode would give."""
    expected = [BOS, ids["pre"]] + sp.encode("a =") + [ids["suf"]] + encode_no_space(sp, " x") + [ids["mid"]]
    assert infilling_prompt_tokens(tok, "a =", " x") == expected
    assert encode_no_space(sp, " x") != sp.encode(" x")  # the two encodings really differ here


def test_infilling_empty_prefix_and_suffix(tok, ids):
    assert infilling_prompt_tokens(tok, "", "") == [BOS, ids["pre"], ids["suf"], ids["mid"]]
    assert infilling_prompt_tokens(tok, "", "", suffix_first=True) == [BOS, ids["pre"], ids["suf"], ids["mid"]]


def test_infilling_needs_infilling_pieces(step_tok):
    with pytest.raises(ValueError, match="infilling pieces"):
        infilling_prompt_tokens(step_tok, "a", "b")


def test_infilling_stop_ids(tok, ids):
    assert infilling_stop_ids(tok) == [ids["eot"], EOS]


# Llama-2 chat format (tokenizers without <step>) ---------------------------------------------


def test_llama2_single_turn(tok, sp):
    assert chat_prompt_tokens(tok, [user("hi")]) == [BOS] + sp.encode("[INST] hi [/INST]")


def test_llama2_strips_whitespace(tok, sp):
    dialog = [user("  hi \n"), assistant("\n hello  "), user(" bye\t")]
    expected = (
        [BOS] + sp.encode("[INST] hi [/INST] hello ") + [EOS]
        + [BOS] + sp.encode("[INST] bye [/INST]")
    )
    assert chat_prompt_tokens(tok, dialog) == expected


def test_llama2_multi_turn(tok, sp):
    dialog = [user("What is 2+2?"), assistant("4."), user("And 3+3?"), assistant("6."), user("Thanks")]
    expected = (
        [BOS] + sp.encode("[INST] What is 2+2? [/INST] 4. ") + [EOS]
        + [BOS] + sp.encode("[INST] And 3+3? [/INST] 6. ") + [EOS]
        + [BOS] + sp.encode("[INST] Thanks [/INST]")
    )
    assert chat_prompt_tokens(tok, dialog) == expected


def test_llama2_system_message(tok, sp):
    dialog = [system("Answer in Python."), user("sort a list")]
    expected = [BOS] + sp.encode("[INST] <<SYS>>\nAnswer in Python.\n<</SYS>>\n\nsort a list [/INST]")
    assert chat_prompt_tokens(tok, dialog) == expected


def test_llama2_system_message_multi_turn(tok, sp):
    """The system text is folded in before stripping: the user's own leading space stays."""
    dialog = [system("Be brief."), user(" hi "), assistant("hello"), user("bye")]
    expected = (
        [BOS] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n hi [/INST] hello ") + [EOS]
        + [BOS] + sp.encode("[INST] bye [/INST]")
    )
    assert chat_prompt_tokens(tok, dialog) == expected


def test_llama2_destination_is_ignored(tok, sp):
    assert chat_prompt_tokens(tok, [user("hi", destination="assistant")]) == [BOS] + sp.encode("[INST] hi [/INST]")


def test_chat_stop_ids_llama2(tok):
    assert chat_stop_ids(tok) == [EOS]


# 70B turn format (tokenizers with <step>) -----------------------------------------------------


def turn_reply_start(sp):
    return sp.encode(" Source: assistant\nDestination: user") + sp.encode("\n\n ")


def test_70b_without_system(step_tok, step_sp):
    """dialog_prompt_tokens formats the messages as given, as the reference's does; the chat path
    (chat_prompt_tokens, chat_completion) puts an empty system message first."""
    sp, step = step_sp, step_tok.step_id
    expected = [BOS] + sp.encode(" Source: user") + sp.encode("\n\n hi") + [step] + turn_reply_start(sp)
    assert dialog_prompt_tokens(step_tok, [user("hi")]) == expected
    assert chat_prompt_tokens(step_tok, [user("hi")]) == (
        [BOS] + sp.encode(" Source: system") + [step] + expected[1:]
    )


def test_70b_with_system(step_tok, step_sp):
    sp, step = step_sp, step_tok.step_id
    dialog = [system("  Be brief. "), user(" hi ")]
    expected = (
        [BOS]
        + sp.encode(" Source: system") + sp.encode("\n\n Be brief.") + [step]
        + sp.encode(" Source: user") + sp.encode("\n\n hi") + [step]
        + turn_reply_start(sp)
    )
    assert dialog_prompt_tokens(step_tok, dialog) == expected


def test_70b_empty_system_content_is_like_no_system(step_tok, step_sp):
    sp, step = step_sp, step_tok.step_id
    expected = (
        [BOS]
        + sp.encode(" Source: system") + [step]
        + sp.encode(" Source: user") + sp.encode("\n\n hi") + [step]
        + turn_reply_start(sp)
    )
    assert dialog_prompt_tokens(step_tok, [system(""), user("hi")]) == expected


def test_70b_destination(step_tok, step_sp):
    """The destination goes into the same string as the source (one encode call)."""
    sp, step = step_sp, step_tok.step_id
    dialog = [user("hi", destination=" assistant ")]
    expected = (
        [BOS]
        + sp.encode(" Source: system") + [step]
        + sp.encode(" Source: user\nDestination: assistant") + sp.encode("\n\n hi") + [step]
        + turn_reply_start(sp)
    )
    assert chat_prompt_tokens(step_tok, dialog) == expected
    # Encoding the two header lines separately would give other tokens:
    assert sp.encode(" Source: user\nDestination: assistant") != (
        sp.encode(" Source: user") + sp.encode("\nDestination: assistant")
    )


def test_70b_multi_turn(step_tok, step_sp):
    sp, step = step_sp, step_tok.step_id
    dialog = [system("sys"), user("q1"), assistant(" a1 ", destination="user"), user("q2")]
    expected = (
        [BOS]
        + sp.encode(" Source: system") + sp.encode("\n\n sys") + [step]
        + sp.encode(" Source: user") + sp.encode("\n\n q1") + [step]
        + sp.encode(" Source: assistant\nDestination: user") + sp.encode("\n\n a1") + [step]
        + sp.encode(" Source: user") + sp.encode("\n\n q2") + [step]
        + turn_reply_start(sp)
    )
    assert dialog_prompt_tokens(step_tok, dialog) == expected


def test_chat_prompt_tokens_uses_70b_format_with_step(step_tok, step_sp):
    sp, step = step_sp, step_tok.step_id
    expected = (
        [BOS]
        + sp.encode(" Source: system") + [step]
        + sp.encode(" Source: user") + sp.encode("\n\n hi") + [step]
        + turn_reply_start(sp)
    )
    assert chat_prompt_tokens(step_tok, [user("hi")]) == expected


def test_70b_format_needs_step_piece(tok):
    with pytest.raises(ValueError, match="<step>"):
        dialog_prompt_tokens(tok, [user("hi")])


def test_chat_stop_ids_70b(step_tok, step_sp):
    assert chat_stop_ids(step_tok) == [step_sp.piece_to_id("<step>"), EOS]


# Chat templates (checkpoints that carry one) -------------------------------------------------

# Exercises what transformers' rendering does: trim_blocks and lstrip_blocks, loop controls,
# bos_token/eos_token, tojson keeping non-ASCII text, raise_exception.
TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' and not loop.first %}{{ raise_exception('system must be first') }}{% endif %}
    {% if loop.index > 6 %}{% break %}{% endif %}
    <{{ message['role'] }}>{{ message['content'] | trim }}{{ message | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_chat_template_renders_as_transformers(smollm2_tokenizer, smollm2_hf_tokenizer):
    dialog = [system("Sé bref 🦙"), user("  hi  "), assistant("yo"), user("and\nmore")]
    expected = smollm2_hf_tokenizer.apply_chat_template(dialog, chat_template=TEMPLATE, tokenize=False,
                                                        add_generation_prompt=True)
    assert render_chat_template(TEMPLATE, dialog, **template_variables(smollm2_tokenizer)) == expected
    assert "Sé bref 🦙" in expected and expected.startswith("<|im_start|>")


def test_chat_template_raise_exception_is_a_value_error():
    with pytest.raises(ValueError, match="system must be first"):
        render_chat_template(TEMPLATE, [user("a"), assistant("b"), system("c"), user("d")])


def test_chat_template_is_sandboxed():
    with pytest.raises(ValueError):
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [user("a")])


def test_chat_template_with_bad_syntax():
    with pytest.raises(ValueError, match="not valid Jinja"):
        render_chat_template("{% for m in messages %}", [user("a")])


def test_code_llama_tokenizers_keep_their_formats(tok, step_tok):
    """Sentencepiece tokenizers carry no template: [INST] and <step> apply (pinned above)."""
    assert tok.chat_template is None and step_tok.chat_template is None


# Dialog validation ---------------------------------------------------------------------------

BAD_DIALOGS = {
    "empty": ([], ValueError, ["empty"]),
    "unknown role": ([{"role": "bot", "content": "hi"}], ValueError, ["role", "'bot'"]),
    "two users in a row": ([user("a"), user("b")], ValueError, ["'user'", "'assistant'"]),
    "ends with assistant": ([user("a"), assistant("b")], ValueError, ["last", "'user'"]),
    "only system": ([system("s")], ValueError, ["'user'"]),
    "system not first": ([user("a"), assistant("b"), system("c"), user("d")], ValueError, ["'system'"]),
    "non-dict message": (["hello"], TypeError, ["dict"]),
    "non-str content": ([{"role": "user", "content": 3}], TypeError, ["content", "str"]),
    "missing content": ([{"role": "user"}], TypeError, ["content"]),
    "not a list": ("hello", TypeError, ["list"]),
}


@pytest.mark.parametrize("which", ["tok", "step_tok"])
@pytest.mark.parametrize("case", list(BAD_DIALOGS))
def test_bad_dialog(case, which, request):
    dialog, exc, words = BAD_DIALOGS[case]
    with pytest.raises(exc) as info:
        chat_prompt_tokens(request.getfixturevalue(which), dialog)
    for w in words:
        assert w.lower() in str(info.value).lower(), (w, str(info.value))


def test_check_dialog_names_the_dialog_index():
    with pytest.raises(ValueError, match="dialog 3"):
        check_dialog([], 3)


def test_valid_dialogs_pass_check():
    check_dialog([user("a")])
    check_dialog([system("s"), user("a"), assistant("b"), user("c")])


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<step>"])
def test_has_special_tags(tag):
    assert has_special_tags([user(f"please {tag} now")])
    assert has_special_tags([system(f"x{tag}"), user("hi")])
    assert has_special_tags([user("a"), assistant(tag), user("c")])


def test_has_no_special_tags():
    assert not has_special_tags([system("be nice"), user("[INS] <SYS> step"), assistant("ok"), user("hi")])


# Re-exports of the reference's llama.generation ------------------------------------------------


def test_generation_reexports():
    from llama.generation import (  # noqa: F401
        B_INST, B_SYS, E_INST, E_SYS, SPECIAL_TAGS, UNSAFE_ERROR,
        dialog_prompt_tokens, infilling_prompt_tokens, sample_top_p,
    )

    assert B_INST == "[INST]"
    assert E_INST == "[/INST]"
    assert B_SYS == "<<SYS>>\n"
    assert E_SYS == "\n<</SYS>>\n\n"
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."
    assert SPECIAL_TAGS == ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<step>"]
    assert callable(dialog_prompt_tokens) and callable(infilling_prompt_tokens) and callable(sample_top_p)


# sample_top_p ---------------------------------------------------------------------------------


def draw(probs, p, n=4000, seed=0):
    """n draws from one distribution, as a set of ids."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.tensor([probs], dtype=torch.float32).repeat(n, 1)
    out = sample_top_p(batch, p, generator=g)
    assert out.shape == (n, 1) and out.dtype == torch.long
    return set(out.flatten().tolist())


def test_top_p_never_draws_outside_the_nucleus():
    # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05 (id 0); preceding sums 0, .5, .8, .95
    assert draw([0.05, 0.5, 0.15, 0.3], p=0.7) == {1, 3}


def test_top_p_keeps_a_token_whose_preceding_sum_equals_p():
    """Dropped only when the preceding cumulative probability *exceeds* p (exact dyadic values)."""
    assert draw([0.125, 0.5, 0.125, 0.25], p=0.5) == {1, 3}  # preceding sum of id 3 is exactly 0.5
    assert draw([0.125, 0.5, 0.125, 0.25], p=0.4) == {1}


def test_top_p_one_draws_every_token_with_probability():
    assert draw([0.05, 0.5, 0.15, 0.3], p=1.0) == {0, 1, 2, 3}


def test_top_p_never_draws_zero_probability_tokens():
    assert draw([0.5, 0.0, 0.5, 0.0], p=1.0) == {0, 2}


def test_top_p_does_not_modify_its_input():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    before = probs.clone()
    sample_top_p(probs, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(probs, before)


def test_top_p_rows_are_independent():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = sample_top_p(probs, 0.9, generator=torch.Generator().manual_seed(0))
    assert out.tolist() == [[0], [2]]
