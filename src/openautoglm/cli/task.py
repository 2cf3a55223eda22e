"""`autoglm task classify|extract|summarize|translate`: the task endpoints' prompts, run on the local engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from openautoglm.cli.common import DEMO_NOTICE, build_settings, err_console, handle_errors, is_demo, setup_logging
from openautoglm.engine.llm import LLM
from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams
from openautoglm.tasks import prompts
from openautoglm.tasks.prompts import TaskPlan

task_app = typer.Typer(help="Classify, extract, summarize or translate text with built, constrained prompts.")

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint directory, hub id, or 'demo'")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file")]
ExplainOpt = Annotated[bool, typer.Option("--explain", help="Print the prompt that was built too")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy")]
SeedOpt = Annotated[int | None, typer.Option("--seed")]
ExamplesOpt = Annotated[Path | None, typer.Option("--examples", help="JSON file: a list of few-shot examples")]


def _run(
    plan: TaskPlan, model: str | None, config: Path | None, explain: bool, temperature: float, seed: int | None
) -> None:
    settings = build_settings(config, {"model": model})
    if is_demo(settings):
        err_console.print(f"[yellow]{DEMO_NOTICE}[/]", highlight=False)
    llm = LLM(settings.engine)
    sampling = SamplingParams(max_tokens=plan.max_tokens, temperature=temperature, seed=seed)
    done = llm.run(
        [GenerationRequest(request_id="task-0", messages=plan.messages, sampling=sampling, guided=plan.guided)]
    )[0]
    seq = done.sequences[0]
    out: dict[str, Any] = {"task": plan.task, "result": plan.parse(seq.text)}
    if done.usage is not None:
        out["usage"] = {"prompt_tokens": done.usage.prompt_tokens, "completion_tokens": done.usage.completion_tokens}
    if explain:
        out["prompt"] = {"messages": plan.messages}
    typer.echo(json.dumps(out, ensure_ascii=False, indent=2))


def _examples(path: Path | None) -> list[dict[str, Any]] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"--examples {path}: {exc}", param="examples") from exc
    if not isinstance(value, list):
        raise InvalidRequestError(f"--examples {path} must hold a JSON list", param="examples")
    return value


@task_app.command()
@handle_errors
def classify(
    text: Annotated[str, typer.Argument(help="The text to classify")],
    label: Annotated[list[str], typer.Option("--label", "-l", help="A label (repeat for each)")],
    multi_label: Annotated[bool, typer.Option("--multi-label", help="Every label that applies")] = False,
    examples: ExamplesOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    explain: ExplainOpt = False,
    temperature: TempOpt = 0.0,
    seed: SeedOpt = None,
) -> None:
    """Classify TEXT into one of the labels (or several with --multi-label)."""
    setup_logging(False)
    plan = prompts.classify(text, label, multi_label=multi_label, examples=_examples(examples))
    _run(plan, model, config, explain, temperature, seed)


@task_app.command()
@handle_errors
def extract(
    text: Annotated[str, typer.Argument(help="The text to extract from")],
    schema: Annotated[Path, typer.Option("--schema", "-s", help="JSON Schema file of the value to extract")],
    examples: ExamplesOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    explain: ExplainOpt = False,
    temperature: TempOpt = 0.0,
    seed: SeedOpt = None,
) -> None:
    """Extract a JSON value valid against the schema from TEXT."""
    setup_logging(False)
    try:
        schema_value = json.loads(schema.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"--schema {schema}: {exc}", param="schema") from exc
    plan = prompts.extract(text, schema_value, examples=_examples(examples))
    _run(plan, model, config, explain, temperature, seed)


@task_app.command()
@handle_errors
def summarize(
    text: Annotated[str, typer.Argument(help="The text to summarize")],
    max_words: Annotated[int, typer.Option("--max-words")] = 60,
    style: Annotated[str, typer.Option("--style", help="paragraph, bullets or headline")] = "paragraph",
    examples: ExamplesOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    explain: ExplainOpt = False,
    temperature: TempOpt = 0.0,
    seed: SeedOpt = None,
) -> None:
    """Summarize TEXT."""
    setup_logging(False)
    plan = prompts.summarize(text, max_words=max_words, style=style, examples=_examples(examples))
    _run(plan, model, config, explain, temperature, seed)


@task_app.command()
@handle_errors
def translate(
    text: Annotated[str, typer.Argument(help="The text to translate")],
    to: Annotated[str, typer.Option("--to", help="Target language")],
    source: Annotated[str | None, typer.Option("--from", help="Source language")] = None,
    examples: ExamplesOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    explain: ExplainOpt = False,
    temperature: TempOpt = 0.0,
    seed: SeedOpt = None,
) -> None:
    """Translate TEXT into another language."""
    setup_logging(False)
    plan = prompts.translate(text, to, source_language=source, examples=_examples(examples))
    _run(plan, model, config, explain, temperature, seed)


def register(app: typer.Typer) -> None:
    app.add_typer(task_app, name="task")
