"""Adaptive budget: how much compute a request gets, decided while it runs.

Requests with ``"budget": "auto"`` or ``{"target_accuracy": p, ...}`` sample in waves of ``w``
candidates. After each wave, with ``n`` answered samples whose top two answers hold ``a`` and
``b`` votes:

1. **Evidence** (Adaptive-Consistency's Beta rule): ``P_major = 1 − I_{1/2}(a+1, b+1)``, the
   posterior probability that the leading answer is the true majority.
2. **Difficulty**: the leader's share ``a / n`` estimates the request's single-sample accuracy
   ``p̂``; the budget profile's bucket with the nearest pass@1 is the request's difficulty.
3. **Marginal gain** of one more wave from that bucket's fitted accuracy-vs-k curve ``A(k)``
   (majority or verifier best-of, per strategy): ``Δ = A(k + w) − A(k)``, with ``k`` samples
   drawn so far. Its cost is ``w × t̄ × λ``: ``t̄`` tokens per sample (measured in this request,
   else the profile's), ``λ`` = ``token_cost`` (accuracy points one token is worth; default
   1e-5, i.e. 100k tokens for one more correct answer).

It stops when ``P_major ≥ confidence`` (``target_accuracy`` when given, else 0.95) —
``stop_reason: "confident"`` —, when ``Δ < cost`` (``"marginal_gain"``), when the fitted curve
says the target accuracy is reached and the evidence agrees (``"target_reached"``), or at a hard
limit: ``budget.samples`` (or ``max_samples``), ``budget.tokens`` and ``budget.deadline_ms``
(in-flight candidates aborted). Without a profile only the evidence rule and the limits apply.

The profile is the JSON that ``ttscale eval report`` writes (schema in ``ttscale.eval.analysis``);
the embedded model's ships with the package. A profile records the prompt format its curves were
measured with (``prompt``: system prompt and user template, :attr:`Profile.prompt`; absent in
profiles made before formats were recorded, which were measured with the problem alone as the
user message). The curves describe requests written in that format: fit a profile on the prompt
format the server's clients send (``ttscale eval run --prompt-template/--system-prompt``) and give
it with ``ttscale serve --budget-profile NAME=PATH``. One profile is used per model, whatever a
request's format; ``/v1/models`` shows the profile and its prompt format.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttscale.curves import FitResult
from ttscale.selection import beta_stop_probability

DEFAULT_TOKEN_COST = 1e-5


@dataclass
class Bucket:
    name: str
    pass1: float
    curves: dict[str, Any] = field(default_factory=dict)  # name -> FitResult
    points: dict[str, list[float]] = field(default_factory=dict)
    recommended: dict[str, Any] = field(default_factory=dict)

    def accuracy(self, curve: str, k: float) -> float | None:
        fit = self.curves.get(curve)
        if fit is not None and getattr(fit, "fittable", False):
            try:
                return float(fit.predict([k])[0])
            except Exception:
                pass
        ks, ys = self.points.get("k"), self.points.get(curve)
        if not ks or not ys:
            return None
        # piecewise-linear in log k, flat beyond the ends
        lk = math.log(max(k, 1))
        pts = sorted((math.log(max(x, 1)), y) for x, y in zip(ks, ys) if y is not None)
        if not pts:
            return None
        if lk <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            if lk <= x1:
                return y0 + (y1 - y0) * (lk - x0) / (x1 - x0 or 1)
        return pts[-1][1]


@dataclass
class Profile:
    model: str
    buckets: list[Bucket]
    tokens_per_sample: float | None = None
    k_max: int | None = None
    source: str = ""
    prompt: dict[str, Any] | None = None  # {"system", "template"} the curves were measured with

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        d = json.loads(Path(path).read_text())
        buckets = []
        for b in d.get("buckets", []):
            curves = {}
            for name, fd in (b.get("curves") or {}).items():
                try:
                    curves[name] = FitResult.from_dict(fd) if fd else None
                except Exception:
                    curves[name] = None
            buckets.append(
                Bucket(
                    name=str(b.get("name")),
                    pass1=float(b.get("pass1", 0.0)),
                    curves=curves,
                    points=b.get("points") or {},
                    recommended=b.get("recommended") or {},
                )
            )
        return cls(
            model=d.get("model", ""),
            buckets=buckets,
            tokens_per_sample=d.get("tokens_per_sample"),
            k_max=d.get("k_max"),
            source=str(path),
            prompt=d.get("prompt"),
        )

    def matches(self, prompt: Any) -> bool:
        """Whether ``prompt`` (chat messages, text or token ids) is written in the format the
        curves were measured with: the same system prompt (or none), the last user message the
        template with some problem in place of ``{problem}``. A profile that records no format
        fits any prompt; token ids fit only such a profile or the plain format."""
        if not self.prompt:
            return True
        system = self.prompt.get("system") or None
        template = str(self.prompt.get("template") or "{problem}")
        if isinstance(prompt, str):
            sys_text, user = None, prompt
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            first = prompt[0]
            sys_text = str(first.get("content") or "") if first.get("role") in ("system", "developer") else None
            users = [m for m in prompt if m.get("role") == "user"]
            user = str(users[-1].get("content") or "") if users else ""
        else:
            return system is None and template == "{problem}"
        if system != (sys_text or None):
            return False
        pre, _, post = template.partition("{problem}")
        return len(user) >= len(pre) + len(post) and user.startswith(pre) and user.endswith(post)

    @property
    def specificity(self) -> int:
        """How much fixed text the format holds (the most specific match wins)."""
        if not self.prompt:
            return -1
        return len(str(self.prompt.get("template") or "")) + len(str(self.prompt.get("system") or ""))

    def bucket_for(self, p1: float) -> Bucket | None:
        if not self.buckets:
            return None
        return min(self.buckets, key=lambda b: abs(b.pass1 - p1))


def default_profile_path(model_name: str) -> Path | None:
    """The budget profile shipped for ``model_name`` (``ttscale/profiles``), if any."""
    p = Path(__file__).resolve().parent / "profiles" / f"{model_name}.json"
    return p if p.is_file() else None


def select_profile(profiles: Sequence[Profile], prompt: Any) -> Profile | None:
    """The profile of a request: among a model's profiles, the most specific one whose prompt
    format the request is written in; the first one when none is (a single profile serves
    every request, as before formats were recorded)."""
    fits = [p for p in profiles if p.matches(prompt)]
    if fits:
        return max(fits, key=lambda p: p.specificity)  # max keeps the first of equals
    return profiles[0] if profiles else None


def load_profile(model_name: str, path: str | Path | None = None) -> Profile | None:
    p = Path(path) if path else default_profile_path(model_name)
    if p is None or not p.is_file():
        return None
    return Profile.load(p)


@dataclass
class Decision:
    stop: bool
    reason: str | None
    p_major: float
    p1_estimate: float
    bucket: str | None
    gain: float | None
    cost: float | None
    predicted_accuracy: float | None


def decide(
    counts: list[int],
    answered: int,
    drawn: int,
    *,
    wave: int,
    profile: Profile | None,
    curve: str,
    confidence: float,
    target: float | None,
    tokens_per_sample: float,
    token_cost: float,
) -> Decision:
    """One stopping decision after a wave (see the module docstring for the formulas)."""
    a = counts[0] if counts else 0
    b = counts[1] if len(counts) > 1 else 0
    p_major = beta_stop_probability(a, b) if a else 0.0
    p1 = a / answered if answered else 0.0
    bucket = profile.bucket_for(p1) if profile else None
    name = bucket.name if bucket is not None else None
    gain = cost = acc = None
    if bucket is not None:
        now, nxt = bucket.accuracy(curve, drawn), bucket.accuracy(curve, drawn + wave)
        if now is not None and nxt is not None:
            gain, acc = max(0.0, nxt - now), now
            cost = wave * tokens_per_sample * token_cost
    if a and p_major >= confidence:
        return Decision(True, "confident", p_major, p1, name, gain, cost, acc)
    if target is not None and acc is not None and acc >= target and p_major >= target:
        return Decision(True, "target_reached", p_major, p1, name, gain, cost, acc)
    if gain is not None and cost is not None and gain < cost:
        return Decision(True, "marginal_gain", p_major, p1, name, gain, cost, acc)
    return Decision(False, None, p_major, p1, name, gain, cost, acc)
