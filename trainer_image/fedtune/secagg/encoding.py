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
        block = min(flat.size, ENCODE_BLOCK)
        floats, words, flags = np.empty((2, block)), np.empty((2, block), np.uint64), np.empty(block, bool)
        for start in range(0, flat.size, ENCODE_BLOCK):
            stop = min(flat.size, start + ENCODE_BLOCK)
            k = stop - start
            if self.limbs == 1:
                self._encode_64(flat[start:stop], out[:, start:stop], floats[0, :k])
            else:
                self._encode_128(flat[start:stop], out[:, start:stop], floats[:, :k], words[:, :k], flags[:k])
        return out

    @staticmethod
    def _encode_64(values: np.ndarray, out: np.ndarray, scaled: np.ndarray) -> None:
        # Scaling by a power of two is exact in float64 for float32 and float64 inputs; the C cast to
        # int64 truncates toward zero, and its two's complement bits are the value mod 2^64.
        np.multiply(values, 2.0**32, out=scaled)
        np.copyto(out[0].view(np.int64), scaled, casting="unsafe")

    @staticmethod
    def _encode_128(
        values: np.ndarray, out: np.ndarray, floats: np.ndarray, words: np.ndarray, flags: np.ndarray
    ) -> None:
        # |x|·2^64 splits exactly into floor(|x|) (high limb) and frac(|x|)·2^64 (low limb): for a
        # non-negative float both parts keep a subset of its mantissa bits. Flooring the low part
        # truncates |x|·2^64; negating in two's complement then gives trunc(x·2^64).
        magnitude, high = floats
        np.abs(values, out=magnitude)
        np.floor(magnitude, out=high)
        np.subtract(magnitude, high, out=magnitude)
        magnitude *= 2.0**64
        np.floor(magnitude, out=magnitude)
        lo, hi = out
        np.copyto(hi, high, casting="unsafe")
        np.copyto(lo, magnitude, casting="unsafe")
        # Branch-free conditional negation: -v = (v XOR all-ones) + 1, the +1 carrying into the high limb.
        negative, flip = words
        np.signbit(values, out=flags)
        np.copyto(negative, flags)
        np.negative(negative, out=flip)  # all ones where negative, else 0
        np.bitwise_xor(lo, flip, out=lo)
        np.add(lo, negative, out=lo)
        np.less(lo, negative, out=flags)  # the +1 wrapped the low limb
        np.bitwise_xor(hi, flip, out=hi)
        np.add(hi, flags, out=hi)

    # --- decode --------------------------------------------------------------------------

    def decode(self, encoded: np.ndarray, contributions: int, where: str) -> np.ndarray:
        """float32 values of an (limbs, n) sum of `contributions` encodings."""
        if self.limbs == 1:
            values = encoded[0].view(np.int64).astype(np.float64) * self.resolution
        else:
            values = self._decode_128(encoded)
        bound = contributions * self.limit
        if values.size and float(np.abs(values).max()) > bound:
            raise SecAggError(
                f"{where}: the sum of {contributions} contributions decodes beyond ±{bound:g}, which no honest "
                "sum reaches: the masks did not cancel (a label_trainer's update is missing, or one was "
                "masked for another job, round or set of peers)"
            )
        return values.astype(np.float32)

    @staticmethod
    def _decode_128(encoded: np.ndarray) -> np.ndarray:
        # Convert the magnitude and then apply the sign: hi + lo·2^-64 computed on the two's complement
        # limbs of a small negative value would cancel (-1 + 0.999...) and lose its low bits.
        lo, hi = encoded
        negative = hi >> np.uint64(63)
        flip = np.negative(negative)
        magnitude_lo = np.bitwise_xor(lo, flip)
        magnitude_lo += negative
        carry = np.less(magnitude_lo, negative)
        magnitude_hi = np.bitwise_xor(hi, flip)
        magnitude_hi += carry
        values = magnitude_hi.astype(np.float64)
        values += magnitude_lo.astype(np.float64) * 2.0**-64
        values *= 1.0 - 2.0 * negative
        return values
