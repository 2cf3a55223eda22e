"""Guided decoding in the local engine: with the demo model's random weights, every constrained output must
parse and validate (jsonschema_rs is the oracle), over many generated schemas, choices, regexes and grammars."""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import torch

from openautoglm.engine.guided import GrammarProcessor
from openautoglm.engine.llm import LLM
from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.guided import GuidedDecoding
from openautoglm.protocol.outputs import FinishReason
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(demo_dir: Path) -> LLM:
    return LLM(model=str(demo_dir))


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A bounded JSON schema: every value it admits has a bounded length, so a complete answer always fits."""
    kinds = ["string", "integer", "boolean", "null", "enum", "const"]
    if depth < 2:
        kinds += ["object", "object", "array"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 10)}
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 5000)}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"enum": rng.sample(["a", "b c", "déjà", 1, 2.5, True, None], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["x", 42, False])}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo, "maxItems": lo + 2}
    names = rng.sample(["id", "name", "size", "tags", "ok", "kind", "über", "x y"], rng.randint(1, 4))
    props = {n: random_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def run(llm: LLM, specs: list[GuidedDecoding], *, temperature: float = 0.0, max_tokens: int = 600) -> list[Any]:
    reqs = [
        GenerationRequest(
            request_id=f"g{i}",
            prompt="Answer:",
            sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i),
            guided=spec,
        )
        for i, spec in enumerate(specs)
    ]
    return [r.sequences[0] for r in llm.run(reqs)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_json_schemas_always_validate(llm: LLM, temperature: float) -> None:
    rng = random.Random(1234 + int(temperature))
    schemas = [random_schema(rng) for _ in range(40)]
    outs = run(llm, [GuidedDecoding(json_schema=s) for s in schemas], temperature=temperature)
    for schema, seq in zip(schemas, outs, strict=True):
        assert seq.finish_reason is FinishReason.STOP, (schema, seq.text)
        value = json.loads(seq.text)
        assert jsonschema_rs.validator_for(schema).is_valid(value), (schema, seq.text)


def test_json_object_choice_regex_grammar(llm: LLM) -> None:
    choices = ("red", "green", "deep blue", "紫")
    specs = [
        *[GuidedDecoding(choice=choices) for _ in range(6)],
        *[GuidedDecoding(regex=r"[a-z]{2,4}-\d{2}") for _ in range(6)],
        *[GuidedDecoding(grammar='root ::= "yes" | "no" | ("maybe " [0-9] [0-9]?)') for _ in range(6)],
    ]
    outs = run(llm, specs, temperature=1.0)
    for seq in outs[:6]:
        assert seq.text in choices
    for seq in outs[6:12]:
        assert re.fullmatch(r"[a-z]{2,4}-\d{2}", seq.text), seq.text
    for seq in outs[12:]:
        assert re.fullmatch(r"yes|no|maybe [0-9][0-9]?", seq.text), seq.text
    assert all(s.finish_reason is FinishReason.STOP for s in outs)
    obj = run(llm, [GuidedDecoding(json_object=True)] * 3, temperature=1.0, max_tokens=120)
    for seq in obj:
        if seq.finish_reason is FinishReason.STOP:  # a free object may run past any budget; a finished one parses
            assert isinstance(json.loads(seq.text), dict)
        else:
            assert seq.text.startswith("{")


def test_strict_schema_refuses_extra_properties(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}
    for seq in run(llm, [GuidedDecoding(json_schema=schema, strict=True)] * 5, temperature=1.0):
        assert set(json.loads(seq.text)) <= {"a"}


def test_tool_call_grammar_names_a_function_and_valid_arguments(llm: LLM) -> None:
    params = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
    }
    fns = (
        {"name": "get_weather", "parameters": params},
        {"name": "noop", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
    )
    for seq in run(llm, [GuidedDecoding(tool_call=fns)] * 6, temperature=1.0, max_tokens=300):
        assert seq.finish_reason is FinishReason.STOP
        name, _, args = seq.text.partition("\n")
        assert name in ("get_weather", "noop")
        if name == "get_weather":
            assert jsonschema_rs.validator_for(params).is_valid(json.loads(args))
        else:
            assert json.loads(args) == {}


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (GuidedDecoding(json_schema={"type": "strin"}), "json_schema"),
        (GuidedDecoding(regex="(unclosed"), "guided_regex"),
        (GuidedDecoding(grammar="root ::= undefined_rule"), "guided_grammar"),
        (GuidedDecoding(choice=()), "guided_choice"),
        (GuidedDecoding(), "exactly one"),
        (GuidedDecoding(regex="a", grammar='root ::= "a"'), "exactly one"),
    ],
)
def test_invalid_specs_are_400s_naming_the_part(llm: LLM, spec: GuidedDecoding, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        llm.core.input_processor.process(GenerationRequest(request_id="bad", prompt="x", guided=spec))
    assert needle in err.value.message
    assert err.value.http_status == 400


def test_compiled_grammars_are_cached_by_spec(llm: LLM) -> None:
    stats = llm.core.input_processor.guided.stats
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    before = (stats.compiles, stats.cache_hits)
    run(llm, [GuidedDecoding(json_schema=schema)])
    run(llm, [GuidedDecoding(json_schema=json.loads(json.dumps(schema, sort_keys=True)))])
    assert (stats.compiles, stats.cache_hits) == (before[0] + 1, before[1] + 1)
    assert stats.compile_seconds > 0


def test_processor_is_stateful_idempotent_and_picklable(llm: LLM) -> None:
    factory = llm.core.input_processor.guided.processor_factory(GuidedDecoding(choice=("ab", "ac")))
    restored = pickle.loads(pickle.dumps(factory))
    tok = llm.tokenizer
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    for proc in (factory(), restored()):
        assert isinstance(proc, GrammarProcessor)
        v = llm.core.sampler.vocab_size
        row = proc([], torch.zeros(v))
        assert row[a] == 0 and row[b] == float("-inf")
        again = proc([a], torch.zeros(v))
        twice = proc([a], torch.zeros(v))  # the same step seen twice (a retried batch) changes nothing
        assert torch.equal(again, twice) and again[b] == 0
        assert again[a] == float("-inf")


def test_preemption_and_recompute_keep_outputs_valid_and_equal(demo_dir: Path, make_engine_config) -> None:
    """Under a block pool too small for the batch, sequences are preempted and recomputed; a grammar processor
    sees the same output tokens again and must give each sequence the same greedy answer as running it alone."""
    rng = random.Random(99)
    schemas = [random_schema(rng) for _ in range(12)]
    specs = [GuidedDecoding(json_schema=s) for s in schemas]
    tight = LLM(make_engine_config(demo_dir, cache={"num_blocks": 24, "block_size": 4}, scheduler={"max_num_seqs": 12}))
    crowded = run(tight, specs, max_tokens=80)
    assert tight.core.stats().num_preemptions > 0, "the tiny block pool was meant to force preemption"
    roomy = LLM(make_engine_config(demo_dir))
    for spec, schema, seq in zip(specs, schemas, crowded, strict=True):
        alone = run(roomy, [spec], max_tokens=80)[0]
        assert seq.token_ids == alone.token_ids
        if seq.finish_reason is FinishReason.STOP:
            assert jsonschema_rs.validator_for(schema).is_valid(json.loads(seq.text))
