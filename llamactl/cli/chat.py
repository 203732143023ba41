"""`llamactl chat`: options -> ChatSpec -> llamactl.chat.session.run, drawn by chat_render."""

from __future__ import annotations

import sys

import click

from llamactl.chat.session import ChatSpec, Terminal, run
from llamactl.cli import Command


@click.command(cls=Command)
@click.option("-p", "--prompt", help="Answer this one question and exit (else: stdin if piped).")
@click.option("--url", help="Any OpenAI-compatible server [default: the running serve].")
@click.option(
    "-m",
    "--model-file",
    metavar="PATH_OR_NAME",
    help="Start a server with this model for the session, stopped at the end.",
)
@click.option("--model", help="The model name sent to the server [default: its first].")
@click.option(
    "--system",
    help='The system prompt [default: "You are a helpful assistant."]; "" sends none.',
)
@click.option("--temperature", type=float, help="Sampling temperature (0: deterministic).")
@click.option("--top-p", type=float, help="Nucleus sampling probability mass.")
@click.option("--max-tokens", type=int, help="Most tokens to generate per reply.")
@click.option(
    "--api-key",
    help="Bearer key for the server [env: LLAMACTL_API_KEY, then OPENAI_API_KEY].",
)
@click.option("--no-stream", is_flag=True, help="Wait for the whole answer (one-shot).")
@click.option("--json", "json_output", is_flag=True, help="Print the whole response JSON.")
def chat(
    prompt: str | None,
    url: str | None,
    model_file: str | None,
    model: str | None,
    system: str | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    api_key: str | None,
    no_stream: bool,
    json_output: bool,
) -> None:
    """Chat with a model in the terminal, or answer one prompt.

    In a terminal: a chat with Markdown replies, history and /commands (/help lists them).
    With -p, or a question piped on stdin: only the answer on stdout.
    """
    spec = ChatSpec(
        url=url,
        api_key=api_key,
        system=system,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        model=model,
        stream=not no_stream,
        json_output=json_output,
        prompt=prompt,
        model_file=model_file,
    )
    from llamactl.cli.chat_render import RichRenderer

    run(spec, Terminal.from_streams(sys.stdin, sys.stdout, sys.stderr), renderer=RichRenderer())
