"""Many (query, document) pairs scored together: grouped by query so each shared part runs once."""

from __future__ import annotations

from collections.abc import Sequence


def group_by_query(queries: Sequence[str]) -> list[list[int]]:
    """Indices of ``queries`` grouped by equal query text, groups in order of first appearance.

    Within a group indices keep their input order. Every index appears exactly once.
    """
    groups: dict[str, list[int]] = {}
    for i, query in enumerate(queries):
        groups.setdefault(query, []).append(i)
    return list(groups.values())
