"""Compute budgets: how many block executions per token a route may spend.

A ``Budget`` is a share of the model's blocks (``0.8``) or a block count (``24``). Every
searcher, baseline, environment and router reads it the same way: ``max_blocks(L)`` is
``floor(ratio * L)`` (never more than the share), and at least one block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LayerRouteError


class BudgetError(LayerRouteError, ValueError):
    """A budget that is not a share in (0, 1] or a positive block count, or that buys no block."""


def blocks_for_ratio(ratio: float, num_layers: int) -> int:
    """Blocks a ratio buys: ``floor(ratio * L)``, so a route never runs more than its share."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 0 < ratio <= 1:
        raise BudgetError(f"compute ratio must be a number in (0, 1], got {ratio!r}")
    k = math.floor(ratio * num_layers + 1e-9)  # the epsilon keeps 0.7 * 30 at 21
    if k < 1:
        raise BudgetError(f"ratio {ratio} of {num_layers} blocks leaves no block to run; the minimum is "
                          f"{1 / num_layers:.3f}")
    return k


@dataclass(frozen=True)
class Budget:
    """At most ``ratio * L`` or ``blocks`` block executions per token (exactly one is set)."""

    ratio: float | None = None
    blocks: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.blocks is None):
            raise BudgetError("a budget is either a share of the blocks or a block count, not both or neither")
        if self.ratio is not None:
            blocks_for_ratio(self.ratio, 10 ** 6)  # validates the range
        elif isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise BudgetError(f"a block budget must be a positive integer, got {self.blocks!r}")

    @classmethod
    def parse(cls, value: str | float | int | Budget | None) -> Budget | None:
        """``"0.8"`` (a share in (0, 1]) or ``"24"`` (a block count, an integer above 1); None stays None."""
        if value is None or isinstance(value, Budget):
            return value
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            raise BudgetError(f"budget {value!r} is not a number; give a share like 0.8 or a block count like 24") \
                from None
        if not math.isfinite(number) or number <= 0:
            raise BudgetError(f"budget {value!r} must be a share in (0, 1] or a positive block count")
        if number <= 1:
            return cls(ratio=number)
        if number != int(number):
            raise BudgetError(f"budget {value!r}: a block count must be a whole number (or give a share <= 1)")
        return cls(blocks=int(number))

    def max_blocks(self, num_layers: int) -> int:
        """The most block executions per token this budget allows on an ``num_layers``-block model."""
        if self.ratio is not None:
            return blocks_for_ratio(self.ratio, num_layers)
        return self.blocks

    def describe(self) -> str:
        return f"{self.ratio:g} of the blocks" if self.ratio is not None else f"{self.blocks} blocks"

    def to_json(self) -> float | int:
        return self.ratio if self.ratio is not None else self.blocks
