"""Find the slow node or link behind a slow cluster-wide all-reduce.

When the all-reduce across every node misses its busbw threshold, the same benchmark runs
on pairs of nodes. The pairs are the edges of a ring over the nodes in inventory order
(node i with node i+1, the last with the first), so every node sits in two pairs with two
different partners, whatever the cluster's size. Pairs that share no node run at the same
time: a ring needs two rounds (three when the number of nodes is odd), so isolation costs
three benchmark runs at most, not one per pair.

A pair is slow when it misses the busbw threshold and reaches less than half of the
best pair. Verdict: a node slow in every pair it is in is the culprit; a slow pair whose two nodes
are each fine elsewhere is a slow link. Two nodes make a single pair, which can only
name the link between them. When every pair is slow (three nodes or more), no single
node or link is to blame: the network as a whole, or the threshold, is.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dsk_provision.validation.results import CLUSTER, FAIL, SKIP, CheckResult

Pair = tuple[str, str]


def ring_pairs(names: list[str]) -> list[Pair]:
    if len(names) < 2:
        return []
    if len(names) == 2:
        return [(names[0], names[1])]
    return [(names[i], names[(i + 1) % len(names)]) for i in range(len(names))]


def rounds(pairs: list[Pair]) -> list[list[Pair]]:
    """Pairs grouped so that no node is in two pairs of one round (greedy, in order)."""
    out: list[list[Pair]] = []
    for pair in pairs:
        for group in out:
            if not any(set(pair) & set(other) for other in group):
                group.append(pair)
                break
        else:
            out.append([pair])
    return out


@dataclass
class Verdict:
    pairs: dict[Pair, float | None]           # busbw per pair (None: the run failed)
    slow: set[Pair] = field(default_factory=set)
    slow_nodes: list[str] = field(default_factory=list)
    slow_links: list[Pair] = field(default_factory=list)
    all_slow: bool = False

    def to_dict(self) -> dict:
        return {"pairs": [{"nodes": list(p), "busbw_gbs": v, "slow": p in self.slow}
                          for p, v in self.pairs.items()],
                "slow_nodes": list(self.slow_nodes),
                "slow_links": [list(p) for p in self.slow_links],
                "all_slow": self.all_slow}


# A pair is slow when it misses the threshold and also reaches less than this share of the
# best pair: pairs run with the cluster's (possibly small) sizes miss an absolute threshold
# by noise alone, while a throttled link is slower by orders of magnitude.
RELATIVE = 0.5


def judge(names: list[str], pairs: dict[Pair, float | None], minimum: float) -> Verdict:
    """Name the slow nodes and links from per-pair busbw (None: the run failed, slow)."""
    verdict = Verdict(pairs=dict(pairs))
    best = max((v for v in pairs.values() if v is not None), default=None)
    below = {p for p, v in pairs.items() if v is None or v < minimum}
    verdict.slow = {p for p in below
                    if pairs[p] is None or best is None or pairs[p] < RELATIVE * best}
    if below and (not verdict.slow or (len(names) > 2 and verdict.slow == set(pairs))):
        verdict.slow = below
        verdict.all_slow = len(names) > 2
        if verdict.all_slow:
            return verdict
    for name in names:
        mine = [p for p in pairs if name in p]
        if len(mine) >= 2 and all(p in verdict.slow for p in mine):
            verdict.slow_nodes.append(name)
    for pair in pairs:
        if pair in verdict.slow and not set(pair) & set(verdict.slow_nodes):
            verdict.slow_links.append(pair)
    return verdict


def isolate(names: list[str], measure: Callable[[Pair], float | None], minimum: float,
            *, parallel: bool = True) -> Verdict:
    """Run measure(pair) -> busbw for every ring pair, a round at a time; judge."""
    results: dict[Pair, float | None] = {}
    for group in rounds(ring_pairs(names)):
        if parallel and len(group) > 1:
            with ThreadPoolExecutor(max_workers=len(group)) as pool:
                values = list(pool.map(measure, group))
        else:
            values = [measure(p) for p in group]
        results.update(zip(group, values, strict=True))
    ordered = {p: results[p] for p in ring_pairs(names)}
    return judge(names, ordered, minimum)


def cordon_command(inventory_path: str, node: str, reason: str) -> str:
    """The command that takes ``node`` out of service until it is repaired."""
    return f"dsk-provision nodes cordon -i {inventory_path} {node} --reason {reason!r}"


def isolation_checks(verdict: Verdict, names: list[str], minimum: float | None,
                     inventory_path: str | None = None) -> list[CheckResult]:
    """The verdict as checks: a fail per slow node and per node of a slow link, or a
    cluster-wide skip saying why no single node is to blame. A node blamed alone gets the
    command that cordons it (with ``inventory_path``)."""
    out: list[CheckResult] = []

    def show(v):
        return "run failed" if v is None else f"{v:.4f} GB/s"

    for name in verdict.slow_nodes:
        mine = {p: v for p, v in verdict.pairs.items() if name in p}
        detail = ", ".join(f"with {p[1] if p[0] == name else p[0]}: {show(v)}"
                           for p, v in mine.items())
        worst = max((v for v in mine.values() if v is not None), default=None)
        out.append(CheckResult(
            name, "allreduce_isolation", FAIL, None if worst is None else round(worst, 4),
            minimum,
            f"slow in every pair it is in ({detail}): this node or its link is the culprit"
            + (f"; to leave it out until it is repaired: "
               f"{cordon_command(inventory_path, name, 'slow all-reduce')}"
               if inventory_path else "")))
    for a, b in verdict.slow_links:
        value = verdict.pairs[(a, b)]
        for name in (a, b):
            out.append(CheckResult(
                name, "allreduce_isolation", FAIL,
                None if value is None else round(value, 4), minimum,
                f"the link between {a} and {b} is slow ({show(value)}); "
                f"{name} is fine with other nodes" if len(names) > 2 else
                f"the pair {a}+{b} is slow ({show(value)}); two nodes cannot tell which "
                f"is to blame"))
    if verdict.all_slow:
        out.append(CheckResult(
            CLUSTER, "allreduce_isolation", SKIP, None, minimum,
            "every pair of nodes is slow too: the network as a whole (or the threshold) is "
            "at fault, not one node"))
    elif not verdict.slow_nodes and not verdict.slow_links:
        out.append(CheckResult(
            CLUSTER, "allreduce_isolation", SKIP, None, minimum,
            "every pair of nodes is fast enough: the slowness needs more nodes at once"))
    return out
