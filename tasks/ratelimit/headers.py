"""What a provider's response headers say about its rate limit (pure functions).

`pause_seconds` is how long every worker on the key should hold off: a 429's
`Retry-After` (or `retry-after-ms`), a 503's `Retry-After`, or, on any response, the
`x-ratelimit-reset-*` of a limit whose `x-ratelimit-remaining-*` is 0. OpenAI's reset
values are Go durations (`1s`, `6m0s`, `12ms`); `parse_duration` reads them and bare
seconds.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from typing import Final

from tasks.errors import MAX_RETRY_AFTER

# The longest pause one response can put on a key: a provider's `Retry-After: 86400` (or a
# broken header) must not stop every worker for a day; a key still limited after it
# answers 429 again and pauses again.
MAX_PAUSE: Final = 600.0
# A 429 that says nothing about when to come back pauses the key this long.
DEFAULT_429_PAUSE: Final = 1.0

_UNITS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6,
                 "ns": 1e-9}
_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(name).lower(): str(value) for name, value in headers.items()}


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None
                      ) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date,
    cut to MAX_RETRY_AFTER (a day): a provider's `Retry-After: 1e20` is not a plan."""
    if not headers:
        return None
    found = _lower(headers)
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = found.get(name)
        if raw is None:
            continue
        try:
            seconds = float(raw) / scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return min(seconds, MAX_RETRY_AFTER)
    raw = found.get("retry-after")
    if raw:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            return None
        now = time.time() if now is None else now
        return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)
    return None


def parse_duration(raw: str | None) -> float | None:
    """Seconds in a reset value: a Go duration (`6m0s`, `1.5s`, `12ms`, `1h2m3s`) or a bare
    number of seconds (`20`, `0.5`); None when it is neither."""
    if raw is None:
        return None
    text = raw.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _whole(raw: str | None) -> int | None:
    try:
        return int(raw.strip()) if raw is not None else None
    except ValueError:
        return None


def exhausted_reset(headers: Mapping[str, str]) -> float | None:
    """The longest `x-ratelimit-reset-{requests,tokens}` among the limits the headers say
    are used up (`x-ratelimit-remaining-*` 0 or less); None when none is."""
    found = _lower(headers)
    resets = [reset for kind in ("requests", "tokens")
              if (remaining := _whole(found.get(f"x-ratelimit-remaining-{kind}"))) is not None
              and remaining <= 0
              and (reset := parse_duration(found.get(f"x-ratelimit-reset-{kind}"))) is not None]
    return max(resets) if resets else None


def pause_seconds(status: int | None, headers: Mapping[str, str] | None, *,
                  now: float | None = None) -> float | None:
    """How long every worker on the key should wait after this response (at most
    MAX_PAUSE); None: no pause.

    - 429: its `retry-after-ms` / `Retry-After`; else the reset of a used-up limit; else
      DEFAULT_429_PAUSE.
    - 503 with `Retry-After`: that.
    - any response whose `x-ratelimit-remaining-requests` or `-tokens` is 0: that
      limit's `x-ratelimit-reset-*`.
    """
    headers = headers or {}
    retry = parse_retry_after(headers, now=now) if status in (429, 503) else None
    reset = exhausted_reset(headers)
    if status == 429:
        pause = retry if retry is not None else reset if reset is not None else DEFAULT_429_PAUSE
    else:
        candidates = [s for s in (retry, reset) if s is not None]
        if not candidates:
            return None
        pause = max(candidates)
    return min(pause, MAX_PAUSE) if pause > 0 else None
