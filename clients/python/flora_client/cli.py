"""The `flora` command line: adapters, generation, chat, classification, embeddings.

Every command takes ``--url`` (``$FLORA_URL``), ``--api-key`` (``$FLORA_API_KEY``) and
``--json`` (machine-readable output on stdout), either before the command or after it.
Errors print one line on stderr and exit with status 1; usage errors exit with 2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from flora_client import _cli_output as out
from flora_client._core import DEFAULT_READ_TIMEOUT, SERVER_REQUEST_TIMEOUT
from flora_client.client import Client
from flora_client.errors import Conflict, FloraError
from flora_client.types import ChatMessage

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    help="Command line for a flora-serve server: upload FLoRA adapters and query them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
adapters_app = typer.Typer(help="Upload, list, show and delete adapters.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

UrlOpt = Annotated[
    str | None, typer.Option("--url", envvar="FLORA_URL", help="Server URL.", show_default=False)
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="FLORA_API_KEY", help="API key.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
AdapterOpt = Annotated[
    str | None, typer.Option("--adapter", "-a", help="Adapter id (default: the base model).")
]


@dataclass
class GlobalOptions:
    url: str | None = None
    api_key: str | None = None
    json: bool = False
    timeout: float = DEFAULT_READ_TIMEOUT


@app.callback()
def main(
    ctx: typer.Context,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="Request timeout in seconds. The default outlasts the server's default "
            f"--request-timeout ({SERVER_REQUEST_TIMEOUT:g} s), so a slow answer ends with "
            "the server's 504.",
        ),
    ] = DEFAULT_READ_TIMEOUT,
) -> None:
    """Talk to a flora-serve server (default http://127.0.0.1:8000)."""
    ctx.obj = GlobalOptions(url=url, api_key=api_key, json=json_out, timeout=timeout)


def _options(
    ctx: typer.Context, url: str | None, api_key: str | None, json_out: bool
) -> GlobalOptions:
    base = ctx.find_root().obj or GlobalOptions()
    return GlobalOptions(
        url=url or base.url,
        api_key=api_key or base.api_key,
        json=json_out or base.json,
        timeout=base.timeout,
    )


def _client(opts: GlobalOptions) -> Client:
    return Client(opts.url, opts.api_key, timeout=opts.timeout)


def cli_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn client errors into one line on stderr and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (FloraError, OSError, ValueError) as exc:
            out.print_error(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


# --- health ------------------------------------------------------------------------------


@app.command()
@cli_errors
def health(
    ctx: typer.Context,
    wait: Annotated[float, typer.Option(help="Wait up to this many seconds for ready.")] = 0.0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Is the server alive and ready? Exit status 0 only when it is ready."""
    opts = _options(ctx, url, api_key, json_out)
    with _client(opts) as client:
        if wait > 0:
            client.wait_ready(timeout=wait)
        alive = client.health()
        ready = client.ready()
    if opts.json:
        out.emit_json({"url": client.base_url, "alive": alive, "ready": ready})
    else:
        out.stdout().print(
            f"{client.base_url}: {'alive' if alive else 'not alive'}, "
            f"{'ready' if ready else 'not ready'}"
        )
    if not ready:
        raise typer.Exit(1)


# --- adapters ----------------------------------------------------------------------------


@adapters_app.command("upload")
@cli_errors
def adapters_upload(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help="Adapter directory, or a single-file .flora adapter.")
    ],
    adapter_id: Annotated[str, typer.Option("--id", help="Id to store the adapter under.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an adapter with other bytes.")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload an adapter (with a progress bar)."""
    opts = _options(ctx, url, api_key, json_out)
    with _client(opts) as client, out.upload_progress(enabled=not opts.json) as progress:
        task = progress.add_task("upload", total=None)

        def report(sent: int, total: int) -> None:
            progress.update(task, completed=sent, total=total)

        try:
            result = client.adapters.upload(path, adapter_id, overwrite=overwrite, progress=report)
        except Conflict as exc:
            # The server's hint names the HTTP query (?overwrite=true); here it is a flag.
            exc.message = (
                f"adapter {adapter_id!r} already exists with other bytes; "
                "pass --overwrite to replace it"
            )
            raise
    if opts.json:
        out.emit_json(result)
        return
    verb = {"unchanged": "unchanged (same bytes already stored):", "replaced": "replaced"}.get(
        result.status, "uploaded"
    )
    size = "" if result.size_bytes is None else f", {result.size_bytes:,} bytes"
    digest = f", sha256 {result.sha256}" if result.sha256 else ""
    out.stdout().print(f"{verb} {result.id}{size}{digest}", markup=False)


@adapters_app.command("list")
@cli_errors
def adapters_list(
    ctx: typer.Context,
    limit: Annotated[int | None, typer.Option(help="Page size.")] = None,
    offset: Annotated[int | None, typer.Option(help="Skip this many.")] = None,
    after: Annotated[str | None, typer.Option(help="Start after this id.")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List stored adapters."""
    opts = _options(ctx, url, api_key, json_out)
    with _client(opts) as client:
        page = client.adapters.list(limit=limit, offset=offset, after=after)
    if opts.json:
        out.emit_json(page)
    else:
        out.stdout().print(out.adapters_table(page.data, page.total))


@adapters_app.command("show")
@cli_errors
def adapters_show(
    ctx: typer.Context,
    adapter_id: Annotated[str, typer.Argument(help="Adapter id.")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one adapter: digest, size, config, where it is loaded."""
    opts = _options(ctx, url, api_key, json_out)
    with _client(opts) as client:
        info = client.adapters.get(adapter_id)
    if opts.json:
        out.emit_json(info)
    else:
        out.stdout().print_json(data=info.model_dump(mode="json"))


@adapters_app.command("delete")
@cli_errors
def adapters_delete(
    ctx: typer.Context,
    adapter_id: Annotated[str, typer.Argument(help="Adapter id.")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete an adapter from the store and every cache."""
    opts = _options(ctx, url, api_key, json_out)
    with _client(opts) as client:
        client.adapters.delete(adapter_id)
    if opts.json:
        out.emit_json({"id": adapter_id, "deleted": True})
    else:
        out.stdout().print(f"deleted {adapter_id}", markup=False)


# --- inference ---------------------------------------------------------------------------


def _sampling(
    max_new_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: list[str] | None,
    *,
    openai: bool = False,
) -> dict[str, Any]:
    """Keyword parameters for the SDK, None values left out. Temperature 0 means greedy:
    TGI's /generate says it with do_sample=false (its temperature must be > 0), the
    OpenAI routes with temperature 0."""
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": stop or None,
    }
    if temperature is not None:
        if openai:
            params["temperature"] = temperature
        elif temperature > 0:
            params["temperature"] = temperature
            params["do_sample"] = True
        else:
            params["do_sample"] = False
    return {k: v for k, v in params.items() if v is not None}


MaxTokOpt = Annotated[int | None, typer.Option("--max-new-tokens", "-n", help="Token limit.")]
TempOpt = Annotated[float | None, typer.Option(help="Sampling temperature (0: greedy).")]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling mass.")]
TopKOpt = Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")]
SeedOpt = Annotated[int | None, typer.Option(help="Sampling seed.")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop sequence (repeatable).")]


@app.command()
@cli_errors
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    adapter: AdapterOpt = None,
    max_new_tokens: MaxTokOpt = None,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they arrive.")] = True,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Generate text from a prompt, streaming tokens (with --json: one JSON result)."""
    opts = _options(ctx, url, api_key, json_out)
    params = _sampling(max_new_tokens, temperature, top_p, top_k, seed, stop)
    with _client(opts) as client:
        if opts.json or not stream:
            result = client.generate(prompt, adapter, **params)
            if opts.json:
                out.emit_json(result)
            else:
                typer.echo(result.generated_text)
            return
        for event in client.generate_stream(prompt, adapter, **params):
            if event.token is not None and not event.token.special:
                typer.echo(event.token.text, nl=False)
        typer.echo("")


@app.command()
@cli_errors
def chat(
    ctx: typer.Context,
    adapter: AdapterOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_new_tokens: MaxTokOpt = None,
    temperature: TempOpt = None,
    seed: SeedOpt = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Interactive chat with history. /reset forgets it; /exit or Ctrl-D quits."""
    opts = _options(ctx, url, api_key, json_out)
    params = _sampling(max_new_tokens, temperature, None, None, seed, None, openai=True)
    first: list[ChatMessage] = [ChatMessage(role="system", content=system)] if system else []
    history = list(first)
    with _client(opts) as client:
        while True:
            try:
                line = input("" if opts.json else "you> ")
            except EOFError:
                break
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = list(first)
                continue
            if not text:
                continue
            history.append(ChatMessage(role="user", content=text))
            reply = []
            for chunk in client.chat(history, adapter, stream=True, **params):
                reply.append(chunk.content)
                if not opts.json:
                    typer.echo(chunk.content, nl=False)
            answer = ChatMessage(role="assistant", content="".join(reply))
            history.append(answer)
            if opts.json:
                out.emit_json(answer, lines=True)
            else:
                typer.echo("")


@app.command()
@cli_errors
def classify(
    ctx: typer.Context,
    inputs: Annotated[list[str], typer.Argument(help="Image files (or texts with --text).")],
    adapter: AdapterOpt = None,
    top_k: Annotated[int, typer.Option(help="Labels per input.")] = 5,
    text: Annotated[bool, typer.Option("--text", help="Inputs are texts, not files.")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Classify images (or texts) with the base model or an adapter."""
    opts = _options(ctx, url, api_key, json_out)
    payload: list[Any] = list(inputs) if text else [Path(p) for p in inputs]
    with _client(opts) as client:
        result = client.classify(payload, adapter, top_k=top_k)
    if opts.json:
        out.emit_json(result)
    else:
        out.stdout().print(out.classify_table(list(inputs), result))


@app.command()
@cli_errors
def embed(
    ctx: typer.Context,
    texts: Annotated[list[str], typer.Argument(help="Text(s) to embed.")],
    adapter: AdapterOpt = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Embed texts; prints each vector's size, norm and first values (all of it with --json)."""
    opts = _options(ctx, url, api_key, json_out)
    with _client(opts) as client:
        result = client.embed(texts, adapter)
    if opts.json:
        out.emit_json({"model": result.model, "embeddings": result.vectors})
        return
    console = out.stdout()
    for text_, vector in zip(texts, result.vectors, strict=False):
        norm = sum(v * v for v in vector) ** 0.5
        head = ", ".join(f"{v:.4f}" for v in vector[:4])
        console.print(f"{text_!r}: dim {len(vector)}, norm {norm:.4f}, [{head}, ...]", markup=False)


@app.command()
@cli_errors
def models(
    ctx: typer.Context,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the base model and the adapters the server offers (/v1/models)."""
    opts = _options(ctx, url, api_key, json_out)
    with _client(opts) as client:
        result = client.models()
    if opts.json:
        out.emit_json(result)
    else:
        out.stdout().print(out.models_table(result))
