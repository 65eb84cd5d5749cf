"""Seeded, nested, stratified subsets of a task's training examples (`task.train_examples`).

A label curve trains on 100, 300, 1,000 ... of the same examples: each smaller subset must lie
inside every larger one (so a curve measures more labels, not other labels), and each must keep
the classes' shares of the whole (so 100 reviews are not all one label by chance). Both come from
one order of the examples: the subset of n is its first n.

The order: each class's examples are shuffled (seeded), and the j-th of class c's m_c examples is
due at the fraction (j + 1/2) / m_c of the order; sorting by that fraction interleaves the classes
so that every prefix holds each class within one example of its share. Examples without a class
(sft, token classification) are shuffled alone.
"""

from __future__ import annotations

import numpy as np

from lmforge.pretrain.core.errors import ConfigurationError


def example_order(classes: list | None, n: int, seed: int) -> np.ndarray:
    """The order of ``n`` examples whose subsets are their prefixes: stratified by ``classes``
    (one hashable per example), or a seeded shuffle when ``classes`` is None."""
    rng = np.random.default_rng(seed)
    if classes is None:
        return rng.permutation(n)
    if len(classes) != n:
        raise ValueError(f"{len(classes)} classes for {n} examples")
    names = sorted({str(c) for c in classes})
    index = np.array([names.index(str(c)) for c in classes], dtype=np.int64)
    due = np.empty(n, dtype=np.float64)
    for k in range(len(names)):
        members = rng.permutation(np.flatnonzero(index == k))
        due[members] = (np.arange(len(members)) + 0.5) / len(members)
    # ties (classes of equal size) go to the class named first: the order is a pure function of
    # the classes and the seed
    return np.lexsort((index, due))


def subset(classes: list | None, n: int, *, size: int, seed: int, what: str) -> np.ndarray:
    """The positions (sorted) of the stratified, seeded subset of ``size`` of ``n`` examples;
    ``what`` names the setting in errors. Refused in one line: a size above ``n``, or a class
    that would get fewer than 2 examples (it could be neither learned nor told apart from
    chance)."""
    if size < 1:
        raise ConfigurationError(f"{what}={size}: give at least 1 example")
    if size > n:
        raise ConfigurationError(
            f"{what}={size} is more than the {n:,} training examples; give at most {n:,} (or all)"
        )
    order = example_order(classes, n, seed)
    if classes is not None:
        chosen = [str(classes[i]) for i in order[:size]]
        counts = {c: chosen.count(c) for c in sorted({str(c) for c in classes})}
        scarce = {c: k for c, k in counts.items() if k < 2}
        if scarce:
            label, k = next(iter(scarce.items()))
            need = smallest_stratified(classes, order)
            if need > n:
                raise ConfigurationError(
                    f"{what}={size}: label {label!r} has fewer than 2 examples in all {n:,}; a "
                    "stratified subset needs at least 2 of every label (add examples or drop "
                    "the label)"
                )
            raise ConfigurationError(
                f"{what}={size} gives label {label!r} {k} example(s) (stratified by the labels' "
                f"shares of the {n:,}); every label needs at least 2: give at least {need:,} "
                "examples"
            )
    return np.sort(order[:size])


def smallest_stratified(classes: list, order: np.ndarray) -> int:
    """The smallest prefix of ``order`` holding at least 2 examples of every class."""
    need = {str(c): 2 for c in classes}
    for position, i in enumerate(order, start=1):
        c = str(classes[i])
        if need.get(c, 0) > 0:
            need[c] -= 1
            if not any(need.values()):
                return position
    return len(order) + 1  # some class has fewer than 2 examples at all
