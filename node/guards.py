"""What an open swarm's node does about strangers' gradients: a rate per peer, and a sanity band per expert.

In an open swarm anyone may call ``Backward`` (a closed swarm checks membership instead,
``dmoe.membership``). Two cheap guards bound what a hostile or broken peer can do to an expert:

* ``BackwardRateLimit``: a token bucket per peer address, ``rate`` calls/s with ``BURST_SECONDS``
  worth of burst; over it, ``RESOURCE_EXHAUSTED``. A trainer's step sends one Backward per chosen
  expert and layer, so the default leaves honest trainers far below it.
* ``GradientGuard``: per expert, the running mean and spread of ``log`` of the incoming output
  gradient's RMS (per row). After ``WARMUP`` accepted calls, a gradient more than ``band`` times
  *above* the running geometric mean (and above 6 spreads) is refused with ``INVALID_ARGUMENT``
  and counted; refused ones do not move the statistics, so a flood of huge gradients cannot drag
  the band along. The band is one-sided: a gradient far *below* the level cannot harm an expert
  (honest trainers send them for tokens that gave the expert almost no gate weight), so it is
  accepted, but it does not move the statistics either, or a flood of tiny gradients would pull
  the ceiling down onto honest trainers. Honest gradients shrink slowly as training converges,
  which the running statistics follow. The parameter update is also clipped
  (``--clip-grad-norm``) whatever passes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

BURST_SECONDS = 2.0
WARMUP = 20  # accepted backward calls per expert before the band applies
_ALPHA = 0.05  # EWMA weight of a new accepted sample
_MAX_PEERS = 65536


class BackwardRateLimit:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, stamp)

    def allow(self, peer: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        burst = self.rate * BURST_SECONDS
        tokens, stamp = self._buckets.get(peer, (burst, now))
        tokens = min(burst, tokens + (now - stamp) * self.rate)
        if len(self._buckets) >= _MAX_PEERS and peer not in self._buckets:
            self._buckets.clear()  # a flood of addresses: start over rather than grow without bound
        if tokens < 1.0:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - 1.0, now)
        return True


@dataclass
class _Stats:
    accepted: int = 0
    mean: float = 0.0  # of log RMS
    var: float = 0.0


class GradientGuard:
    def __init__(self, band: float) -> None:
        self.band = band
        self._stats: dict[str, _Stats] = {}

    def check(self, uid: str, grad: torch.Tensor) -> str | None:
        """None if ``grad`` is plausible for ``uid`` (and then it counts); else why it is refused."""
        if self.band <= 0:
            return None
        rms = float(grad.detach().float().pow(2).mean().sqrt()) if grad.numel() else 0.0
        if not math.isfinite(rms) or rms <= 0.0:
            return None  # zeros are harmless; non-finite values are refused by the request checks
        value = math.log(rms)
        stats = self._stats.setdefault(uid, _Stats())
        if stats.accepted >= WARMUP:
            margin = max(math.log(self.band), 6.0 * math.sqrt(stats.var))
            if value - stats.mean > margin:
                return (f"output gradient RMS {rms:.3g} is more than {self.band:g}x above this expert's running "
                        f"level {math.exp(stats.mean):.3g}; refused (--grad-norm-band)")
            if stats.mean - value > margin:
                return None  # harmless, but no evidence about the honest level
        stats.accepted += 1
        alpha = max(_ALPHA, 1.0 / stats.accepted)
        delta = value - stats.mean
        stats.mean += alpha * delta
        stats.var = (1 - alpha) * (stats.var + alpha * delta * delta)
        return None
