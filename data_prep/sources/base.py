"""What a source of labelled images offers the writer: a fixed, ordered list of items and a loader.

The order is part of the contract: chunk c always holds items [c * chunk_size, (c + 1) * chunk_size),
so parallel tasks and reruns agree on what each chunk contains without talking to each other. Sources
describe themselves (`describe()`) so that a rerun can check it is looking at the same input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Item:
    """One input: `key` names it within its source (a relative file path, or a synthetic index)."""

    key: str
    label: int


@dataclass(frozen=True)
class Problem:
    """A skipped input (or an input-level defect such as an empty class folder), for the report."""

    key: str
    reason: str
    label: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "reason": self.reason}


class BadInput(Exception):
    """An input that cannot be turned into a sample (unreadable, truncated, not an image)."""


class ItemLoader(ABC):
    """Turns an Item into a (resolution, resolution, 3) uint8 array; small and picklable for workers."""

    @abstractmethod
    def load(self, item: Item, resolution: int) -> np.ndarray:
        """The preprocessed image of `item`; raises BadInput for inputs that must be skipped."""


class Source(ABC):
    """An ordered, labelled image collection."""

    kind: str
    class_names: list[str]
    synsets: list[str] | None = None
    problems: list[Problem]
    """Defects found while listing (empty class folders, stray files); reported, never fatal unless strict."""
    notes: list[str]
    """Things the user should know about how the input was read (printed by the CLI)."""

    @property
    @abstractmethod
    def num_items(self) -> int: ...

    @abstractmethod
    def items(self, start: int, stop: int) -> list[Item]:
        """Items [start, stop) in source order."""

    @abstractmethod
    def loader(self) -> ItemLoader: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON description that is equal for equal inputs; stored in plan.json and dataset.json."""

    @property
    def root(self) -> str | None:
        """Where the input lives, for information only: a tree may move without changing its content."""
        return None
