"""The sampling parameters a generation request takes, checked once for every route.

OpenAI's names are the ones used (``max_tokens``, ``temperature``, ``top_p``, ``top_k``,
``stop``, ``seed``); the Open Inference Protocol's generate extension takes the same
names in ``parameters`` (as Triton's and KServe's generate endpoints do). A value of the
wrong type or out of range is a 422 naming the field; a request over the model's
limits is refused before any token is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelfn.errors import InvalidInput

#: at most this many stop strings, each at most this long (OpenAI takes 4)
MAX_STOP = 4
MAX_STOP_CHARS = 200


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float,
            integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not (isinstance(value, int) or float(value).is_integer())):
        kind = "an integer" if integer else "a number"
        raise InvalidInput(f"{key!r} must be {kind}, not {value!r}")
    if not lo <= value <= hi:
        raise InvalidInput(f"{key!r} must lie in [{lo:g}, {hi:g}], not {value!r}")
    return int(value) if integer else float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise InvalidInput("'stop' must be a string or a list of strings")
    if len(items) > MAX_STOP:
        raise InvalidInput(f"'stop' takes at most {MAX_STOP} strings, not {len(items)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in items):
        raise InvalidInput(f"each 'stop' string must be 1 to {MAX_STOP_CHARS} characters")
    return tuple(items)


def _top_p(body: dict[str, Any]) -> float:
    value = _number(body, "top_p", 1.0, 0.0, 1.0)
    if value == 0.0:
        raise InvalidInput("'top_p' must lie in (0, 1], not 0 (for greedy decoding set "
                           "temperature to 0)")
    return float(value)


def sampling(body: dict[str, Any], generation: dict[str, Any],
             token_key: str = "max_tokens") -> Sampling:
    """The request's :class:`Sampling`, within the manifest's ``generation`` limits
    (``limits.max_tokens``; ``defaults.max_tokens`` when the request names none)."""
    limits, defaults = generation.get("limits", {}), generation.get("defaults", {})
    cap = int(limits.get("max_tokens", 256))
    aliases = [k for k in (token_key, "max_completion_tokens", "max_new_tokens")
               if body.get(k) is not None]
    key = aliases[0] if aliases else token_key
    value = body.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value > cap:
        raise InvalidInput(f"{key!r} is {value}; this model generates at most {cap} tokens "
                           "per request (the build's limits.max_tokens)")
    max_tokens = _number(body, key, min(int(defaults.get("max_tokens", 64)), cap), 1, cap,
                         integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2 ** 63):
        raise InvalidInput(f"'seed' must be a non-negative integer, not {seed!r}")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0 if generation.get("greedy_default", True)
                            else 1.0, 0.0, 2.0),
        top_p=_top_p(body),
        top_k=_number(body, "top_k", 0, 0, 10_000, integer=True),
        stop=_stop(body.get("stop")), seed=seed)
