"""A random stream that replays MRtrix3's tractography RNG.

Convention (spec §8.1; ``core/math/rng.h``): tckgen with ``-nthreads 0`` seeds one
``std::mt19937`` with ``MRTRIX_RNG_SEED``; numpy's ``MT19937`` with legacy seeding produces the
same 32-bit stream. Floats are libstdc++'s ``generate_canonical<float>`` (one draw / 2^32,
1.0 mapped to the largest float below 1); integers use GCC's nearly-divisionless method.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MRtrixRNG"]

_TWO32 = float(2**32)
_BELOW_ONE = np.float32(1.0) - np.float32(2.0**-24)


class MRtrixRNG:
    """``std::mt19937(seed)`` as tckgen uses it (single-threaded)."""

    def __init__(self, seed: int, block: int = 1 << 16) -> None:
        self._bg = np.random.MT19937()
        self._bg._legacy_seeding(int(seed))
        self._block = block
        self._buf = np.zeros(0, dtype=np.uint64)
        self._i = 0

    def raw(self) -> int:
        """The next 32-bit output."""
        if self._i >= self._buf.shape[0]:
            self._buf = self._bg.random_raw(self._block)
            self._i = 0
        v = int(self._buf[self._i])
        self._i += 1
        return v

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs as ``uint64`` (the same values ``n`` calls of
        :meth:`raw` return, consuming exactly ``n``)."""
        parts = []
        while n > 0:
            if self._i >= self._buf.shape[0]:
                self._buf = self._bg.random_raw(self._block)
                self._i = 0
            m = min(n, self._buf.shape[0] - self._i)
            parts.append(self._buf[self._i : self._i + m])
            self._i += m
            n -= m
        return np.concatenate(parts) if parts else np.zeros(0, np.uint64)

    def peek(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs as ``uint64``, without consuming them (see
        :meth:`skip`): for compiled samplers that consume a data-dependent number."""
        avail = self._buf.shape[0] - self._i
        if avail < n:
            extra = self._bg.random_raw(max(self._block, n - avail))
            self._buf = np.concatenate([self._buf[self._i :], extra])
            self._i = 0
        return self._buf[self._i : self._i + n]

    def skip(self, k: int) -> None:
        """Consume ``k`` outputs already returned by :meth:`peek`."""
        if not 0 <= k <= self._buf.shape[0] - self._i:
            raise ValueError(f"cannot skip {k} outputs")
        self._i += k

    def uniform(self) -> np.float32:
        """Uniform float32 in [0, 1) (``uniform_real_distribution<float>``)."""
        u = np.float32(np.float32(self.raw()) / np.float32(_TWO32))
        return _BELOW_ONE if u >= 1.0 else u

    def randint(self, n: int) -> int:
        """Uniform integer in [0, n-1] (``uniform_int_distribution<int>``, GCC 12)."""
        product = self.raw() * n
        low = product & 0xFFFFFFFF
        if low < n:
            threshold = (2**32 - n) % n
            while low < threshold:
                product = self.raw() * n
                low = product & 0xFFFFFFFF
        return product >> 32

    def direction(self) -> np.ndarray:
        """A random direction as ``MethodBase::random_direction`` draws it (not normalised)."""
        one, two = np.float32(1.0), np.float32(2.0)
        while True:
            d = np.array(
                [
                    two * self.uniform() - one,
                    two * self.uniform() - one,
                    two * self.uniform() - one,
                ],
                dtype=np.float32,
            )
            n2 = d[0] * d[0] + (d[1] * d[1] + d[2] * d[2])
            if n2 <= 1.0:
                return d

    def directions(self, k: int) -> np.ndarray:
        """``[k, 3]`` float32: exactly what ``k`` successive :meth:`direction` calls return,
        drawn in bulk (each trial takes three uniforms; rejected trials are skipped)."""
        out = np.zeros((0, 3), np.float32)
        one, two = np.float32(1.0), np.float32(2.0)
        while out.shape[0] < k:
            need = k - out.shape[0]
            # ``need`` trials accept at most ``need`` directions, so nothing is over-drawn
            u = self.take(3 * need).astype(np.float32) / np.float32(_TWO32)
            u[u >= one] = _BELOW_ONE
            d = (two * u - one).reshape(need, 3)
            n2 = d[:, 0] * d[:, 0] + (d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])
            out = np.concatenate([out, d[n2 <= one]])
        return out
