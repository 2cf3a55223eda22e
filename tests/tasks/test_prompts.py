"""The task prompt builder: deterministic, instructions derived from labels and schema fields, examples as
turns, constraints of the right kind, bad specifications refused naming the field."""

from __future__ import annotations

import json

import pytest

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.tasks import prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "The person's full name"},
        "age": {"type": "integer"},
        "emails": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name"],
}


def test_same_spec_same_plan() -> None:
    a = prompts.classify("great film", ["positive", "negative"], descriptions={"positive": "likes it"})
    b = prompts.classify("great film", ["positive", "negative"], descriptions={"positive": "likes it"})
    assert a.messages == b.messages and a.guided == b.guided
    assert a.messages[0]["content"] == (
        "You are a text classifier. The labels are:\n- positive: likes it\n- negative\n"
        "Answer with exactly one label, written exactly as listed, and nothing else."
    )
    assert a.messages[-1] == {"role": "user", "content": "Text:\ngreat film"}
    assert a.guided is not None and a.guided.choice == ("positive", "negative")
    assert a.parse("negative") == {"label": "negative"}


def test_multi_label_is_a_json_array_of_labels() -> None:
    plan = prompts.classify("x", ["a", "b", "c"], multi_label=True, examples=[{"text": "t", "labels": ["a", "c"]}])
    assert plan.guided is not None and plan.guided.json_schema["items"] == {"enum": ["a", "b", "c"]}
    assert plan.messages[1:3] == [
        {"role": "user", "content": "Text:\nt"},
        {"role": "assistant", "content": '["a", "c"]'},
    ]
    assert plan.parse('["b","b","a"]') == {"labels": ["b", "a"]}


def test_extract_lists_fields_and_bounds_the_schema_without_changing_it() -> None:
    plan = prompts.extract("Ann, 31", SCHEMA, examples=[{"text": "Bo", "data": {"name": "Bo"}}])
    system = plan.messages[0]["content"]
    assert "- name (string, required): The person's full name" in system
    assert "- age (integer, optional)" in system and "- emails (array, optional)" in system
    assert json.dumps(SCHEMA, ensure_ascii=False, sort_keys=True) in system
    assert plan.messages[2] == {"role": "assistant", "content": '{"name": "Bo"}'}
    bounded = plan.guided.json_schema  # type: ignore[union-attr]
    assert bounded["properties"]["name"]["maxLength"] == prompts.DEFAULT_MAX_STRING
    assert bounded["properties"]["emails"]["maxItems"] == prompts.DEFAULT_MAX_ITEMS
    assert bounded["properties"]["emails"]["items"]["maxLength"] == prompts.DEFAULT_MAX_STRING
    assert "maxLength" not in SCHEMA["properties"]["name"]  # the caller's schema is untouched
    assert plan.parse('{"name":"Ann"}') == {"data": {"name": "Ann"}}


def test_summarize_and_translate() -> None:
    s = prompts.summarize("long text", max_words=20, style="bullets")
    assert "at most 20 words" in s.messages[0]["content"] and "bullet points" in s.messages[0]["content"]
    assert s.max_tokens == 48 and s.parse(" short ") == {"summary": "short"}
    t = prompts.translate("bonjour", "German", source_language="French")
    assert t.messages[0]["content"].startswith("You translate text from French into German.")
    assert t.parse("hallo") == {"translation": "hallo", "target_language": "German"}


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda: prompts.classify("x", []), "labels"),
        (lambda: prompts.classify("x", ["a", "a"]), "labels"),
        (lambda: prompts.classify("x", ["a"], descriptions={"b": "?"}), "descriptions"),
        (lambda: prompts.classify("x", ["a"], examples=[{"text": "t", "label": "z"}]), "examples"),
        (lambda: prompts.classify("  ", ["a"]), "text"),
        (lambda: prompts.extract("x", {}), "schema"),
        (lambda: prompts.summarize("x", style="poem"), "style"),
        (lambda: prompts.summarize("x", max_words=0), "max_words"),
        (lambda: prompts.translate("x", ""), "target_language"),
        (lambda: prompts.translate("x", "de", examples=[{"nope": 1}]), "examples.0"),
    ],
)
def test_bad_specs_name_the_field(build: object, param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        build()  # type: ignore[operator]
    assert err.value.param == param


def test_extracted_integers_beyond_64_bits_become_numbers_that_encode() -> None:
    plan = prompts.extract("x", {"type": "object"})
    assert plan.parse('{"n": 123456789012345678901234567890, "m": 5}') == {"data": {"n": 1.2345678901234568e29, "m": 5}}
