"""Small-cell protection of published counts: the audit's groups and the report's count tables.

Primary suppression hides the counts of small groups (at most k patients). Alone it does not
protect them: the audit and the report also publish totals and other groups, so a hidden count
can follow by arithmetic (the whole test set minus the other groups; a marginal group minus the
other cells of an intersection; a site minus its other scanners, when scanners nest in sites;
or a combination of several such sums). `protect` treats every published sum as a linear
equation, finds the hidden counts the shown ones determine (a hidden cell is determined when it
is constant over the solution space of the equations, i.e. its unit vector lies in the row space
of the equations' matrix), and withholds further counts until none is determined: complementary suppression, as
statistical agencies apply it to tables of counts. Neither fairlearn nor scikit-learn has this.

It protects counts against exact recovery from sums. Rates shown for a group whose count is
withheld (TPR = TP / positives, ...) can still narrow that count; groups of at most k patients
show no rate at all.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

#: A sum relation: a total (None when it is public anyway, like the whole test set) and its parts.
Relation = tuple[Hashable | None, Sequence[Hashable]]

WITHHELD_NOTE = "counts withheld: with them a suppressed group's size would follow by subtraction"


def protect(sizes: Mapping[Hashable, float], hidden: Iterable[Hashable], relations: Sequence[Relation]) -> set[Hashable]:
    """Withhold more cells until no hidden cell's count follows from the shown ones.

    Each step withholds one shown cell that shares a relation with a determined hidden cell: the
    smallest (ties by key text) whose withholding leaves that cell undetermined, else the smallest,
    so little is lost. The set only grows, so this ends.

    Args:
        sizes: cell -> its count (the smallest shown cell is withheld next).
        hidden: the cells hidden by primary suppression.
        relations: (total, parts) pairs: total = sum of parts; total None when it is public.

    Returns:
        Every cell to hide: the primary ones and those withheld to protect them.

    Example:
        >>> sorted(protect({"F": 40, "M": 7, "X": 12}, {"M"}, [(None, ["F", "M", "X"])]))
        ['M', 'X']
    """
    out = set(hidden)
    while True:
        exposed = determined(out, relations)
        if not exposed:
            return out
        cell = min(exposed, key=str)
        touching = [r for r in relations if cell == r[0] or cell in r[1]]
        shown = {m for total, parts in touching for m in [total, *parts] if m is not None and m not in out}
        if not shown:  # determined through other relations only: widen to every relation of a hidden cell
            shown = {m for total, parts in relations for m in [total, *parts]
                     if m is not None and m not in out and ({total, *parts} & out)}
        ordered = sorted(shown, key=lambda m: (sizes.get(m, float("inf")), str(m)))
        if not ordered:  # every cell it relates to is hidden already: only a public total fixes it
            return out
        # The smallest cell that un-fixes this one; failing that, the smallest (the loop goes on).
        out.add(next((m for m in ordered if cell not in determined(out | {m}, relations)), ordered[0]))


def determined(hidden: set[Hashable], relations: Sequence[Relation]) -> set[Hashable]:
    """The hidden cells whose counts the shown cells and the relations fix exactly.

    The relations restricted to the hidden cells form a linear system A x = b (the shown cells
    move to b); a hidden cell is fixed when its component is the same for every solution, i.e.
    its unit vector lies in the row space of A. (Non-negativity can narrow counts further; a cell
    that can only be 0 is harmless.)
    """
    cells = sorted(hidden, key=str)
    index = {c: i for i, c in enumerate(cells)}
    rows = []
    for total, parts in relations:
        row = np.zeros(len(cells))
        for part in parts:
            if part in index:
                row[index[part]] += 1.0
        if total is not None and total in index:
            row[index[total]] -= 1.0
        if row.any():
            rows.append(row)
    if not rows:
        return set()
    _, singular, vt = np.linalg.svd(np.array(rows), full_matrices=False)
    basis = vt[singular > 1e-9 * max(1.0, singular.max(initial=0.0))]  # orthonormal basis of the row space
    # Cell i is fixed when e_i lies in the row space: its projection there, sum_j basis[j, i]^2, is 1.
    fixed = (basis**2).sum(axis=0) > 1.0 - 1e-9
    return {c for c, f in zip(cells, fixed, strict=True) if f}


def nesting_relations(labels: Mapping[str, np.ndarray], cell) -> list[Relation]:
    """Sum relations between attributes that nest (every group of one lies inside one group of the other).

    Scanners nest within sites (a scanner belongs to one site), so a site's count is the sum of its
    scanners'. Two attributes that split the rows the same way give one relation per group.

    Args:
        labels: attribute -> group label per row (the same rows for every attribute).
        cell: maps (attribute, group) to the cell key used in the relations.

    Returns:
        One relation (outer group, its inner groups) per group of every nesting attribute pair.
    """
    out: list[Relation] = []
    names = list(labels)
    for inner in names:
        for outer in names:
            if inner == outer:
                continue
            pairs = {(str(a), str(b)) for a, b in zip(labels[inner], labels[outer], strict=True)}
            parent: dict[str, str] = {}
            if any(parent.setdefault(a, b) != b for a, b in sorted(pairs)):
                continue  # an inner group spans two outer groups: no sum relation
            for b in sorted(set(parent.values())):
                out.append((cell(outer, b), [cell(inner, a) for a in sorted(parent) if parent[a] == b]))
    return out


def audit_suppression(
    specs: Sequence[tuple[str, np.ndarray]], patient: np.ndarray, k: int
) -> dict[str, dict[str, str]]:
    """Which audit groups to suppress (at most k patients) and whose counts to withhold.

    Relations published by audit.json: the whole audited split = the groups of each attribute;
    an intersection "a&b"'s cells sum to the groups of "a" and of "b" (when both are audited);
    nested attributes (scanner within site) sum to their outer groups.

    Args:
        specs: (attribute, group label per audited row), as from `attribute_specs`.
        patient: patient code per audited row.
        k: groups with at most k patients are suppressed.

    Returns:
        attribute -> {group: note}: "suppressed, n <= k" / "suppressed, patients <= k" for
        suppressed groups (no numbers at all), WITHHELD_NOTE for groups that keep their
        metrics but not their counts.
    """
    labels = {a: np.asarray([str(v) for v in g], dtype=object) for a, g in specs}
    canonical, sizes, primary = _audit_cells(labels, patient, k)

    def cell(attribute: str, group: str) -> bytes:
        return canonical[(attribute, group)]

    # The whole audited set is public, unless it is itself small (then the audit suppresses it too).
    whole = b"*whole*"
    sizes[whole] = int(np.unique(patient).size)
    if sizes[whole] <= k:
        primary[whole] = f"suppressed, patients <= {k}"
    hidden = protect(sizes, primary, _audit_relations(labels, cell, whole if whole in primary else None))
    out: dict[str, dict[str, str]] = {}
    for (attribute, group), key in canonical.items():
        if key in hidden:
            out.setdefault(attribute, {})[group] = primary.get(key, WITHHELD_NOTE)
    return out


def _audit_cells(
    labels: Mapping[str, np.ndarray], patient: np.ndarray, k: int
) -> tuple[dict[tuple[str, str], bytes], dict[bytes, int], dict[bytes, str]]:
    """Every group's cell key, the cells' patient counts, and the notes of the cells suppressed (<= k patients).

    One cell per distinct set of rows: an intersection cell that equals a group (site&scanner
    "S1&X" is scanner "X" when scanners nest in sites) is the same count, shown or hidden together.
    """
    canonical: dict[tuple[str, str], bytes] = {}
    sizes: dict[bytes, int] = {}
    primary: dict[bytes, str] = {}
    for attribute, groups in labels.items():
        for group in sorted(set(groups)):
            rows = np.flatnonzero(groups == group)
            key = canonical[(attribute, group)] = rows.tobytes()
            n_patients = int(np.unique(patient[rows]).size)
            sizes[key] = n_patients
            if n_patients <= k:  # patients <= images, so this also covers n <= k
                primary[key] = f"suppressed, n <= {k}" if rows.size <= k else f"suppressed, patients <= {k}"
    return canonical, sizes, primary


def _audit_relations(labels: Mapping[str, np.ndarray], cell, total: Hashable | None) -> list[Relation]:
    """The sums audit.json publishes: each attribute's groups make the whole set (`total`, None when
    public), an intersection's cells make the groups of both sides, nested attributes their outer groups."""
    relations: list[Relation] = [(total, [cell(a, g) for g in sorted(set(groups))]) for a, groups in labels.items()]
    for attribute, joined in labels.items():
        sides = attribute.split("&")
        if len(sides) != 2 or not all(s in labels for s in sides):
            continue
        for side in sides:
            for value in sorted(set(labels[side])):
                cells = sorted(set(joined[labels[side] == value]))
                relations.append((cell(side, value), [cell(attribute, c) for c in cells]))
    singles = {a: g for a, g in labels.items() if "&" not in a}
    relations += nesting_relations(singles, cell)
    return [(t, ps) for t, ps in relations if [t] != list(ps)]  # a group equal to its one part says nothing
