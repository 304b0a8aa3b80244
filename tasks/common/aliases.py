"""The registry's alias history, kept in the registry itself.

MLflow keeps only where an alias points now (a long-standing request, mlflow#2169). Every alias
move xmodal makes (register's `candidate`, a promotion, the first champion, a rollback) appends a
registered-model tag `xmodal.alias_event.<UTC time to the microsecond>-<4 hex>` whose value is
compact JSON {time, action, alias, from, to, user, host, note}: every client of the tracking
server sees the same history, and listing it is reading the model's tags sorted by key.

The champion's history is a stack derived from those events: a promotion pushes its version, a
rollback pops. `previous-champion` names the entry below the top (no alias when there is none).
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

EVENT_PREFIX = "xmodal.alias_event."
ROLLBACK = "rollback"
# What an alias lookup raises when the alias (or the registered model) does not exist; anything
# else, such as an unreachable server, is raised rather than read as "no such alias".
_MISSING = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")
_last_time = [datetime.min.replace(tzinfo=UTC)]


@dataclass(frozen=True)
class AliasEvent:
    key: str
    time: str
    action: str  # register | first-champion | promote | force-promote | rollback
    alias: str
    from_: str | None
    to: str | None
    user: str = ""
    host: str = ""
    note: str = ""

    def value(self) -> str:
        body = {
            "time": self.time,
            "action": self.action,
            "alias": self.alias,
            "from": self.from_,
            "to": self.to,
            "user": self.user,
            "host": self.host,
            "note": self.note,
        }
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def parse(cls, key: str, value: str) -> AliasEvent | None:
        """The event a tag holds, or None for a tag that is not a readable event."""
        try:
            d = json.loads(value)
            return cls(
                key,
                str(d["time"]),
                str(d["action"]),
                str(d["alias"]),
                _version(d.get("from")),
                _version(d.get("to")),
                str(d.get("user") or ""),
                str(d.get("host") or ""),
                str(d.get("note") or ""),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def line(self) -> str:
        """One line of `xmodal registry history`."""
        who = f"{self.user}@{self.host}" if self.host else self.user or "?"
        moved = f"{_v(self.from_)} → {_v(self.to)}"
        note = f"  {self.note}" if self.note else ""
        return f"{self.time}  {self.action:<14} {self.alias:<10} {moved:<10} {who}{note}"


def _version(v) -> str | None:
    return None if v is None else str(v)


def _v(version: str | None) -> str:
    return f"v{version}" if version is not None else "-"


def who() -> tuple[str, str]:
    """(user, host) recorded with an event."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary container uid
        user = os.environ.get("USER", "?")
    return user, socket.gethostname()


def _now() -> datetime:
    """UTC now, strictly after the previous event this process recorded (keys sort in order)."""
    now = max(datetime.now(UTC), _last_time[0] + timedelta(microseconds=1))
    _last_time[0] = now
    return now


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version `alias` names, or None when the alias or the registered model does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in _MISSING:
            return None
        raise


def record(
    client: MlflowClient,
    name: str,
    action: str,
    alias: str,
    before: str | None,
    after: str | None,
    note: str = "",
) -> AliasEvent:
    """Append an event to `name`'s history (a registered-model tag)."""
    now = _now()
    key = f"{EVENT_PREFIX}{now:%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(2)}"
    user, host = who()
    time = now.isoformat(timespec="microseconds").replace("+00:00", "Z")
    event = AliasEvent(key, time, action, alias, before, after, user, host, note[:1000])
    client.set_registered_model_tag(name, key, event.value())
    return event


def move(
    client: MlflowClient,
    name: str,
    alias: str,
    to: str | None,
    action: str,
    note: str = "",
    *,
    before: str | None,
) -> AliasEvent:
    """Point `alias` at version `to` (None: remove it), and record the move from `before`."""
    set_or_delete(client, name, alias, to)
    return record(client, name, action, alias, before, to, note)


def set_or_delete(client: MlflowClient, name: str, alias: str, version: str | None) -> None:
    """Point `alias` at `version`, or remove it when `version` is None (no event: for aliases
    derived from the history, such as `previous-champion`)."""
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, version)


def events(client: MlflowClient, name: str) -> list[AliasEvent]:
    """`name`'s alias events, oldest first."""
    tags = client.get_registered_model(name).tags
    found = (AliasEvent.parse(k, v) for k, v in sorted(tags.items()) if k.startswith(EVENT_PREFIX))
    return [e for e in found if e is not None]


def champion_stack(history: list[AliasEvent], champion_alias: str) -> list[str]:
    """The champions in order, the current one last: promotions push, rollbacks pop.

    A promotion whose `from` is not the top (a champion from before the history, or one set
    outside xmodal) pushes that version first, so the stack's top is always the last champion the
    history knows of."""
    stack: list[str] = []
    for e in history:
        if e.alias != champion_alias:
            continue
        if e.action == ROLLBACK:
            if stack and stack[-1] == e.from_:
                stack.pop()
        elif e.from_ is not None and (not stack or stack[-1] != e.from_):
            stack.append(e.from_)
        if e.to is not None and (not stack or stack[-1] != e.to):
            stack.append(e.to)
    return stack


@dataclass(frozen=True)
class RollbackPlan:
    champion: str  # rolled back
    target: str  # the champion after the rollback
    below: str | None  # `previous-champion` after the rollback
    from_history: bool  # False: the registry has no history, `previous-champion` named the target


def plan_rollback(stack: list[str], champion: str, previous: str | None, name: str) -> RollbackPlan:
    """Where a rollback of `champion` goes: the entry below it in the history, else (a registry
    from before the history) the `previous-champion` alias. LookupError when neither exists."""
    if stack and stack[-1] != champion:
        stack = [*stack, champion]  # champion moved outside xmodal: go back to the history's top
    if len(stack) >= 2:
        return RollbackPlan(champion, stack[-2], stack[-3] if len(stack) >= 3 else None, True)
    if stack:
        raise LookupError(
            f"nothing to roll back to: champion v{champion} is the only champion in the history "
            f"of {name!r}"
        )
    if previous is None or previous == champion:
        raise LookupError(
            f"nothing to roll back to: {name!r} has no alias history and no earlier champion "
            f"alias (champion v{champion})"
        )
    return RollbackPlan(champion, previous, None, False)
