"""Online split-conformal rejection: is a new score unusually bad among those seen so far?

For a nonconformity score s (larger = worse) and the scores S seen before it,
``p = (1 + #{v in S : v >= s}) / (|S| + 1)``; reject iff ``p <= alpha``. When the scores are
exchangeable, P(reject) <= alpha, and it approaches alpha as S grows. Nothing is rejected
before S holds ``warmup`` scores (with few scores no p-value can fall below alpha anyway).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class OnlineConformal:
    alpha: float
    warmup: int = 1
    higher_is_worse: bool = True
    _seen: list[float] = field(default_factory=list)  # sorted nonconformity scores
    decisions: int = 0
    rejections: int = 0

    def p_value(self, score: float) -> float:
        s = score if self.higher_is_worse else -score
        at_least = len(self._seen) - bisect.bisect_left(self._seen, s)
        return (1 + at_least) / (len(self._seen) + 1)

    def calibrate(self, scores) -> None:
        """Set the calibration array (e.g. from a calibration phase)."""
        self._seen = sorted(s if self.higher_is_worse else -s for s in scores)

    def test(self, score: float, *, learn: bool = True) -> tuple[float, bool]:
        """p-value of ``score`` against the scores so far and whether to reject it; with
        ``learn`` the score then joins the calibration array (online calibration)."""
        p = self.p_value(score)
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
