"""API keys, per-key rate limits and the brute-force guard.

Keys come from a file (one key per line; blank lines and ``#`` comments ignored) and/or the environment
variable ``STEPLAB_API_KEYS`` (keys separated by commas or whitespace). Clients send
``Authorization: Bearer KEY``. Authentication is only ever off when the caller says so explicitly
(``steplab serve --no-auth``, ``create_app(..., api_keys=None)``); an empty key set is an error, not "open".

Rate limits use the ``limits`` library (moving windows, in memory): ``"60/minute"``, several at once with
``;`` (``"60/minute;10/10 seconds"`` caps bursts too). They apply per key (per client address when auth is
off). Failed authentications are counted per client address (default ``20/minute``): past that, every
request from the address gets 429 with Retry-After *before its key is looked at*, so guessing cannot go on
at full speed and a blocked guesser learns nothing about its guesses. The key itself is never stored,
logged or exported: limiter buckets are named by a hash of it.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import time
from pathlib import Path

from steplab.errors import ConfigError

ENV_VAR = "STEPLAB_API_KEYS"
AUTH_FAILURE_LIMIT = "20/minute"
_UNITS = {"s": "second", "sec": "second", "secs": "second", "seconds": "second", "m": "minute", "min": "minute",
          "mins": "minute", "minutes": "minute", "h": "hour", "hr": "hour", "hours": "hour", "d": "day", "days": "day"}


def load_api_keys(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> set[str]:
    """Keys from ``path`` (if given) plus ``$STEPLAB_API_KEYS``; ConfigError when the file is unreadable."""
    keys: set[str] = set()
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text("utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read the API key file {p}: {e.strerror}; create it with one key per line") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    env = os.environ if environ is None else environ
    keys.update(k for k in re.split(r"[,\s]+", env.get(ENV_VAR, "")) if k)
    return keys


def parse_rate(text: str) -> list:
    """``"60/min"`` -> [limits item 60 per 1 minute]; ``"60/minute;10/10 seconds"`` -> two items (both apply)."""
    from limits import parse_many

    parts = []
    for part in re.split(r"[;,]", text):
        m = re.fullmatch(r"\s*(\d+)\s*(?:/|per)\s*(\d+\s*)?([a-z]+)\s*", part.lower())
        if not m or _UNITS.get(m.group(3), m.group(3)).rstrip("s") not in ("second", "minute", "hour", "day") or int(m.group(1)) < 1:
            raise ConfigError(f"rate limit {text!r} is not of the form N/second, N/minute, N/hour or N/day (several joined "
                              f"with ';', e.g. '60/minute;10/10 seconds')")
        unit = _UNITS.get(m.group(3), m.group(3)).rstrip("s")
        parts.append(f"{m.group(1)}/{(m.group(2) or '').strip() + ' ' if m.group(2) else ''}{unit}")
    return parse_many(";".join(parts))


class KeyChecker:
    """Constant-time comparison of a presented Bearer token against the configured keys."""

    def __init__(self, keys: set[str]):
        if not keys:
            raise ConfigError(f"no API keys configured: pass --api-keys-file FILE or set {ENV_VAR}, "
                              "or disable authentication explicitly with --no-auth")
        # compare digests of equal length, so the comparison time does not depend on the key's length either
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @staticmethod
    def token(authorization: str | None) -> tuple[str | None, str]:
        """(the presented key, "") or (None, why it is malformed)."""
        if not authorization:
            return None, "missing API key: send it as the header 'Authorization: Bearer YOUR_KEY'"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "malformed Authorization header: expected 'Authorization: Bearer YOUR_KEY'"
        return token.strip(), ""

    def check(self, authorization: str | None) -> tuple[bool, str]:
        """(ok, reason); the reason is a message for a 401."""
        token, reason = self.token(authorization)
        if token is None:
            return False, reason
        presented = hashlib.sha256(token.encode()).digest()
        ok = False
        for digest in self._digests:  # compare against every key so timing does not reveal which one was close
            ok |= hmac.compare_digest(presented, digest)
        return (True, "") if ok else (False, "incorrect API key provided")


def bucket_name(key: str) -> str:
    """A limiter bucket for a key that does not hold the key itself."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:24]


class RateLimiter:
    """Moving-window limits (``limits``) per bucket name; thread-safe, in memory."""

    def __init__(self, items: list | str, clock=time.time):
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.items = parse_rate(items) if isinstance(items, str) else list(items)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._clock = clock

    def describe(self) -> str:
        return "; ".join(str(item) for item in self.items)

    def acquire(self, bucket: str) -> float:
        """0.0 when the request may go ahead (counted), else the seconds to wait before retrying."""
        for item in self.items:
            if not self._limiter.test(item, bucket):
                return self.wait(item, bucket)
        for item in self.items:
            self._limiter.hit(item, bucket)
        return 0.0

    def blocked(self, bucket: str) -> float:
        """Seconds ``bucket`` must wait (0.0 when it is under every limit); counts nothing."""
        for item in self.items:
            if not self._limiter.test(item, bucket):
                return self.wait(item, bucket)
        return 0.0

    def hit(self, bucket: str) -> None:
        for item in self.items:
            self._limiter.hit(item, bucket)

    def wait(self, item, bucket: str) -> float:
        return max(0.001, self._limiter.get_window_stats(item, bucket).reset_time - self._clock())

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))
