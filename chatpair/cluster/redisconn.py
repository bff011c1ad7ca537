"""The optional Redis client: imported lazily, errors turned into one clear line.

``redis`` (redis-py, with hiredis for parsing speed) is the ``cluster`` extra;
nothing outside :mod:`chatpair.cluster` imports it, so ``chatpair`` without
the extra still runs everything but cluster mode.
"""

from __future__ import annotations

import re
from typing import Any

from chatpair.errors import ChatpairError, ConfigError


class ClusterError(ChatpairError):
    """Redis could not be reached or answered with an error; the message says which."""


def redis_module() -> Any:
    """The ``redis`` package, or ConfigError saying how to install it."""
    try:
        import redis
    except ImportError:
        raise ConfigError("cluster mode needs the Redis client: pip install 'chatpair[cluster]'") from None
    return redis


def connect(url: str, **options: Any) -> Any:
    """A ``redis.Redis`` for ``url`` (``redis://HOST:PORT/DB`` or ``unix:///path``); bytes in and out."""
    redis = redis_module()
    try:
        return redis.Redis.from_url(url, decode_responses=False, **options)
    except ValueError as error:
        raise ConfigError(f"bad Redis URL {url!r}: {error}") from None


#: Error replies that mean "Redis cannot serve now, try again": loading its data after a
#: restart, busy with a script, out of memory (``noeviction``), a read-only replica after a
#: failover, writes stopped after a failed save, ...
NOT_READY = frozenset({"LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "READONLY", "OOM", "MISCONF"})


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Redis is unreachable or failed" (for ``except`` clauses).

    Error replies count (redis-py's ``ResponseError``); :func:`is_outage`
    tells the ones to wait out from the ones that will come again.
    """
    redis = redis_module()
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError)


def error_code(error: BaseException) -> str:
    """An error reply's code (``OOM``, ``WRONGTYPE``, ...): redis-py keeps it apart for the codes it knows."""
    return getattr(error, "status_code", None) or _PIPELINE_COMMAND.sub("", str(error)).split(" ", 1)[0]


def error_text(error: BaseException) -> str:
    """An error on one line, an error reply's code first (redis-py keeps it apart for the codes it knows)."""
    text = _PIPELINE_COMMAND.sub("", " ".join(str(error).split())) or type(error).__name__
    code = getattr(error, "status_code", None)
    return f"{code} {text}" if code and not text.startswith(code) else text


def not_now(error: BaseException) -> bool:
    """Is this Redis saying it cannot serve now (:data:`NOT_READY`), whoever parsed the reply?"""
    return error_code(error) in NOT_READY


def refusing(error: BaseException) -> bool:
    """Did Redis answer (with an error), rather than not answer at all?"""
    return isinstance(error, redis_module().exceptions.ResponseError) or not_now(error)


def is_outage(error: BaseException) -> bool:
    """Wait and retry? Redis unreachable, or saying it cannot serve now (:data:`NOT_READY`);
    not an error reply that the same command would get again (``WRONGTYPE``, a bug)."""
    return not isinstance(error, redis_module().exceptions.ResponseError) or not_now(error)


def describe(error: BaseException) -> str:
    """One line for a log or a user: what went wrong talking to Redis.

    redis-py names the failed command of a pipeline with all its arguments:
    that is a client's message for an XADD, neither short nor for the log.
    """
    return f"Redis: {error_text(error)}"


#: How redis-py starts the error of a pipeline's failed command.
_PIPELINE_COMMAND = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: ")


def public_url(url: str) -> str:
    """The Redis URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
