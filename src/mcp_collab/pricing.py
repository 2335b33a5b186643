"""What a step cost in dollars: the vendor's own figure when it gives one, else a price table.

The table holds US dollars per million tokens for the models mcp-collab's runtimes use by default
and the common current ones. Prices change: the operator replaces or extends the table with
``MCP_COLLAB_PRICES`` (a path to a JSON file, or the JSON itself), checked when the server starts::

    {"gpt-5": {"input": 1.25, "cachedInput": 0.125, "output": 10},
     "my-local-model": {"input": 0, "output": 0}}

Entries the operator gives win over the built-in ones of the same name; the rest stay. A model
without a price gets no dollars (``costSource`` ``unknown``), never a guess.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .models import CostSource, Usage

PER_MILLION = 1_000_000


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens. Unset cached/cache-write prices fall back to the input price."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None

    def cost(self, usage: Usage) -> float | None:
        """The dollars of ``usage``; None when it does not say how many tokens went in and out."""
        if usage.input_tokens is None and usage.output_tokens is None:
            return None
        cached = usage.cached_input_tokens or 0
        written = usage.cache_write_tokens or 0
        fresh = max(0, (usage.input_tokens or 0) - cached - written)
        dollars = (
            fresh * self.input
            + cached * (self.input if self.cached_input is None else self.cached_input)
            + written * (self.input if self.cache_write is None else self.cache_write)
            + (usage.output_tokens or 0) * self.output
        )
        return dollars / PER_MILLION


# Published list prices in USD per million tokens (standard tier, prompts up to 200k tokens), as read
# from the vendors' pricing pages (openai.com/api/pricing, ai.google.dev/gemini-api/docs/pricing,
# docs.anthropic.com/en/docs/about-claude/pricing) in late 2025. Anthropic's cache write is the
# 5-minute one. Models the vendors had not priced publicly then are absent: set them with MCP_COLLAB_PRICES.
BUILTIN_PRICES: dict[str, Price] = {
    # OpenAI (codex_cli, openai_sdk; MCP_COLLAB_OPENAI_MODEL defaults to gpt-5-codex)
    "gpt-5": Price(1.25, 10.0, cached_input=0.125),
    "gpt-5-codex": Price(1.25, 10.0, cached_input=0.125),
    "gpt-5-mini": Price(0.25, 2.0, cached_input=0.025),
    "gpt-5-nano": Price(0.05, 0.40, cached_input=0.005),
    "gpt-4.1": Price(2.0, 8.0, cached_input=0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, cached_input=0.10),
    "gpt-4o": Price(2.50, 10.0, cached_input=1.25),
    "gpt-4o-mini": Price(0.15, 0.60, cached_input=0.075),
    "o3": Price(2.0, 8.0, cached_input=0.50),
    "o4-mini": Price(1.10, 4.40, cached_input=0.275),
    # Google (gemini_cli, google_sdk; MCP_COLLAB_GEMINI_MODEL defaults to gemini-2.5-pro)
    "gemini-2.5-pro": Price(1.25, 10.0, cached_input=0.31),
    "gemini-2.5-flash": Price(0.30, 2.50, cached_input=0.075),
    "gemini-2.5-flash-lite": Price(0.10, 0.40, cached_input=0.025),
    # Anthropic (claude_cli reports its own cost; anthropic_sdk)
    "claude-opus-4-1": Price(15.0, 75.0, cached_input=1.50, cache_write=18.75),
    "claude-opus-4-5": Price(5.0, 25.0, cached_input=0.50, cache_write=6.25),
    "claude-sonnet-4": Price(3.0, 15.0, cached_input=0.30, cache_write=3.75),
    "claude-sonnet-4-5": Price(3.0, 15.0, cached_input=0.30, cache_write=3.75),
    "claude-haiku-4-5": Price(1.0, 5.0, cached_input=0.10, cache_write=1.25),
    "claude-3-5-haiku": Price(0.80, 4.0, cached_input=0.08, cache_write=1.0),
}

PRICE_FIELDS = {"input": "input", "output": "output", "cachedInput": "cached_input", "cacheWrite": "cache_write"}
PRICES_VARIABLE = "MCP_COLLAB_PRICES"
PRICES_SHAPE = (
    'a JSON object of model name -> {"input": N, "output": N, "cachedInput": N, "cacheWrite": N} in US dollars '
    "per million tokens (input and output required), or the path of a file holding one"
)


class PriceTable:
    def __init__(self, prices: Mapping[str, Price]) -> None:
        self.prices = dict(prices)

    def find(self, model: str) -> Price | None:
        """The price of ``model``: its own entry, else the entry it is a dated snapshot of
        (``gpt-5-2025-08-07``, ``claude-sonnet-4-5-20250929``: the name, a dash, then digits)."""
        name = model.strip().lower().removeprefix("models/")
        if name in self.prices:
            return self.prices[name]
        best = None
        for key in self.prices:
            rest = name[len(key) + 1 :]
            if name.startswith(key + "-") and rest[:1].isdigit() and (best is None or len(key) > len(best)):
                best = key
        return self.prices[best] if best is not None else None

    def cost(self, model: str | None, usage: Usage | None, vendor_usd: float | None) -> tuple[float | None, CostSource]:
        """A step's dollars and where they come from."""
        if vendor_usd is not None:
            return vendor_usd, "vendor"
        price = self.find(model) if model else None
        dollars = price.cost(usage) if price is not None and usage is not None else None
        return (dollars, "price_table") if dollars is not None else (None, "unknown")


def load_prices(raw: str) -> PriceTable:
    """The built-in table with the operator's ``MCP_COLLAB_PRICES`` laid over it; ConfigError says
    what is wrong and what is accepted."""
    raw = raw.strip()
    if not raw:
        return PriceTable(BUILTIN_PRICES)
    text = raw
    if raw[:1] not in ("{", "["):  # JSON itself starts so; anything else is a path
        try:
            text = Path(raw).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{PRICES_VARIABLE}: cannot read {raw} ({exc}); expected {PRICES_SHAPE}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{PRICES_VARIABLE} is not JSON (line {exc.lineno}: {exc.msg}); expected {PRICES_SHAPE}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{PRICES_VARIABLE} is not a JSON object; expected {PRICES_SHAPE}")
    prices = dict(BUILTIN_PRICES)
    for model, entry in data.items():
        prices[model.strip().lower()] = _price(model, entry)
    return PriceTable(prices)


def _price(model: str, entry: object) -> Price:
    where = f"{PRICES_VARIABLE}: the entry for {model[:80]!r}"
    if not model.strip() or not isinstance(entry, dict):
        raise ConfigError(f"{where} is not a model name with an object of prices; expected {PRICES_SHAPE}")
    unknown = sorted(set(entry) - set(PRICE_FIELDS))
    if unknown:
        raise ConfigError(f"{where} has unknown keys {', '.join(unknown)}; accepted: {', '.join(PRICE_FIELDS)}")
    values: dict[str, float] = {}
    for key, name in PRICE_FIELDS.items():
        value = entry.get(key)
        if value is None:
            if key in ("input", "output"):
                raise ConfigError(f"{where} has no {key!r} price; {PRICES_SHAPE}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}: {key} must be a number of dollars per million tokens, zero or more")
        values[name] = float(value)
    return Price(**values)
