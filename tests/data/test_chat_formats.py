"""Each family's chat format: conversation -> ids and labels, token by token, and the truncation rule."""

from __future__ import annotations

import json

import pytest

from instructglm.data.chat_formats import (
    CHATGLM3_TOOLS_PROMPT,
    EMPTY_TARGET,
    IGNORE_INDEX,
    KEPT,
    PROMPT_TOO_LONG,
    TRUNCATED,
    Encoded,
    chatglm3_tool_call,
    fit,
    spans_of,
)
from instructglm.data.messages import Message, ToolCall, conversation_of
from instructglm.data.records import BadRow
from instructglm.errors import BadValue
from instructglm.models.registry import CHAT_TEMPLATE, CHATGLM2_6B, CHATGLM3_6B, CHATGLM_6B, GLM_4
from tests.data.conftest import TOOL_CONVERSATION, TOOLS


def labelled_runs(ids, labels) -> list[list[int]]:
    """The runs of labelled ids, in order (every label must be its input id or -100)."""
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    return [ids[start:end] for start, end, _ in spans_of(labels, {})]


# ---- ChatGLM3 ----------------------------------------------------------------------------------------------------


def test_chatglm3_tool_call_is_the_demos_python_call():
    assert chatglm3_tool_call(ToolCall("get_weather", {"city": "Paris", "days": 2})) == (
        "```python\ntool_call(city='Paris', days=2)\n```"
    )
    assert chatglm3_tool_call(ToolCall("f", {"q": "it's", "x": [1, {"a": None}]})) == (
        "```python\ntool_call(q=\"it's\", x=[1, {'a': None}])\n```"
    )


def test_chatglm3_labels_of_a_tool_using_multi_turn_conversation_token_by_token(v3_tokenizer):
    tok = v3_tokenizer
    ids, labels = CHATGLM3_6B.training_ids(tok, TOOL_CONVERSATION, TOOLS)
    message = tok.build_single_message
    tools_system = CHATGLM3_TOOLS_PROMPT + "\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False)
    parts = [  # (ids, trained): the layout of ChatGLM3's finetune demo
        (tok.get_prefix_tokens(), False),
        (message("system", "", tools_system), False),
        (message("system", "", "You are a weather bot."), False),
        (message("user", "", "How warm is Paris?"), False),
        (message("assistant", "get_weather", "```python\ntool_call(city='Paris')\n```"), True),
        (message("observation", "", '{"temperature": 21}'), False),
        (message("assistant", "", "It is 21 °C."), True),
        (message("user", "", "Thanks!"), False),
        (message("assistant", "", "You are welcome."), True),
        ([tok.eos_token_id], False),
    ]
    assert ids == [token for part, _ in parts for token in part]
    # the demo's `loss_masks = [False, *loss_masks]`, in words: a trained message's tokens after its role
    # token, and the one token after the message (the next role token, or eos)
    expected = []
    for index, (part, trained) in enumerate(parts):
        after_trained = index > 0 and parts[index - 1][1]
        expected += [token if (trained and j > 0) or (j == 0 and after_trained) else IGNORE_INDEX for j, token in enumerate(part)]
    assert labels == expected
    runs = [tok.decode(run).replace(" ", "") for run in labelled_runs(ids, labels)]
    assert runs == [
        "get_weather\n```python\ntool_call(city='Paris')\n```<|observation|>",
        "\nItis21°C.<|user|>",
        "\nYouarewelcome.",  # and eos, which decodes to nothing
    ]
    assert labels[-1] == tok.eos_token_id


