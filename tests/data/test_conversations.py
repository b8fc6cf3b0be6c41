"""Whole conversations through the data commands: message records, readers, convert --template messages,
tokenize per family (labels, truncation, unsupported rows) and stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructglm.data.chat_formats import IGNORE_INDEX
from instructglm.data.convert import convert
from instructglm.data.messages import Conversation, Message, ToolCall, checked, conversation_of, from_example, to_example
from instructglm.data.readers import read_messages_conversation, read_sharegpt, read_sharegpt_conversation
from instructglm.data.records import BadRow, DataError, Example
from instructglm.data.stats import jsonl_stats
from instructglm.data.tokenize import read_jsonl_rows, tokenize_dataset
from instructglm.models.registry import CHATGLM3_6B
from tests.data.conftest import ASSETS, TOOL_CONVERSATION, TOOLS

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- records --------------------------------------------------------------------------------------------------


def test_message_round_trip_and_openai_shape():
    message = Message.from_dict(
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    )
    assert message == Message("assistant", "", (ToolCall("f", {"a": 1}),))
    assert Message.from_dict(message.to_dict()) == message
    assert Message.from_dict({"role": "tool", "content": "ok", "name": "f"}) == Message("observation", "ok", name="f")
    for bad, reason in [
        ({"role": "wizard", "content": "x"}, "bad_conversation"),
        ({"role": "user", "content": 3}, "non_string_field"),
        ({"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}, "bad_conversation"),
        ({"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{nope"}]}, "bad_tool_call"),
    ]:
        with pytest.raises(BadRow) as error:
            Message.from_dict(bad)
        assert error.value.reason == reason


def test_checked_drops_unanswered_turns_and_refuses_what_cannot_be_learned():
    conversation = conversation_of([*TOOL_CONVERSATION, {"role": "user", "content": "one more?"}], TOOLS)
    assert checked(conversation).messages == conversation.messages[:-1]
    for messages, reason in [
        ([{"role": "user", "content": "q"}], "empty_output"),
        ([{"role": "assistant", "content": "a"}], "empty_prompt"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "bad_conversation"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty_output"),
    ]:
        with pytest.raises(BadRow) as error:
            checked(conversation_of(messages))
        assert error.value.reason == reason


def test_examples_and_conversations_convert_both_ways():
    example = Example("q2", "a2", input="x", history=(("q1", "a1"),), system="be brief")
    conversation = from_example(example)
    assert [m.role for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.messages[3].content == "q2\nx"
    assert to_example(conversation) == Example("q2\nx", "a2", history=(("q1", "a1"),), system="be brief")
    with pytest.raises(BadRow, match="--template messages"):
        to_example(conversation_of(TOOL_CONVERSATION, TOOLS))


# ---- readers ----------------------------------------------------------------------------------------------------


def test_chatglm3_demo_layout_with_tools_and_loss():
    rows = json.loads((ASSETS / "chatglm3_tools.json").read_text(encoding="utf-8"))
    conversation = read_sharegpt_conversation(rows[0])
    assert conversation.tools == (rows[0]["tools"][0],)
    assert [m.role for m in conversation.messages] == ["system", "user", "assistant", "observation", "assistant", "user", "assistant"]
    call = conversation.messages[2]  # the thought and the demo's `tool` turn are one assistant message
    assert call.content == "Let me look it up." and call.tool_calls == (ToolCall("get_weather", {"city": "Paris"}),)
    assert conversation.messages[3] == Message("observation", '{"temperature": 21}', name="get_weather")
    assert read_sharegpt_conversation(rows[2]).messages[1].loss is False


def test_llamafactory_sharegpt_tool_layout():
    rows = json.loads((ASSETS / "sharegpt_tools.json").read_text(encoding="utf-8"))
    conversation = read_sharegpt_conversation(rows[0])
    assert conversation.tools == (WEATHER_TOOL,)
    assert conversation.messages == (
        Message("system", "You are a weather bot."),
        Message("user", "How warm is Paris?"),
        Message("assistant", "", (ToolCall("get_weather", {"city": "Paris"}),)),
        Message("observation", '{"temperature": 21}'),
        Message("assistant", "It is 21 °C in Paris."),
    )
    # the text path still reads the plain rows, and names the fix for tool turns
    with pytest.raises(BadRow, match="--template messages"):
        read_sharegpt(rows[0])


def test_openai_messages_layout():
    rows = [json.loads(line) for line in (ASSETS / "openai_messages.jsonl").read_text(encoding="utf-8").splitlines()]
    conversation = read_messages_conversation(rows[0])
    assert conversation.messages[2].tool_calls == (ToolCall("get_weather", {"city": "Paris"}),)
    assert conversation.messages[3] == Message("observation", '{"temperature": 21}', name="get_weather")
    assert conversation.tools == tuple(rows[0]["tools"])
    assert read_messages_conversation(rows[1]).messages[2] == Message("user", "and 3+3?")
    with pytest.raises(BadRow) as error:
        read_messages_conversation(rows[2])
    assert error.value.reason == "empty_output"


# ---- convert ----------------------------------------------------------------------------------------------------


def test_convert_messages_keeps_whole_conversations(tmp_path):
    out = tmp_path / "chat.jsonl"
    meta = convert(str(out), data_path=str(ASSETS / "chatglm3_tools.json"), template="messages")
    assert meta["template"] == "messages" and meta["format"] == "sharegpt" and meta["counts"]["written"] == 3
    lines = _lines(out)
    assert lines[0]["tools"] == json.loads((ASSETS / "chatglm3_tools.json").read_text(encoding="utf-8"))[0]["tools"]
    assert [m["role"] for m in lines[0]["messages"]].count("assistant") == 3  # every turn, one row
    assert lines[0]["messages"][2]["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert "tools" not in lines[1] and lines[2]["messages"][1]["loss"] is False
    again = tmp_path / "again.jsonl"
    convert(str(again), data_path=str(out), template="messages", format="messages")
    assert _lines(again) == lines  # the jsonl reads back as the same conversations


def test_convert_defaults_stay_the_seeds_and_tool_rows_need_messages(tmp_path):
    out = tmp_path / "flat.jsonl"
    meta = convert(str(out), data_path=str(ASSETS / "sharegpt_tools.json"))
    assert meta["template"] == "chatglm" and _lines(out) == [
        {"context": "[Round 0]\n问：2+2?\n答：4\n[Round 1]\n问：and 3+3?\n答：", "target": "6"}
    ]
    assert "--template messages" in meta["report"]
    openai = tmp_path / "openai.jsonl"
    assert convert(str(openai), data_path=str(ASSETS / "openai_messages.jsonl"))["template"] == "messages"
    assert len(_lines(openai)) == 2


# ---- tokenize ---------------------------------------------------------------------------------------------------


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    out = tmp_path / "chat.jsonl"
    convert(str(out), data_path=str(ASSETS / "chatglm3_tools.json"), template="messages")
    return out


def test_tokenize_messages_for_chatglm3_labels_every_turn_in_one_row(chat_jsonl, v3_tokenizer):
    dataset, counts = tokenize_dataset(chat_jsonl, v3_tokenizer, 512, model_type="chatglm", progress=False)
    assert dataset.column_names == ["input_ids", "labels", "seq_len"] and counts.kept == 3
    rows = read_jsonl_rows(chat_jsonl).conversations
    for row, conversation in zip(dataset, rows):
        ids, labels = CHATGLM3_6B.training_ids(v3_tokenizer, conversation.messages, conversation.tools)
        assert row["input_ids"] == ids and row["labels"] == labels
        assert row["seq_len"] == next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def test_tokenize_context_target_rows_for_a_role_family_as_one_user_turn(tmp_path, v3_tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"context": "Instruction: add\nAnswer: ", "target": "4"}) + "\n", encoding="utf-8")
    dataset, _ = tokenize_dataset(path, v3_tokenizer, 64, model_type="chatglm", progress=False)
    expected = CHATGLM3_6B.training_ids(
        v3_tokenizer, [{"role": "user", "content": "Instruction: add\nAnswer: "}, {"role": "assistant", "content": "4"}]
    )
    assert (dataset[0]["input_ids"], dataset[0]["labels"]) == expected


def test_tokenize_messages_for_text_families_flattens_and_drops_tool_rows(chat_jsonl, v2_tokenizer, chatglm6b_tokenizer):
    dataset, counts = tokenize_dataset(chat_jsonl, v2_tokenizer, 512, model_type="chatglm", progress=False)
    assert counts.dropped_unsupported == 1 and counts.kept == 2 and dataset.column_names == ["input_ids", "seq_len"]
    last = v2_tokenizer.build_prompt("Again", [("Say hi", "hi")])
    assert dataset[1]["input_ids"][: dataset[1]["seq_len"]] == v2_tokenizer([last])["input_ids"][0]
    _, counts = tokenize_dataset(chat_jsonl, chatglm6b_tokenizer, 512, model_type="chatglm", progress=False)
    assert counts.dropped_unsupported == 1 and counts.kept == 2


def test_chatglm_rounds_for_another_family_warn_to_reconvert(tmp_path, v3_tokenizer, v2_tokenizer, chatglm6b_tokenizer, capsys):
    """History data converted to ChatGLM-6B's `[Round i]` prompts (convert's default for it), then tokenized for
    ChatGLM3 (the rounds become one user turn) or ChatGLM2 (other rounds): the tokenizer says so."""
    from instructglm.data.tokenize import tokenize_jsonl

    source = tmp_path / "history.json"
    source.write_text(json.dumps([{"instruction": "再见", "input": "", "output": "再见", "history": [["你好", "你好！"]]}],
                                 ensure_ascii=False), encoding="utf-8")
    jsonl = tmp_path / "rounds.jsonl"
    convert(str(jsonl), data_path=str(source))
    capsys.readouterr()
    for i, (tokenizer, advice) in enumerate(((v3_tokenizer, "--template messages"), (v2_tokenizer, "--template chatglm2"))):
        tokenize_jsonl(jsonl, tmp_path / f"out{i}", tokenizer, 128, model_type="chatglm", progress=False)
        warning = capsys.readouterr().err
        assert "holds 'chatglm' round prompts" in warning and advice in warning, warning
    tokenize_jsonl(jsonl, tmp_path / "out6b", chatglm6b_tokenizer, 128, model_type="chatglm", progress=False)
    assert "round prompts" not in capsys.readouterr().err  # ChatGLM-6B's own format


def test_a_file_of_tool_rows_for_a_text_family_advises_the_family_not_the_length(tmp_path, chat_jsonl, v2_tokenizer):
    """Every row dropped as unsupported: the advice is a family that shows tools, not --max_seq_length."""
    tool_rows = [line for line in chat_jsonl.read_text(encoding="utf-8").splitlines() if '"tools"' in line]
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(tool_rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        tokenize_dataset(path, v2_tokenizer, 512, model_type="chatglm", progress=False)
    assert "the model family cannot express" in str(error.value) and "tools need ChatGLM3" in str(error.value)
    assert "--max_seq_length" not in str(error.value)


def test_tokenize_truncates_conversations_at_turns_and_counts_them(chat_jsonl, v3_tokenizer):
    full, _ = tokenize_dataset(chat_jsonl, v3_tokenizer, 512, model_type="chatglm", progress=False)
    limit = len(full[0]["input_ids"]) - 3
    cut, counts = tokenize_dataset(chat_jsonl, v3_tokenizer, limit, model_type="chatglm", progress=False)
    assert counts.truncated == 1 and counts.turns_dropped == 0 and "truncated 1" in counts.summary()
    assert len(cut[0]["input_ids"]) == limit and cut[0]["input_ids"][-1] == full[0]["input_ids"][-1]
    from instructglm.data.chat_formats import spans_of

    (*_, (second_last_start, second_last_end, _), (last_start, _, _)) = spans_of(full[0]["labels"], {})
    tight, counts = tokenize_dataset(chat_jsonl, v3_tokenizer, last_start + 1, model_type="chatglm", progress=False)
    # no content token of the last turn fits: the row ends after the turn before it, the last one counted as dropped
    assert counts.turns_dropped == 1 and "1 later turn(s) dropped" in counts.summary()
    assert tight[0]["input_ids"] == full[0]["input_ids"][:second_last_end]


def test_a_file_mixing_both_kinds_is_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"context": "a", "target": "b"}, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match="mixed.jsonl:2: a conversation line in a file of context/target rows"):
        read_jsonl_rows(path)


def test_stats_of_a_conversation_jsonl(chat_jsonl, tmp_path, chatglm3_tokenizer_dir):
    from instructglm.data.stats import check_token_args, format_stats

    chars = jsonl_stats(str(chat_jsonl))
    assert chars["rows"] == 3 and chars["chars"]["target"]["count"] == 3
    tokenizer, model_type = check_token_args(str(chatglm3_tokenizer_dir), 150)
    stats = jsonl_stats(str(chat_jsonl), tokenizer, 150, model_type)
    assert stats["sequence_rule"]["family"] == "chatglm3-6b" and stats["over_length"]["rows"] == 3
    dataset, counts = tokenize_dataset(chat_jsonl, tokenizer, 150, model_type=model_type, progress=False)
    assert stats["over_length"]["truncated"] == counts.truncated == 1
    assert stats["tokens"]["sequence"]["max"] > 150 >= max(len(ids) for ids in dataset["input_ids"])
    assert "chatglm3" in format_stats(stats)


def test_worker_processes_give_the_same_conversation_rows(chat_jsonl, v3_tokenizer, glm4_tokenizer):
    for tokenizer, model_type in ((v3_tokenizer, "chatglm"), (glm4_tokenizer, "glm")):
        one, counts_one = tokenize_dataset(chat_jsonl, tokenizer, 1024, model_type=model_type, batch_size=1, progress=False)
        two, counts_two = tokenize_dataset(
            chat_jsonl, tokenizer, 1024, model_type=model_type, num_proc=2, batch_size=1, progress=False
        )
        assert one.to_dict() == two.to_dict() and counts_one == counts_two and counts_one.kept == 3
