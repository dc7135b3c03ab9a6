"""Arithmetic modulo 2^64 and 2^128 on numpy arrays.

A value mod 2^(64·L) is L uint64 limbs, least significant first, stored as an (L, n) array so
each limb is contiguous. numpy's uint64 add/subtract wrap modulo 2^64; the 128-bit case adds
the carry (or borrow) out of the low limb into the high one.
"""

from __future__ import annotations

import numpy as np


def add_into(acc: np.ndarray, x: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """acc += x (mod 2^(64·L)); `scratch`, a bool array of acc's width, avoids an allocation."""
    np.add(acc[0], x[0], out=acc[0])
    if acc.shape[0] == 2:
        carry = np.less(acc[0], x[0], out=scratch)  # the low limb wrapped iff the sum is below an addend
        np.add(acc[1], x[1], out=acc[1])
        np.add(acc[1], carry, out=acc[1])


def sub_into(acc: np.ndarray, x: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """acc -= x (mod 2^(64·L))."""
    if acc.shape[0] == 2:
        borrow = np.less(acc[0], x[0], out=scratch)
        np.subtract(acc[1], x[1], out=acc[1])
        np.subtract(acc[1], borrow, out=acc[1])
    np.subtract(acc[0], x[0], out=acc[0])
