"""What the expert search hands the dispatcher: each token's chosen experts, best first."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FoundExpert:
    uid: str
    coords: tuple[int, ...]
    score: float
    endpoints: tuple[str, ...]  # every alive replica, unordered (the caller orders them by health)
    banned: bool = False  # every endpoint banned: chosen only because too few others were found


@dataclass
class SearchResult:
    experts: list[list[FoundExpert]]  # per sample, best first
    rounds: int
    prefixes_fetched: int  # distinct prefixes requested from the table (cached or not)
    elapsed: float
    budget_exhausted: bool
