"""``strato secret create|list|delete``: named secrets, whose values never come back."""

from __future__ import annotations

import time
from pathlib import Path

import click

from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m
from strato.sdk.secret import check_name, check_values, parse_dotenv


@click.group("secret")
def secret_group() -> None:
    """Named secrets: key/value pairs that functions get as environment variables
    (secrets=[strato.Secret.from_name(NAME)])."""


@secret_group.command("create")
@click.argument("name")
@click.argument("pairs", nargs=-1)
@click.option(
    "--from-dotenv",
    "dotenv",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read KEY=VALUE lines from this .env file (pairs given as arguments win).",
)
@click.option("--force", is_flag=True, help="Replace the values of an existing secret.")
def secret_create(name: str, pairs: tuple[str, ...], dotenv: Path | None, force: bool) -> None:
    """Create secret NAME from KEY=VALUE pairs (and/or a .env file)."""
    check_name(name)
    values: dict[str, str] = {}
    if dotenv is not None:
        try:
            text = dotenv.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise exc.InvalidError(f"cannot read {str(dotenv)!r}: {type(e).__name__}") from None
        values.update(parse_dotenv(text, str(dotenv)))
    for i, pair in enumerate(pairs, 1):
        key, sep, value = pair.partition("=")
        if not sep:  # never echo the argument: it may be a value typed without its key
            raise exc.InvalidError(f"argument {i} is not KEY=VALUE")
        values[key] = value
    if not values:
        raise exc.InvalidError("give at least one KEY=VALUE pair, or --from-dotenv FILE")
    values = check_values(values, f"secret {name!r}")
    info = session.api(progress_cb=None).call(
        "POST", "/secrets", m.CreateSecret(values, name=name, overwrite=force), m.SecretInfo
    )
    verb = "replaced" if info.created_at != info.updated_at else "created"
    keys = ", ".join(sorted(values))
    click.echo(f"{verb} secret {name!r} with {len(values)} key(s): {keys}")
    click.echo(f"use it with secrets=[strato.Secret.from_name({name!r})]")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@secret_group.command("list")
def secret_list() -> None:
    """The named secrets (never their values)."""
    secrets = session.api(progress_cb=None).call("GET", "/secrets", None, m.SecretList).secrets
    if not secrets:
        click.echo("no secrets; create one with `strato secret create NAME KEY=VALUE ...`")
        return
    width = max(4, *(len(s.name or "") for s in secrets))
    click.echo(f"{'NAME':<{width}}  {'CREATED':<19}  UPDATED")
    for s in secrets:
        click.echo(f"{s.name or '':<{width}}  {_when(s.created_at)}  {_when(s.updated_at)}")


@secret_group.command("delete")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def secret_delete(name: str, yes: bool) -> None:
    """Delete secret NAME (deployed functions that use it can then not start containers)."""
    check_name(name)
    if not yes:
        click.confirm(f"delete secret {name!r}?", abort=True)
    session.api(progress_cb=None).call("DELETE", f"/secrets/{name}")
    click.echo(f"deleted secret {name!r}")
