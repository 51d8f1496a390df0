"""Small-cell suppression of the audit's groups and the report's count tables.

Primary suppression hides groups of at most k patients. Alone it does not protect them: the
audit also shows the whole test set and every other group, so a hidden group's counts follow by
subtraction (the whole set minus the other groups, or a marginal group minus the other cells of
an intersection). Complementary suppression, as statistical agencies apply it to tables of
counts, hides further cells until no sum relation (total = sum of its parts) has exactly one
hidden member. Neither fairlearn nor scikit-learn has this; it is a few lines on plain counts.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

#: A sum relation: a total (None when it is always shown, like the whole test set) and its parts.
Relation = tuple[Hashable | None, Sequence[Hashable]]

COMPLEMENTARY_NOTE = "suppressed (complementary: it would reveal a suppressed group by subtraction)"


def complementary_suppression(
    sizes: Mapping[Hashable, float], hidden: Iterable[Hashable], relations: Sequence[Relation]
) -> set[Hashable]:
    """Grow the hidden cells until no relation has exactly one hidden member.

    Each step hides the smallest shown part of a relation with one hidden member (ties by key
    text), so as little as possible is lost; the set only grows, so this ends.

    Args:
        sizes: cell -> its count (the smallest shown part is hidden next).
        hidden: the cells hidden by primary suppression.
        relations: (total, parts) pairs; total None when it is always shown.

    Returns:
        Every hidden cell, primary and complementary.

    Example:
        >>> sorted(complementary_suppression({"F": 40, "M": 7, "X": 12}, {"M"}, [(None, ["F", "M", "X"])]))
        ['M', 'X']
    """
    out = set(hidden)
    changed = True
    while changed:
        changed = False
        for total, parts in relations:
            members = ([total] if total is not None else []) + list(parts)
            if sum(m in out for m in members) != 1:
                continue
            shown = [p for p in parts if p not in out]
            if shown:
                out.add(min(shown, key=lambda p: (sizes[p], str(p))))
                changed = True
    return out


def audit_suppression(
    specs: Sequence[tuple[str, np.ndarray]], patient: np.ndarray, k: int
) -> dict[str, dict[str, str]]:
    """Which audit groups to suppress, with the note audit.json gives for each.

    Args:
        specs: (attribute, group label per audited row), as from `attribute_specs`; an
            intersection "a&b" is related to the groups of "a" and "b" when both are audited.
        patient: patient code per audited row.
        k: groups with at most k patients are suppressed (primary).

    Returns:
        attribute -> {group: note} ("suppressed, n <= k", "suppressed, patients <= k" or
        COMPLEMENTARY_NOTE).
    """
    labels = dict(specs)
    sizes: dict[tuple[str, str], int] = {}
    primary: dict[tuple[str, str], str] = {}
    for attribute, groups in specs:
        for group in np.unique(groups.astype(str)):
            rows = groups == group
            n, n_patients = int(rows.sum()), int(np.unique(patient[rows]).size)
            sizes[(attribute, group)] = n_patients
            if n_patients <= k:  # patients <= images, so this also covers n <= k
                primary[(attribute, group)] = f"suppressed, n <= {k}" if n <= k else f"suppressed, patients <= {k}"
    relations: list[Relation] = [(None, [(a, str(g)) for g in np.unique(groups.astype(str))]) for a, groups in specs]
    for attribute, joined in specs:
        sides = attribute.split("&")
        if len(sides) != 2 or not all(s in labels for s in sides):
            continue
        for side in sides:
            for value in np.unique(labels[side].astype(str)):
                cells = np.unique(joined[labels[side] == value].astype(str))
                relations.append(((side, str(value)), [(attribute, str(c)) for c in cells]))
    hidden = complementary_suppression(sizes, primary, relations)
    out: dict[str, dict[str, str]] = {}
    for attribute, group in hidden:
        out.setdefault(attribute, {})[group] = primary.get((attribute, group), COMPLEMENTARY_NOTE)
    return out


def count_table_suppression(
    columns: Mapping[str, Mapping[str, int]], k_min: int, totals: Mapping[str, int] | None = None
) -> set[tuple[str, str]]:
    """Cells (column, row) of a count table to show as "< k_min", primary and complementary.

    Args:
        columns: column (e.g. a split) -> row value (e.g. a site code) -> count; each column's
            total is taken to be shown.
        k_min: counts from 1 to k_min - 1 are hidden (primary).
        totals: row value -> its total over the columns, when that is shown too (e.g. studies per
            site in the data section).

    Returns:
        The hidden (column, row) cells; a row's total is hidden when ("*", row) is in the set.
    """
    sizes = {(c, r): n for c, rows in columns.items() for r, n in rows.items()}
    relations: list[Relation] = [(None, [(c, r) for r in rows]) for c, rows in columns.items()]
    if totals is not None:
        sizes.update({("*", r): n for r, n in totals.items()})
        relations.append((None, [("*", r) for r in totals]))
        for r in totals:
            relations.append((("*", r), [(c, r) for c in columns if r in columns[c]]))
    hidden = {cell for cell, n in sizes.items() if 0 < n < k_min}
    return complementary_suppression(sizes, hidden, relations)
