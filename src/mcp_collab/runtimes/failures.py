"""Foreign errors to our three failure kinds, one table per SDK.

A runtime wraps its vendor call in ``table.mapped(call)``; whatever the SDK or its HTTP library
raises is looked up by class, most specific first (the exception's MRO), and re-raised once as a
``RuntimeUnavailable``, ``RuntimeTransient`` or ``RuntimeFatal`` with the original as its cause. The
fallback policy rests on that classification and nothing else, so every SDK shares the status rule
below and differs only in which of its classes mean "timed out", "unreachable", "answered with a
status" or "refused by the client before sending".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import RuntimeFailure, RuntimeFatal, RuntimeTransient, RuntimeUnavailable

# The request never ran: credentials are missing or refused. The CLI may have its own login.
UNAVAILABLE_STATUSES = frozenset({401, 403})
# Worth another try elsewhere: timed out at the server, a conflict, rate limited; and every 5xx
# (Anthropic's 529 "overloaded" among them).
TRANSIENT_STATUSES = frozenset({408, 409, 429})
FIRST_SERVER_ERROR = 500
# Enough of a vendor's error message to say what went wrong, not a whole HTML page.
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class Call:
    """What a failure's message names: the API (with where it is, when custom) and the step's limit."""

    api: str
    timeout_s: float


Rule = Callable[[Any, Call], RuntimeFailure]


def classify_status(status: int, message: str, api: str) -> RuntimeFailure:
    """One HTTP status, one failure kind: the same for every SDK runtime."""
    text = f"the {api} answered HTTP {status}: {message}".rstrip(": ")
    code = f"http_{status}"
    if status in UNAVAILABLE_STATUSES:
        return RuntimeUnavailable(text, code=code)
    if status in TRANSIENT_STATUSES or status >= FIRST_SERVER_ERROR:
        return RuntimeTransient(text, code=code)
    return RuntimeFatal(text, code=code)


def timed_out(_: Any, call: Call) -> RuntimeFailure:
    return RuntimeTransient(f"the {call.api} did not answer within {call.timeout_s:g}s", code="timeout")


def unreachable(exc: Any, call: Call) -> RuntimeFailure:
    return RuntimeTransient(f"cannot reach the {call.api}: {exc}", code="connection")


def refused_by_client(exc: Any, call: Call) -> RuntimeFailure:
    """The SDK checked the request and would not send it (a bad argument): the same again fails too."""
    return RuntimeFatal(f"the {call.api} client refused the request: {exc}"[:MAX_MESSAGE_CHARS], code="client_error")


def answered(status_of: Callable[[Any], int], message_of: Callable[[Any], str]) -> Rule:
    """A status the endpoint answered with, classified by ``classify_status``."""

    def rule(exc: Any, call: Call) -> RuntimeFailure:
        return classify_status(status_of(exc), message_of(exc)[:MAX_MESSAGE_CHARS], call.api)

    return rule


class FailureTable:
    """Foreign exception class -> rule. Lookup walks the raised exception's MRO, so a subclass row
    (a timeout that is also a connection error) wins over its base whatever the order of rows."""

    def __init__(self, rules: Mapping[type[BaseException], Rule]) -> None:
        self.rules = dict(rules)
        self._classes = tuple(self.rules)

    def translate(self, exc: BaseException, call: Call) -> RuntimeFailure | None:
        for cls in type(exc).__mro__:
            rule = self.rules.get(cls)
            if rule is not None:
                return rule(exc, call)
        return None

    @contextlib.contextmanager
    def mapped(self, call: Call) -> Iterator[None]:
        try:
            yield
        except RuntimeFailure:
            raise
        except self._classes as exc:
            failure = self.translate(exc, call)
            assert failure is not None  # every class caught here has a row
            raise failure from exc
