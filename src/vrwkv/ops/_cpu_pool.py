"""A thread pool per process for the fused CPU kernels where PyTorch's OpenMP team is not found."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor


class ProcessThreadPool:
    """``get(size)``: a ``ThreadPoolExecutor`` of ``size`` threads, made again in a forked child (e.g. a DataLoader
    worker: a fork copies the pool object but not its threads) or for another size."""

    def __init__(self, name: str):
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._key: tuple[int, int] = (0, 0)  # (process id, size)
        self._lock = threading.Lock()

    def get(self, size: int) -> ThreadPoolExecutor:
        with self._lock:
            key = (os.getpid(), size)
            if self._pool is None or self._key != key:
                if self._pool is not None and self._key[0] == key[0]:
                    self._pool.shutdown(wait=False)
                self._pool, self._key = ThreadPoolExecutor(size, thread_name_prefix=self._name), key
            return self._pool
