"""Budgeted bit allocation: one codec per tensor group, least total ΔKLD within a bit budget
(issue 17, part 2).

The problem is a multiple-choice knapsack: group g takes exactly one option o with cost
bits[g][o] and loss dkld[g][o] (the measured ΔKLD of moving g from the base to o, 0 for the base;
quant/sensitivity.py), and the losses are taken as additive. Minimise sum loss subject to
sum bits <= budget.

- `exact_knapsack`: dynamic programming over the groups with the reachable total costs (costs are
  integers: stored bits); exact, used when the number of distinct partial sums stays small.
- `greedy_allocate`: start from each group's cheapest option, repeatedly take the upgrade with
  the largest loss decrease per added bit that still fits, then an exchange pass: any single
  change of one group, or a pair (one group up, another down), that lowers the loss and fits is
  taken, until none is left.
- `allocate` picks the exact solver when it is small enough, else greedy.

Pure Python and pydantic, no torch (the spec validates `allocate:` without it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

EXACT_STATES = 200_000   # distinct partial costs per DP step beyond which `allocate` goes greedy


@dataclass
class Allocation:
    choice: list[int]      # option index per group
    bits: int
    loss: float
    method: str


def _check(bits: Sequence[Sequence[int]], loss: Sequence[Sequence[float]]) -> None:
    if len(bits) != len(loss) or any(len(b) != len(l) or not b for b, l in zip(bits, loss)):
        raise ValueError("allocate: bits and loss must have one non-empty row of options per group, of equal lengths")


def _total(choice, bits, loss):
    return sum(bits[g][o] for g, o in enumerate(choice)), sum(loss[g][o] for g, o in enumerate(choice))


def exact_knapsack(bits: Sequence[Sequence[int]], loss: Sequence[Sequence[float]], budget: int,
                   max_states: int | None = None) -> Allocation | None:
    """The least-loss choice with total bits <= budget, or None when nothing fits (or, with
    `max_states`, when the DP grows beyond it)."""
    _check(bits, loss)
    states: dict[int, tuple[float, tuple]] = {0: (0.0, ())}   # total cost -> (least loss, choice)
    for g in range(len(bits)):
        nxt: dict[int, tuple[float, tuple]] = {}
        for cost, (l, ch) in states.items():
            for o, (b, dl) in enumerate(zip(bits[g], loss[g])):
                c = cost + b
                if c > budget:
                    continue
                cand = (l + dl, ch + (o,))
                if c not in nxt or cand[0] < nxt[c][0]:
                    nxt[c] = cand
        # a state with more bits and no less loss than another is never better: drop it
        pruned, best = {}, float("inf")
        for c in sorted(nxt):
            if nxt[c][0] < best:
                pruned[c], best = nxt[c], nxt[c][0]
        states = pruned
        if not states or (max_states is not None and len(states) > max_states):
            return None
    cost = min(states, key=lambda c: (states[c][0], c))
    return Allocation(list(states[cost][1]), cost, states[cost][0], "exact")


def greedy_allocate(bits: Sequence[Sequence[int]], loss: Sequence[Sequence[float]], budget: int) -> Allocation | None:
    """Greedy loss-per-bit upgrades from the cheapest options, then an exchange pass (see the module
    docstring). None when even the cheapest options exceed the budget."""
    _check(bits, loss)
    n = len(bits)
    choice = [min(range(len(bits[g])), key=lambda o: (bits[g][o], loss[g][o])) for g in range(n)]
    total, cur = _total(choice, bits, loss)
    if total > budget:
        return None
    while True:  # upgrades: most loss removed per added bit (free improvements first)
        best, best_rate = None, 0.0
        for g in range(n):
            o0 = choice[g]
            for o in range(len(bits[g])):
                db, dl = bits[g][o] - bits[g][o0], loss[g][o] - loss[g][o0]
                if dl >= 0 or total + db > budget:
                    continue
                rate = float("inf") if db <= 0 else -dl / db
                if best is None or rate > best_rate:
                    best, best_rate = (g, o, db, dl), rate
        if best is None:
            break
        g, o, db, dl = best
        choice[g], total, cur = o, total + db, cur + dl
    while True:  # exchange pass: the best single change or pair of changes (one group up, another down)
        moves = [(g, o, bits[g][o] - bits[g][choice[g]], loss[g][o] - loss[g][choice[g]])
                 for g in range(n) for o in range(len(bits[g])) if o != choice[g]]
        best, best_dl = None, -1e-15
        for i, (g, o, db, dl) in enumerate(moves):
            if dl < best_dl and total + db <= budget:
                best, best_dl = ((g, o),), dl
            for h, p, db2, dl2 in moves[i + 1:]:
                if h != g and dl + dl2 < best_dl and total + db + db2 <= budget:
                    best, best_dl = ((g, o), (h, p)), dl + dl2
        if best is None:
            break
        for g, o in best:
            choice[g] = o
        total, cur = _total(choice, bits, loss)
    total, cur = _total(choice, bits, loss)
    return Allocation(choice, total, cur, "greedy+exchange")


def allocate(bits: Sequence[Sequence[int]], loss: Sequence[Sequence[float]], budget: int) -> Allocation | None:
    """Exact where the DP stays small, else greedy with the exchange pass."""
    return exact_knapsack(bits, loss, budget, EXACT_STATES) or greedy_allocate(bits, loss, budget)


# ---- the arm option `allocate:` ---------------------------------------------------------------

from typing import Literal  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field, model_validator  # noqa: E402

from quantatlas.quant.config import config_field  # noqa: E402


class AllocTarget(BaseModel):
    """Exactly one budget: bits per weight over every quantized tensor, bits per parameter of the
    whole model (the other parameters at fp16), or `bytes` of the artifact file after `compressor`
    (estimated from each tensor compressed alone; the run measures the real file)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    bits_per_weight: float | None = Field(None, gt=0)
    bits_per_param: float | None = Field(None, gt=0)
    bytes: int | None = Field(None, gt=0)
    compressor: Literal["zstd-22", "brotli-11"] = "zstd-22"

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.bits_per_weight, self.bits_per_param, self.bytes)) != 1:
            raise ValueError("give exactly one of bits_per_weight, bits_per_param, bytes")
        return self


