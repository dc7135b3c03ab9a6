"""Fixed-point encoding of float updates into the ring Z/2^b (b = 64 or 128).

A weight x becomes trunc(x · 2^(b/2)) mod 2^b (scale 2^32 for 64 bits, 2^64 for 128 bits), as
in the reference. Negative values wrap to the top half of the ring, so the modular sum of
encodings is the encoding of the sum as long as the true sum stays within (-2^(b-1), 2^(b-1)).

To guarantee that without knowing the other parties' values, every contribution must satisfy
|x| < 2^(b/2 - 1 - HEADROOM_BITS) and at most 2^HEADROOM_BITS contributions are summed: with
HEADROOM_BITS = 16 that is |x| < 2^15 = 32768 for 64 bits and |x| < 2^47 for 128 bits. A value
outside is an error, never a silent wrap. (Updates weighted by normalised weights, as the
runtime sends them, are far inside.)

Precision: truncation loses less than 2^-(b/2) per weight and party, so a sum of n contributions
is within n · 2^-32 (64 bits) or n · 2^-64 (128 bits) of the exact sum, before the final
rounding to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import SecAggError

HEADROOM_BITS = 16
MAX_CONTRIBUTIONS = 1 << HEADROOM_BITS
ENCODE_BLOCK = 1 << 14  # elements per block: a few float64/uint64 scratch arrays stay in L2


class _Scratch:
    """Reusable block-sized temporaries for encoding."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._f = np.empty((2, size), dtype=np.float64)
        self._u = np.empty((2, size), dtype=np.uint64)
        self._b = np.empty(size, dtype=bool)

    def sized(self, n: int) -> _Scratch:
        if n == self.size:
            return self
        view = object.__new__(_Scratch)
        view.size, view._f, view._u, view._b = n, self._f[:, :n], self._u[:, :n], self._b[:n]
        return view

    f1 = property(lambda self: self._f[0])
    f2 = property(lambda self: self._f[1])
    u1 = property(lambda self: self._u[0])
    u2 = property(lambda self: self._u[1])
    b1 = property(lambda self: self._b)


@dataclass(frozen=True)
class FixedPoint:
    bits: int  # 64 or 128

    def __post_init__(self) -> None:
        if self.bits not in (64, 128):
            raise SecAggError(f"encryption.otp.key_bitlength: must be 64 or 128, not {self.bits}")

    @property
    def limbs(self) -> int:
        return self.bits // 64

    @property
    def scale(self) -> float:
        return 2.0 ** (self.bits // 2)

    @property
    def limit(self) -> float:
        """Contributions must satisfy |x| < limit."""
        return 2.0 ** (self.bits // 2 - 1 - HEADROOM_BITS)

    @property
    def resolution(self) -> float:
        """The largest truncation error per weight and contribution."""
        return 1.0 / self.scale

    # --- encode --------------------------------------------------------------------------

    def check_range(self, values: np.ndarray, where: str) -> None:
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())  # NaN propagates through min/max
        if -self.limit < low and high < self.limit:
            return
        if not (np.isfinite(low) and np.isfinite(high)):
            raise SecAggError(f"{where}: contains NaN or infinite values, which cannot be encoded")
        worst = high if abs(high) >= abs(low) else low
        hint = "weight updates with normalised weights" + (", or use key_bitlength 128" if self.bits == 64 else "")
        raise SecAggError(
            f"{where}: value {worst:g} is outside the encodable range (-{self.limit:g}, {self.limit:g}) of "
            f"{self.bits}-bit fixed point; {hint}"
        )

    def encode(self, values: np.ndarray, where: str) -> np.ndarray:
        """The (limbs, n) uint64 encoding of a float array (flattened in C order)."""
        flat = np.ascontiguousarray(values).reshape(-1)
        self.check_range(flat, where)
        out = np.empty((self.limbs, flat.size), dtype=np.uint64)
        # Work through cache-sized blocks with reused scratch: whole-tensor temporaries would make
        # this memory-bound (and page-fault-bound) rather than compute-bound.
        scratch = _Scratch(min(flat.size, ENCODE_BLOCK))
        encode_block = self._encode_64 if self.limbs == 1 else self._encode_128
        for start in range(0, flat.size, ENCODE_BLOCK):
            stop = min(flat.size, start + ENCODE_BLOCK)
            encode_block(flat[start:stop], out[:, start:stop], scratch.sized(stop - start))
        return out

    @staticmethod
    def _encode_64(values: np.ndarray, out: np.ndarray, s: _Scratch) -> None:
        # Scaling by a power of two is exact in float64 for float32 and float64 inputs; the C cast to
        # int64 truncates toward zero, and its two's complement bits are the value mod 2^64.
        np.multiply(values, 2.0**32, out=s.f1)
        np.copyto(out[0].view(np.int64), s.f1, casting="unsafe")

    @staticmethod
    def _encode_128(values: np.ndarray, out: np.ndarray, s: _Scratch) -> None:
        # |x|·2^64 splits exactly into floor(|x|) (high limb) and frac(|x|)·2^64 (low limb): for a
        # non-negative float both parts keep a subset of its mantissa bits. Flooring the low part
        # truncates |x|·2^64; negating in two's complement then gives trunc(x·2^64).
        magnitude, high = s.f1, s.f2
        np.abs(values, out=magnitude)
        np.floor(magnitude, out=high)
        np.subtract(magnitude, high, out=magnitude)
        magnitude *= 2.0**64
        np.floor(magnitude, out=magnitude)
        lo, hi = out[0], out[1]
        np.copyto(hi, high, casting="unsafe")
        np.copyto(lo, magnitude, casting="unsafe")
        # Branch-free conditional negation: -v = (v XOR all-ones) + 1, the +1 carrying into the high limb.
        negative, flip, carry = s.u1, s.u2, s.b1
        np.signbit(values, out=carry)
        np.copyto(negative, carry)
        np.negative(negative, out=flip)  # all ones where negative, else 0
        np.bitwise_xor(lo, flip, out=lo)
        np.add(lo, negative, out=lo)
        np.less(lo, negative, out=carry)  # the +1 wrapped the low limb
        np.bitwise_xor(hi, flip, out=hi)
        np.add(hi, carry, out=hi)

    # --- decode --------------------------------------------------------------------------

    def decode(self, encoded: np.ndarray, contributions: int, where: str) -> np.ndarray:
        """float32 values of an (limbs, n) sum of `contributions` encodings."""
        if self.limbs == 1:
            values = encoded[0].view(np.int64).astype(np.float64) * self.resolution
        else:
            # value = hi·2^64 + lo with hi signed; in units of 2^-64 that is hi + lo·2^-64.
            values = encoded[1].view(np.int64).astype(np.float64)
            values += encoded[0].astype(np.float64) * 2.0**-64
        bound = contributions * self.limit
        if values.size and float(np.abs(values).max()) > bound:
            raise SecAggError(
                f"{where}: the sum of {contributions} contributions decodes beyond ±{bound:g}, which no honest "
                "sum reaches: the masks did not cancel (a label_trainer's update is missing, or one was "
                "masked for another job, round or set of peers)"
            )
        return values.astype(np.float32)
