"""KV caches owned by the server: one per inference session, allocated up front for the
session's max_length, accounted against a byte budget. Keys and values are kept in the
serving dtype, or as int8 with scales (serve.cache.kv_dtype: int8; swarmd/runtime/kvint8.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from libswarm.errors import CacheFullError, LimitError, SessionError
from swarmd.runtime.kvint8 import SCALE_DTYPE, Int8KV, Kernels


class SessionCache:
    """Keys/values of blocks [first, last) for `batch` sequences of up to `max_length` positions."""

    def __init__(self, *, first: int, last: int, batch: int, max_length: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, kv_int8: bool = False, kernels: Kernels | None = None):
        self.first, self.last = first, last
        self.batch, self.max_length = batch, max_length
        self.length = 0
        shape = (batch, kv_heads, max_length, head_dim)
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | Int8KV]
        if kv_int8:
            self.kv = [Int8KV(shape, dtype, device, kernels) for _ in range(last - first)]
        else:
            self.kv = [(torch.zeros(shape, dtype=dtype, device=device),
                        torch.zeros(shape, dtype=dtype, device=device)) for _ in range(last - first)]
        self._positions = torch.zeros(batch, max_length, dtype=torch.long, device=device)
        self._mask = torch.ones(batch, max_length, dtype=torch.bool, device=device)
        self.padded = False  # whether any cached slot is padding (then masks are needed)
        self._pending_pad = False  # whether the step being run brings padding
        self.nbytes = sum(kv.nbytes if isinstance(kv, Int8KV) else kv[0].numel() * kv[0].element_size() * 2
                          for kv in self.kv)

    @staticmethod
    def bytes_needed(*, blocks: int, batch: int, max_length: int, kv_heads: int, head_dim: int,
                     dtype: torch.dtype, kv_int8: bool = False) -> int:
        """Exactly what the cache of such a session allocates (its `nbytes`)."""
        values = 2 * blocks * batch * kv_heads * max_length * head_dim
        if kv_int8:
            return values + SCALE_DTYPE.itemsize * (values // head_dim)  # int8 values, a scale per vector
        return values * dtype.itemsize

    def layer(self, block: int) -> tuple[torch.Tensor, torch.Tensor] | Int8KV:
        return self.kv[block - self.first]

    def check_step(self, batch: int, length: int) -> None:
        if batch != self.batch:
            raise SessionError(f"step has batch {batch} but the session was opened with batch {self.batch}")
        if self.length + length > self.max_length:
            raise LimitError(
                f"step of {length} positions at position {self.length} passes the session's "
                f"max_length {self.max_length}"
            )

    def record(self, position_ids: torch.Tensor, key_mask: torch.Tensor | None) -> None:
        """Note the new positions' ids and padding; `advance` commits them after the blocks ran."""
        s, e = self.length, self.length + position_ids.shape[1]
        self._positions[:, s:e] = position_ids
        if key_mask is None:
            self._mask[:, s:e] = True
            self._pending_pad = False
        else:
            self._mask[:, s:e] = key_mask
            self._pending_pad = not bool(key_mask.all())

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on (they are overwritten by the next step)."""
        if not 0 <= length <= self.length:
            raise SessionError(f"cannot cut the session back to position {length}: it holds {self.length}")
        self.length = length

    def reorder(self, order: torch.Tensor) -> None:
        """Beam search: row i continues the sequence cached as row order[i] (rows may repeat)."""
        n = self.length
        index = order.to(self._positions.device)
        for kv in self.kv:
            if isinstance(kv, Int8KV):
                kv.reorder(index, n)
                continue
            k, v = kv
            k[:, :, :n] = k[index, :, :n]
            v[:, :, :n] = v[index, :, :n]
        self._positions[:, :n] = self._positions[index, :n]
        self._mask[:, :n] = self._mask[index, :n]

    def advance(self, length: int) -> None:
        self.padded = self.padded or self._pending_pad
        self._pending_pad = False
        self.length += length

    def mark(self) -> tuple[int, bool]:
        """Where the cache stands: `rewind` goes back there."""
        return self.length, self.padded

    def rewind(self, mark: tuple[int, bool]) -> None:
        """Back to `mark`, forgetting what was advanced since (a batch that failed after its
        caches advanced is run again one step at a time, each from where it was)."""
        self.length, self.padded = mark
        self._pending_pad = False

    def key_positions(self, end: int) -> torch.Tensor:
        return self._positions[:, :end]

    def slot_mask(self) -> torch.Tensor:
        """bool [batch, max_length]: False where a written slot is padding (for static-shape
        steps, which mask the slots not written yet by position)."""
        return self._mask

    def key_mask(self, end: int) -> torch.Tensor | None:
        if self.padded or self._pending_pad:
            return self._mask[:, :end]
        return None


class CacheBudget:
    """Bytes of KV cache this server may hand out; thread-safe. What it holds that can be given
    up (training passes' kept activations) is given back through `reclaim` when a reservation
    would not fit otherwise: sessions come first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.reclaim: Callable[[int], None] | None = None  # frees at least the bytes asked, if it can
        self._lock = threading.Lock()

    @property
    def free_bytes(self) -> int:
        return self.max_bytes - self.used_bytes

    def reserve(self, nbytes: int, reclaim: bool = True) -> None:
        if not self._take(nbytes):
            if reclaim and self.reclaim is not None:
                self.reclaim(nbytes - self.free_bytes)  # outside the lock: it releases what it frees
                if self._take(nbytes):
                    return
            raise CacheFullError(
                f"session needs {nbytes} bytes of KV cache but only {self.free_bytes} of "
                f"{self.max_bytes} are free; use a smaller max_length or batch, or another server"
            )

    def _take(self, nbytes: int) -> bool:
        with self._lock:
            if nbytes > self.max_bytes - self.used_bytes:
                return False
            self.used_bytes += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used_bytes = max(0, self.used_bytes - nbytes)
