"""The per-token terms of METHOD §2 as one registry: A_{i,t} = A_seq_i + λ·f(u_{i,t}), one entry per method.

An entry carries everything the rest of the program needs to know about a method: its name (METHOD's registry key),
the term f(u), the term's shape in the authors' code (METHOD §9: `sd` is +φ(u) there, the bounded shape with the other
sign, where the paper's text has +u), whether the gate is on for it by default (METHOD §5 Decision) and its formula
for help texts and docs. The CLI's `--method` choices, `UpdateConfig`'s check, the gate default and the README's method table all
read this registry, so adding a method is one `register_term` call plus its test.

The term functions receive a tensor and use torch through it; torch itself is imported inside them, because
`antisd --help` reads this registry and must not pay torch's import (~2 s). This module keeps no state beyond the
registry, and does not mask, batch or scale by λ (`stages.method.advantages` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

LOG2 = math.log(2.0)


@dataclass(frozen=True)
class TokenTerm:
    """One method of METHOD §2."""

    name: str  # registry key: grpo | sd | antisd | rkl-ascent
    term: Callable  # f(u) → per-token term (a tensor like u); constant weight, no gradient wanted
    gated_by_default: bool  # `update --gate auto` turns the entropy gate on for this method
    formula: str  # A_{i,t} in METHOD's notation, for help texts and the README table
    uses_teacher: bool = True  # the term reads u (so λ acts); False: the token term is 0 and λ is reported as 0
    official_term: Callable | None = None  # r(u) of METHOD §9 step 4 (None: the same as `term`)

    def term_of(self, variant: str) -> Callable:
        """f(u) of `variant`: the paper's text (§2) or the authors' code (§9, `official`)."""
        return self.official_term if variant == "official" and self.official_term is not None else self.term


_TERMS: dict[str, TokenTerm] = {}


def register_term(name: str, *, gated_by_default: bool, formula: str, uses_teacher: bool = True,
                  official_term: Callable | None = None) -> Callable[[Callable], Callable]:
    """Register f(u) under `name` (a decorator); registering a name twice raises ValueError. `official_term`: the
    term's shape in the authors' code (METHOD §9), where it differs from f."""

    def decorator(fn: Callable) -> Callable:
        if name in _TERMS:
            raise ValueError(f"token-advantage method {name!r} is already registered")
        _TERMS[name] = TokenTerm(name, fn, gated_by_default, formula, uses_teacher, official_term)
        return fn

    return decorator


def get_term(name: str) -> TokenTerm:
    """The registered method `name`; ValueError listing the valid names otherwise."""
    if name not in _TERMS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(method_names())}")
    return _TERMS[name]


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order (METHOD's table order for the built-in ones)."""
    return tuple(_TERMS)


def phi(u):
    """φ(u) = ½(softplus(u) − log 2)  (METHOD §2): φ(0)=0, increasing, φ ≥ −½ log 2, φ ≈ u/2 for u ≫ 0, u/4 near 0.

    torch's softplus switches to the identity above 20 and uses log1p(exp(u)) below, so it neither overflows nor
    loses the tail at |u| = 1e4.
    """
    import torch.nn.functional as F

    return 0.5 * (F.softplus(u) - LOG2)


def antisd_term(u):
    """AntiSD token term −φ(u) = −½(softplus(u) − log 2), u = t − s (METHOD §2). Bounded above by ½ log 2 ≈ 0.3466."""
    return -phi(u)


@register_term("grpo", gated_by_default=False, formula="A_seq_i", uses_teacher=False)
def _grpo_term(u):
    """grpo: no token term (λ is irrelevant)."""
    return u.new_zeros(u.shape)


def sd_official_term(u):
    """sd in the authors' code (METHOD §9 step 4): r = +φ(u) = +½(softplus(u) − ln 2), antisd's shape, other sign."""
    return phi(u)


@register_term("sd", gated_by_default=False, formula="A_seq_i + λ·u_{i,t} (reverse-KL descent)",
               official_term=sd_official_term)
def _sd_term(u):
    """sd: +u, reverse-KL descent (rewards tokens the solution implies)."""
    return u


@register_term("antisd", gated_by_default=True, formula="A_seq_i − λ·φ(u_{i,t}), φ(u) = ½(softplus(u) − log 2)")
def _antisd_term(u):
    """antisd: −φ(u), Jensen–Shannon ascent."""
    return antisd_term(u)


@register_term("rkl-ascent", gated_by_default=True, formula="A_seq_i − λ·u_{i,t}")
def _rkl_ascent_term(u):
    """rkl-ascent: −u, reversed sign without the JSD bound (ablation)."""
    return -u
