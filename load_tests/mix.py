"""A weighted mix of models: ``"mlp:3,matmul16:1"`` sends three mlp requests for each matmul16 one, at random."""

from __future__ import annotations

import random

from .clients import Client

__all__ = ["Mix", "parse_mix"]


def parse_mix(model: str) -> tuple[tuple[str, float], ...]:
    """``"mlp"`` or ``"mlp:3,matmul16:1"`` as (name, weight) pairs; weights default to 1."""
    pairs = []
    for part in (p.strip() for p in model.split(",")):
        name, _, weight = part.partition(":")
        value = float(weight) if weight else 1.0
        if not name or not value > 0:
            raise ValueError(f"model {part!r}: expected NAME or NAME:WEIGHT with a weight > 0")
        pairs.append((name, value))
    return tuple(pairs)


class Mix:
    """Picks one client per request by weight (a plain pass-through for a single model)."""

    def __init__(self, clients: list[Client], weights: list[float], seed: int) -> None:
        self.clients, self.weights, self._rng = clients, weights, random.Random(seed)
        self.send = clients[0].send if len(clients) == 1 else self._send_one

    async def _send_one(self) -> None:
        await self._rng.choices(self.clients, self.weights)[0].send()
