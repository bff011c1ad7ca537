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


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Redis is unreachable or failed" (for ``except`` clauses).

    An error reply counts: a Redis out of memory, read-only (a replica after
    a failover) or refusing writes after a failed save answers every write
    with one, and the node waits for it as for one that is gone.
    """
    redis = redis_module()
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError)


def refusing(error: BaseException) -> bool:
    """Did Redis answer (with an error), rather than not answer at all?"""
    return isinstance(error, redis_module().exceptions.ResponseError)


def describe(error: BaseException) -> str:
    """One line for a log or a user: what went wrong talking to Redis.

    redis-py names the failed command of a pipeline with all its arguments:
    that is a client's message for an XADD, neither short nor for the log.
    """
    text = " ".join(str(error).split()) or type(error).__name__
    return f"Redis: {_PIPELINE_COMMAND.sub('', text)}"


#: How redis-py starts the error of a pipeline's failed command.
_PIPELINE_COMMAND = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: ")


def public_url(url: str) -> str:
    """The Redis URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