class AllocateConfig(BaseModel):
    """`allocate: {candidates: [q5_k, q6_k], target: {bits_per_weight: 4.89}}` on an arm: the arm's
    codec is the base; each group (role x layer by default) gets the base or a candidate, chosen
    from ΔKLD measured on calibration tokens (quant/sensitivity.py) within the target.
    `assignment` (group -> codec), as a run writes it, skips the measurement: the same model again."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    candidates: list[config_field("codec", nullable=False)] = Field(min_length=1)
    target: AllocTarget
    grouping: Literal["role_layer", "role", "layer"] = "role_layer"
    assignment: dict[str, config_field("codec", nullable=False)] | None = None


def budget_bits(target: AllocTarget, sens, n_params: int) -> int:
    """The bit budget of the allocated groups for `target`: bits per weight over every quantized
    tensor, or bits per parameter of the whole model, less what the tensors outside the groups
    store (overrides at their codec, unquantized parameters at 16 bits)."""
    weights = sum(g.weights for g in sens.groups)
    if target.bytes is not None:
        return int(8 * target.bytes - sens.other_zbits)
    if target.bits_per_weight is not None:
        return int(target.bits_per_weight * (weights + sens.other_weights) - sens.other_bits)
    return int(target.bits_per_param * n_params - sens.other_bits - 16 * sens.fp16_params)


def choose(sens, target: AllocTarget, n_params: int) -> tuple[dict[str, str], Allocation]:
    """group -> codec label (base or a candidate) within the target, and the allocation."""
    labels = [sens.base, *sens.candidates]
    cost = "zbits" if target.bytes is not None else "bits"
    bits = [[getattr(g, cost)[lab] for lab in labels] for g in sens.groups]
    loss = [[0.0] + [sens.delta_kld[g.group][lab] for lab in sens.candidates] for g in sens.groups]
    budget = budget_bits(target, sens, n_params)
    a = allocate(bits, loss, budget)
    if a is None:
        cheapest = sum(min(b) for b in bits)
        raise ValueError(f"allocate.target: even the cheapest codecs need {cheapest} bits, over the budget {budget}")
    return {g.group: labels[o] for g, o in zip(sens.groups, a.choice)}, a
