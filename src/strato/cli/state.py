"""``strato dict ...`` and ``strato queue ...``: Modal's CLI for Dicts and Queues."""

from __future__ import annotations

import click

from strato.client import session
from strato.protocol import messages as m
from strato.sdk.dict import Dict, check_name
from strato.sdk.queue import Queue


def _list(base: str, kind: str) -> None:
    objects = session.api(progress_cb=None).call("GET", base, None, m.StateList).objects
    named = [o for o in objects if o.name]
    if not named:
        click.echo(f"no {kind}s")
    for o in named:
        click.echo(f"{o.name}\t{o.object_id}")
    if len(named) < len(objects):
        click.echo(f"(and {len(objects) - len(named)} ephemeral {kind}s)")


def _confirm(kind: str, name: str, yes: bool) -> None:
    check_name(kind, name)
    if not yes:
        click.confirm(f"delete {kind} {name!r} and everything in it?", abort=True)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


@click.group("dict")
def dict_group() -> None:
    """Named Dicts (``strato.Dict.from_name(NAME)``)."""


@dict_group.command("create")
@click.argument("name")
def dict_create(name: str) -> None:
    """Create Dict NAME (nothing happens if it exists)."""
    Dict.from_name(name, create_if_missing=True).hydrate()
    click.echo(f"Dict {name!r} is ready")


@dict_group.command("list")
def dict_list() -> None:
    """List the named Dicts."""
    _list("/dicts", "Dict")


@dict_group.command("get")
@click.argument("name")
@click.argument("key")
def dict_get(name: str, key: str) -> None:
    """Print the value of the str KEY."""
    value = Dict.from_name(name).get(key, KeyError)
    if value is KeyError:
        raise click.ClickException(f"Dict {name!r} has no key {key!r}")
    click.echo(_show(value))


@dict_group.command("items")
@click.argument("name")
@click.argument("n", type=click.IntRange(min=1), default=20)
def dict_items(name: str, n: int) -> None:
    """Print the first N entries (20)."""
    d = Dict.from_name(name)
    for i, (key, value) in enumerate(d.items()):
        if i >= n:
            click.echo(f"... ({d.len()} entries)")
            break
        click.echo(f"{_show(key)}: {_show(value)}")


@dict_group.command("clear")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask.")
def dict_clear(name: str, yes: bool) -> None:
    """Remove every entry of Dict NAME."""
    if not yes:
        click.confirm(f"remove every entry of Dict {name!r}?", abort=True)
    Dict.from_name(name).clear()
    click.echo(f"cleared Dict {name!r}")


@dict_group.command("delete")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask.")
def dict_delete(name: str, yes: bool) -> None:
    """Delete Dict NAME and its entries."""
    _confirm("Dict", name, yes)
    Dict.delete(name)
    click.echo(f"deleted Dict {name!r}")


@click.group("queue")
def queue_group() -> None:
    """Named Queues (``strato.Queue.from_name(NAME)``)."""


@queue_group.command("create")
@click.argument("name")
def queue_create(name: str) -> None:
    """Create Queue NAME (nothing happens if it exists)."""
    Queue.from_name(name, create_if_missing=True).hydrate()
    click.echo(f"Queue {name!r} is ready")


@queue_group.command("list")
def queue_list() -> None:
    """List the named Queues."""
    _list("/queues", "Queue")


@queue_group.command("len")
@click.argument("name")
@click.option("--partition", default=None, help="A partition (default: the default one).")
@click.option("--total", is_flag=True, help="Every partition.")
def queue_len(name: str, partition: str | None, total: bool) -> None:
    """Print how many items the Queue holds."""
    click.echo(Queue.from_name(name).len(partition=partition, total=total))


@queue_group.command("peek")
@click.argument("name")
@click.argument("n", type=click.IntRange(min=1), default=1)
@click.option("--partition", default=None, help="A partition (default: the default one).")
def queue_peek(name: str, n: int, partition: str | None) -> None:
    """Print the first N items (1) without removing them."""
    for i, item in enumerate(Queue.from_name(name).iterate(partition=partition)):
        if i >= n:
            break
        click.echo(_show(item))


@queue_group.command("clear")
@click.argument("name")
@click.option("--partition", default=None, help="A partition (default: the default one).")
@click.option("--all", "all_", is_flag=True, help="Every partition.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask.")
def queue_clear(name: str, partition: str | None, all_: bool, yes: bool) -> None:
    """Remove the items of a partition (or of all)."""
    if not yes:
        click.confirm(f"remove the items of Queue {name!r}?", abort=True)
    Queue.from_name(name).clear(partition=partition, all=all_)
    click.echo(f"cleared Queue {name!r}")


@queue_group.command("delete")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask.")
def queue_delete(name: str, yes: bool) -> None:
    """Delete Queue NAME and its items."""
    _confirm("Queue", name, yes)
    Queue.delete(name)
    click.echo(f"deleted Queue {name!r}")
