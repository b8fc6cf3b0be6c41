"""Templates: the seed's exact prompt strings, THUDM's round prompt, custom format strings."""

from __future__ import annotations

import pytest

from instructglm.data.templates import TEMPLATES, get_template
from instructglm.models.registry import CAUSAL_LM, CHATGLM_6B


def render(name, *args, **kwargs):
    return get_template(name).render(*args, **kwargs)


def test_alpaca_is_the_seeds():
    # mymusise/ChatGLM-Tuning cover_alpaca2jsonl.py: the Input line only when input is non-empty
    assert render("alpaca", "Add the numbers.") == "Instruction: Add the numbers.\nAnswer: "
    assert render("alpaca", "Add the numbers.", "2 3") == "Instruction: Add the numbers.\nInput: 2 3\nAnswer: "


def test_belle_is_the_seeds():
    # yanqiangmiffy/InstructGLM cover_belle2jsonl.py, BELLE's `input` kept as is (often ends in "\n")
    assert render("belle", "用一句话描述地球。\n") == "指令: 用一句话描述地球。\n\n答案: "
    assert render("belle", "翻译", "你好") == "指令: 翻译\n输入: 你好\n答案: "


def test_instruction_response():
    assert render("instruction-response", "Sum", "1 2") == "###Instruction:Sum###Input:1 2###Response:"
    assert render("instruction-response", "Sum") == "###Instruction:Sum###Response:"


def test_chatglm_no_history_is_the_query_alone():
    assert render("chatglm", "你好") == "你好"
    assert render("chatglm", "Upper-case it.", "abc") == "Upper-case it.\nabc"


def test_chatglm_rounds_with_history():
    prompt = render("chatglm", "再加一呢？", history=[("一加一等于几？", "二"), ("再加一呢？", "三")])
    assert prompt == "[Round 0]\n问：一加一等于几？\n答：二\n[Round 1]\n问：再加一呢？\n答：三\n[Round 2]\n问：再加一呢？\n答："


def test_plain():
    assert render("plain", "q", "x") == "q\nx"
    assert render("plain", "q2", history=[("q1", "a1")]) == "q1\na1\nq2"


def test_single_turn_templates_keep_history_as_earlier_rounds():
    assert render("alpaca", "q2", history=[("q1", "a1")]) == "Instruction: q1\nAnswer: a1\nInstruction: q2\nAnswer: "
    assert render("belle", "q2", history=[("q1", "a1")]) == "指令: q1\n答案: a1\n指令: q2\n答案: "


def test_custom_format_string_with_shell_escapes():
    template = get_template(r"Q: {instruction}\n{input}\nA: ")
    assert template.render("add", "1 2") == "Q: add\n1 2\nA: "
    assert template.name == r"Q: {instruction}\n{input}\nA: "  # saved as given; get_template(name) rebuilds it
    assert get_template(template.name).render("add", "1 2") == "Q: add\n1 2\nA: "


def test_custom_format_string_with_history_field():
    template = get_template("{history}User: {instruction} {{x}}\nBot: ")
    assert template.render("q2", history=[("q1", "a1")]) == "q1\na1\nUser: q2 {x}\nBot: "
    assert template.render("q") == "User: q {x}\nBot: "


def test_custom_without_history_field_renders_rounds():
    assert get_template("Q:{instruction}|").render("q2", history=[("q1", "a1")]) == "Q:q1|a1\nQ:q2|"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("alpacca", "unknown template"),
        ("{question}", r"unknown fields \['question'\]"),
        ("{history} only", "no {instruction} or {input}"),
        ("{instruction", "not a valid format string"),
        ("{}", "unknown fields"),
    ],
)
def test_bad_templates_say_what_to_use(bad, message):
    with pytest.raises(ValueError, match=message) as info:
        get_template(bad)
    assert "alpaca" in str(info.value) or "literal braces" in str(info.value)


def test_names_are_kept_and_family_chat_templates_exist():
    for name in TEMPLATES:
        assert get_template(name).name == name
    assert {CHATGLM_6B.chat_template, CAUSAL_LM.chat_template} <= set(TEMPLATES)


def test_history_may_be_lists_from_json():
    assert render("chatglm", "q", history=[["a", "b"]]) == "[Round 0]\n问：a\n答：b\n[Round 1]\n问：q\n答："
