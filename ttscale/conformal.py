"""Online split-conformal rejection: is a new score unusually bad among those seen so far?

For a nonconformity score s (larger = worse) and the scores S seen before it,
``p = (1 + #{v in S : v >= s}) / (|S| + 1)``; reject iff ``p <= alpha``. When the scores are
exchangeable, P(reject) <= alpha, and it approaches alpha as S grows. With ``smoothed`` (the
default) ties are broken at random: ``p = (#{v > s} + U·(#{v = s} + 1)) / (|S| + 1)``, U uniform
on [0, 1) from a seeded generator, which makes P(reject) = alpha exactly under exchangeability
even when many scores are equal (identical partial answers score the same). Nothing is rejected
before S holds ``warmup`` scores.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class OnlineConformal:
    alpha: float
    warmup: int = 1
    higher_is_worse: bool = True
    _seen: list[float] = field(default_factory=list)  # sorted nonconformity scores
    smoothed: bool = True
    seed: int | None = 0
    decisions: int = 0
    rejections: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def p_value(self, score: float, u: float = 1.0) -> float:
        """Conformal p-value; ``u`` in [0, 1) randomises ties (1.0: the conservative value)."""
        s = score if self.higher_is_worse else -score
        lo = bisect.bisect_left(self._seen, s)
        hi = bisect.bisect_right(self._seen, s)
        greater = len(self._seen) - hi
        return (greater + u * (hi - lo + 1)) / (len(self._seen) + 1)

    def calibrate(self, scores: Iterable[float]) -> None:
        """Set the calibration array (e.g. from a calibration phase)."""
        self._seen = sorted(s if self.higher_is_worse else -s for s in scores)

    def test(self, score: float, *, learn: bool = True) -> tuple[float, bool]:
        """p-value of ``score`` against the scores so far and whether to reject it; with
        ``learn`` the score then joins the calibration array (online calibration)."""
        p = self.p_value(score, self._rng.random() if self.smoothed else 1.0)
        reject = len(self._seen) >= self.warmup and p <= self.alpha
        if learn:
            bisect.insort(self._seen, score if self.higher_is_worse else -score)
        self.decisions += 1
        self.rejections += int(reject)
        return p, reject

    @property
    def size(self) -> int:
        return len(self._seen)

    @property
    def rejection_rate(self) -> float:
        return self.rejections / self.decisions if self.decisions else 0.0
