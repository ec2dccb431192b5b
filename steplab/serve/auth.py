"""API keys and per-key rate limits.

Keys come from a file (one key per line; blank lines and ``#`` comments ignored) and/or the environment
variable ``STEPLAB_API_KEYS`` (keys separated by commas or whitespace). Clients send
``Authorization: Bearer KEY``. Authentication is only ever off when the caller says so explicitly
(``steplab serve --no-auth``, ``create_app(..., api_keys=None)``); an empty key set is an error, not "open".

Rate limits are token buckets, one per key (per client address when auth is off): a bucket holds up to
``burst`` requests and refills at ``rate`` requests per second; an empty bucket answers 429 with a
Retry-After of the seconds until the next request is allowed.
"""
from __future__ import annotations

import hmac
import math
import os
import re
import threading
import time
from pathlib import Path

from steplab.errors import ConfigError

ENV_VAR = "STEPLAB_API_KEYS"
_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


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


def parse_rate(text: str) -> tuple[float, float]:
    """``"60/min"`` -> (1.0 request/s, burst 60); ``"5/s"``, ``"1000/hour"``; ``"60/min,burst=10"`` sets the burst."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*/\s*([a-z]+)\s*(?:,\s*burst\s*=\s*([0-9]+)\s*)?", text.lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"rate limit {text!r} is not of the form N/s, N/min or N/hour (optionally ',burst=B'), e.g. 60/min")
    count, seconds = float(m.group(1)), _UNITS[m.group(2)]
    burst = float(m.group(3)) if m.group(3) else max(1.0, count)
    if burst < 1:
        raise ConfigError(f"rate limit {text!r}: burst must be at least 1")
    return count / seconds, burst


class KeyChecker:
    """Constant-time comparison of a presented Bearer token against the configured keys."""

    def __init__(self, keys: set[str]):
        if not keys:
            raise ConfigError(f"no API keys configured: pass --api-keys-file FILE or set {ENV_VAR}, "
                              "or disable authentication explicitly with --no-auth")
        self._keys = [k.encode() for k in keys]

    def check(self, authorization: str | None) -> tuple[bool, str]:
        """(ok, reason); the reason is a message for a 401."""
        if not authorization:
            return False, "missing API key: send it as the header 'Authorization: Bearer YOUR_KEY'"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False, "malformed Authorization header: expected 'Authorization: Bearer YOUR_KEY'"
        presented = token.strip().encode()
        ok = False
        for key in self._keys:  # compare against every key so timing does not reveal which one was close
            ok |= hmac.compare_digest(presented, key)
        return (True, "") if ok else (False, "incorrect API key provided")


class RateLimiter:
    """Token buckets keyed by API key (or client address); thread-safe."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0.0 when the request may go ahead (one token taken), else the seconds to wait before retrying."""
        now = self._clock()
        with self._lock:
            if len(self._buckets) > 10_000:  # forget refilled buckets so many distinct clients cannot grow memory
                self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst}
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> str:
        return str(max(1, math.ceil(wait)))
