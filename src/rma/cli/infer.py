"""``rma infer``: one chat completion through the gateway, streamed to the terminal.

Light on purpose (the client and httpx only): no server stack is imported.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rma.cli.options import ApiKeyOpt, CaFileOpt, CoordinatorOpt, JsonOpt

if TYPE_CHECKING:
    from rma.client import CoordinatorClient


def register(app: typer.Typer) -> None:
    """Attach ``rma infer`` to the root app."""
    app.command("infer")(infer)


async def pick_model(client: CoordinatorClient, model: str | None, service: str | None) -> str:
    """The model to ask: ``--model``, else the first chat model of ``--service`` or of the pool."""
    from rma.client import RmaError

    models = await client.models()
    if model:
        entry = next((m for m in models if m.get("id") == model), None)
        if entry is not None and entry.get("task") == "embeddings":
            raise RmaError(
                "wrong_task",
                f"{model} is an embeddings model and rma infer asks chat models; for vectors "
                "POST /v1/embeddings (e.g. the openai SDK's client.embeddings.create)",
            )
        return model
    if service:
        models = [m for m in models if m.get("service") == service]
        if not models:
            raise RmaError(
                "no_model",
                f"no healthy worker serves a chat model of service {service!r} right now "
                "(rma admin stats shows the services)",
            )
    if not models:
        raise RmaError(
            "no_model",
            "the pool serves no models right now: no healthy worker runs an OpenAI-compatible "
            "service (rma admin workers shows the workers)",
        )
    chat = [m for m in models if m.get("task") in ("chat", None)]
    if not chat:
        raise RmaError(
            "no_model",
            "the pool serves no chat model right now (only "
            + ", ".join(str(m["id"]) for m in models)
            + "); pass --model",
        )
    return str(chat[0]["id"])


def build_body(
    model: str,
    prompt: str,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {"model": model, "messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    return body


def read_prompt(prompt: str | None) -> str:
    """PROMPT, or standard input when PROMPT is `-` or absent and stdin is not a terminal."""
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and sys.stdin.isatty():
        raise typer.BadParameter("give a PROMPT, or `-` to read it from stdin", param_hint="PROMPT")
    text = sys.stdin.read().strip()
    if not text:
        raise typer.BadParameter("the prompt from stdin is empty", param_hint="PROMPT")
    return text


def infer(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="What to ask; `-` (or nothing, with piped input) reads it from stdin.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model (default: the pool's first).")
    ] = None,
    service: Annotated[
        str | None, typer.Option("--service", "-s", help="Use the first model of this service.")
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(min=0.0, max=2.0, help="Sampling temperature.")
    ] = None,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Wait for the whole answer, then print it.")
    ] = False,
    json: JsonOpt = False,
    coordinator: CoordinatorOpt = None,
    api_key: ApiKeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Ask the pool one question (chat completion); the answer streams as it comes."""
    from rma.cli.options import make_client
    from rma.cli.output import print_json, run_async

    question = read_prompt(prompt)

    async def go() -> None:
        async with make_client(coordinator, api_key=api_key, ca_file=ca_file) as client:
            chosen = await pick_model(client, model, service)
            body = build_body(chosen, question, system, max_tokens, temperature)
            if json:
                print_json(await client.chat(body))
                return
            if no_stream:
                answer = await client.chat(body)
                choices = answer.get("choices") or [{}]
                text = (choices[0].get("message") or {}).get("content") or ""
                sys.stdout.write(text.rstrip("\n") + "\n")
                return
            wrote = False
            try:
                async for chunk in client.chat_stream(body):
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            sys.stdout.write(piece)
                            sys.stdout.flush()
                            wrote = True
            finally:
                if wrote:
                    sys.stdout.write("\n")
                    sys.stdout.flush()

    run_async(go, json_mode=json)