def test_chatglm3_prompt_is_build_chat_input(v3_tokenizer):
    """What chat prompts with is a prefix of what training saw, turn by turn, and is THUDM's build_chat_input."""
    tok = v3_tokenizer
    history = [
        {"role": "system", "content": CHATGLM3_TOOLS_PROMPT, "tools": TOOLS},
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "How warm is Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Paris')\n```"},
    ]
    thudm = tok.build_chat_input('{"temperature": 21}', history, role="observation")["input_ids"][0].tolist()
    prompt = CHATGLM3_6B.prompt_ids(tok, TOOL_CONVERSATION[:4], TOOLS)
    assert prompt == thudm
    ids, labels = CHATGLM3_6B.training_ids(tok, TOOL_CONVERSATION, TOOLS)
    assert ids[: len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX
    assert labels[len(prompt) - 1] == IGNORE_INDEX  # the <|assistant|> cue is the prompt's, not learned
    first = CHATGLM3_6B.prompt_ids(tok, TOOL_CONVERSATION[:2], TOOLS)
    assert ids[: len(first)] == first and set(labels[: len(first)]) == {IGNORE_INDEX}
    plain = CHATGLM3_6B.prompt_ids(tok, [Message("user", "你好")])
    assert plain == tok.build_chat_input("你好")["input_ids"][0].tolist()
    assert CHATGLM3_6B.context_prompt_ids(tok, "你好") == plain
    assert CHATGLM3_6B.stop_token_ids(tok) == tok.chat_stop_token_ids == [2, 64795, 64797]


def test_chatglm3_loss_flag_and_the_openai_shape(v3_tokenizer):
    """ChatGLM3's per-message `loss`; OpenAI's role `tool` and string arguments read as the same conversation."""
    tok = v3_tokenizer
    rows = [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi", "loss": False},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "hi again"},
    ]
    ids, labels = CHATGLM3_6B.training_ids(tok, rows)
    assert [tok.decode(run).strip() for run in labelled_runs(ids, labels)] == ["hi again"]
    openai = [
        TOOL_CONVERSATION[1],
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "name": "get_weather", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 °C."},
    ]
    ours = [TOOL_CONVERSATION[i] for i in (1, 2, 3, 4)]
    assert CHATGLM3_6B.training_ids(tok, openai, TOOLS) == CHATGLM3_6B.training_ids(tok, ours, TOOLS)


def test_chatglm3_refuses_a_chatglm2_tokenizer(v2_tokenizer):
    with pytest.raises(BadValue, match="no ChatGLM3 role tokens"):
        CHATGLM3_6B.training_ids(v2_tokenizer, TOOL_CONVERSATION[1:5])


# ---- GLM-4 and other chat templates -----------------------------------------------------------------------------


def test_glm4_labels_of_a_tool_using_multi_turn_conversation_token_by_token(glm4_tokenizer):
    tok = glm4_tokenizer
    ids, labels = GLM_4.training_ids(tok, TOOL_CONVERSATION, TOOLS)
    text = tok.decode(ids)
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手") and "## get_weather" in text
    assert text.endswith(
        "<|system|>\nYou are a weather bot.<|user|>\nHow warm is Paris?<|assistant|>get_weather\n{\"city\": \"Paris\"}"
        "<|observation|>\n{\"temperature\": 21}<|assistant|>\nIt is 21 °C.<|user|>\nThanks!<|assistant|>\nYou are welcome."
        "<|user|>"  # appended: GLM-4 ends a turn with the next role token, as its own fine-tuning demo appends
    )
    # the template renders as GLM-4's tokenizer does (chat template, then tokens without added specials)
    assert ids[:-1] == tok.apply_chat_template(TOOL_CONVERSATION[:0] + _glm_dicts(), tools=TOOLS, return_dict=False)
    runs = [tok.decode(run) for run in labelled_runs(ids, labels)]
    assert runs == [
        'get_weather\n{"city": "Paris"}<|observation|>',
        "\nIt is 21 °C.<|user|>",
        "\nYou are welcome.<|user|>",
    ]
    # everything else is the prompt: nothing of the system, user or tool-result text is labelled
    unlabelled = "".join(tok.decode([t]) for t, label in zip(ids, labels) if label == IGNORE_INDEX)
    assert "You are a weather bot." in unlabelled and '{"temperature": 21}' in unlabelled and "Thanks!" in unlabelled
    prompt = GLM_4.prompt_ids(tok, TOOL_CONVERSATION[:4], TOOLS)
    assert tok.decode(prompt).endswith('<|observation|>\n{"temperature": 21}<|assistant|>') and ids[: len(prompt)] == prompt
    stops = tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    assert GLM_4.stop_token_ids(tok) == stops
    assert GLM_4.stop_token_ids(tok, {"eos_token_id": [stops[1], 99]}) == [stops[1], 99, stops[0], stops[2]]


def _glm_dicts():
    return [
        TOOL_CONVERSATION[0],
        TOOL_CONVERSATION[1],
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": '{"temperature": 21}'},
        *TOOL_CONVERSATION[4:],
    ]


def test_openai_shaped_template_labels_each_turn_with_its_end(chat_llama_tokenizer):
    tok = chat_llama_tokenizer
    ids, labels = CHAT_TEMPLATE.training_ids(tok, TOOL_CONVERSATION, TOOLS)
    runs = [tok.decode(run) for run in labelled_runs(ids, labels)]
    assert runs == [
        '<call>{"name": "get_weather", "arguments": {"city": "Paris"}}</call></s>\n',
        "It is 21 °C.</s>\n",
        "You are welcome.</s>\n",
    ]
    text = tok.decode(ids)
    assert '<|tool|>\n{"temperature": 21}</s>\n' in text and text.startswith('<s><|system|>\n[{"type": "function"')
    prompt = CHAT_TEMPLATE.prompt_ids(tok, TOOL_CONVERSATION[:6], TOOLS)
    assert tok.decode(prompt).endswith("<|user|>\nThanks!</s>\n<|assistant|>\n") and ids[: len(prompt)] == prompt


def test_a_template_that_renders_turns_differently_in_context_is_refused(chat_llama_tokenizer):
    import copy

    tok = copy.deepcopy(chat_llama_tokenizer)
    # a template that only shows the last user message (Qwen3-style history rewriting, in miniature)
    tok.chat_template = (
        "{%- for m in messages %}{%- if m.role == 'assistant' %}<|assistant|>\n{{ m.content }}</s>"
        "{%- elif loop.last or m.role != 'user' %}<|{{ m.role }}|>\n{{ m.content }}</s>{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    with pytest.raises(BadRow) as error:
        CHAT_TEMPLATE.training_ids(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2)
    assert error.value.reason == "template_not_incremental"


def test_tools_a_template_never_reads_are_unsupported(chat_llama_tokenizer):
    import copy

    tok = copy.deepcopy(chat_llama_tokenizer)
    tok.chat_template = "{%- for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>{%- endfor %}"
    with pytest.raises(BadRow, match="shows no tools") as error:
        CHAT_TEMPLATE.training_ids(tok, TOOL_CONVERSATION, TOOLS)
    assert error.value.reason == "unsupported"


# ---- text families ----------------------------------------------------------------------------------------------


def test_chatglm2_prompt_is_build_prompt_and_trains_the_last_answer(v2_tokenizer):
    tok = v2_tokenizer
    rows = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    prompt = CHATGLM2_6B.prompt_ids(tok, rows)
    assert prompt == tok([tok.build_prompt("3+3?", [("2+2?", "4")])])["input_ids"][0]
    ids, labels = CHATGLM2_6B.training_ids(tok, [*rows, {"role": "assistant", "content": "6"}])
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ids[len(prompt) :] == tok.encode("6", add_special_tokens=False) + [tok.eos_token_id] == labels[len(prompt) :]
    with pytest.raises(BadRow, match="--template messages") as error:
        CHATGLM2_6B.training_ids(tok, TOOL_CONVERSATION, TOOLS)
    assert error.value.reason == "needs_messages_template"


def test_chatglm6b_keeps_the_seeds_rule(chatglm6b_tokenizer):
    tok = chatglm6b_tokenizer
    rows = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    ids, labels = CHATGLM_6B.training_ids(tok, rows)
    prompt = tok.encode("你好")  # no history: the query alone, then [gMASK] <sop>
    assert ids == prompt + tok.encode("你好！", add_special_tokens=False) + [tok.eos_token_id]
    sop = tok.convert_tokens_to_ids("<sop>")
    assert labels[: len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1) and labels[len(prompt) - 1] == sop
    history = [*rows, {"role": "user", "content": "再见"}]
    assert CHATGLM_6B.prompt_ids(tok, history) == tok.encode("[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：再见\n答：")


# ---- truncation -------------------------------------------------------------------------------------------------


def _row(spans_text: str) -> Encoded:
    """A row from a picture: `p` prompt, `a` labelled, `E` a labelled end marker; spans split at each E."""
    ids = list(range(len(spans_text)))
    labels = [IGNORE_INDEX if c == "p" else i for i, c in enumerate(spans_text)]
    tails = {i + 1: 1 for i, c in enumerate(spans_text) if c == "E"}
    return Encoded(ids, labels, spans_of(labels, tails))


def test_fit_cuts_the_first_turn_that_does_not_fit_at_its_content_end():
    row = _row("pppaaEpppaaaaE")
    assert fit(row, 14) == (row, KEPT, 0)
    cut, outcome, dropped = fit(row, 12)  # the second answer keeps 2 of 4 content tokens and its end marker
    assert outcome == TRUNCATED and dropped == 0
    assert cut.input_ids == [*range(11), 13] and cut.labels[-1] == 13 and len(cut.input_ids) == 12
    assert cut.spans == [(3, 6, 1), (9, 12, 1)]
    cut, outcome, dropped = fit(row, 10)  # no content token of the second turn fits: the row ends after the first
    assert outcome == TRUNCATED and dropped == 1 and cut.input_ids == list(range(6)) and cut.spans == [(3, 6, 1)]
    cut, outcome, dropped = fit(row, 5)  # the first answer cut to one content token + its end
    assert outcome == TRUNCATED and dropped == 1 and cut.input_ids == [0, 1, 2, 3, 5]
    assert fit(row, 4) == (None, PROMPT_TOO_LONG, 0)
    assert fit(Encoded([1, 2], [IGNORE_INDEX] * 2, []), 8) == (None, EMPTY_TARGET, 0)


def test_truncated_rows_never_cut_a_prompt_mid_turn(v3_tokenizer):
    from instructglm.data.messages import checked

    conversation = checked(conversation_of(TOOL_CONVERSATION, TOOLS))
    full = CHATGLM3_6B.encode(v3_tokenizer, conversation)
    starts = [start for start, _, _ in full.spans]
    for limit in range(starts[0], len(full.input_ids) + 1, 7):
        row, outcome, _ = fit(full, limit)
        if row is None:
            assert outcome == PROMPT_TOO_LONG and limit <= starts[0] + 1
            continue
        assert len(row.input_ids) <= limit
        # the kept ids are the full row's up to the cut turn's content, then its end marker
        last_start, last_end, tail = row.spans[-1]
        kept = row.input_ids[: last_end - tail]
        assert kept == full.input_ids[: len(kept)]
        assert row.input_ids[last_end - tail : last_end] in [full.input_ids[e - t : e] for _, e, t in full.spans]


# ---- replies back to messages -----------------------------------------------------------------------------------


def test_replies_parse_back_into_the_messages_they_were_trained_from(v3_tokenizer, glm4_tokenizer):
    call = Message("assistant", "", (ToolCall("get_weather", {"city": "Paris", "days": 2}),))
    for family, tok in ((CHATGLM3_6B, v3_tokenizer), (GLM_4, glm4_tokenizer)):
        conversation = [TOOL_CONVERSATION[1], call, TOOL_CONVERSATION[3], TOOL_CONVERSATION[4]]
        ids, labels = family.training_ids(tok, conversation, TOOLS)
        runs = labelled_runs(ids, labels)
        stops = set(family.stop_token_ids(tok))
        replies = [family.parse_reply(tok.decode([t for t in run if t not in stops]), tok) for run in runs]
        assert replies[0].tool_calls == call.tool_calls and replies[0].content == ""
        assert replies[1] == Message("assistant", "It is 21 °C.")
    # ChatGLM3's code interpreter keeps its metadata; a plain reply is its text
    assert CHATGLM3_6B.parse_reply("interpreter\n```python\nprint(1)\n```") == Message(
        "assistant", "```python\nprint(1)\n```", metadata="interpreter"
    )
    assert CHATGLM3_6B.parse_reply("\n 你好") == Message("assistant", "你好")
