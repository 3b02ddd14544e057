"""cuflash's log: everything goes to ``logging.getLogger("cuflash")``.

- DEBUG when a kernel is compiled or loaded from CuPy's disk cache (name, arch, seconds), and
  when a plan is made, once per memoized problem layout (the kernel, its grid, block and
  dynamic shared memory).
- WARNING, once per process and reason, when a faster kernel cannot run a problem and a
  slower one does (e.g. the Hopper forward falling back to ``flash_fwd``).

Nothing logs on the path of a memoized call: the records come from where plans are built
and kernels compiled. Show them with e.g.
``logging.basicConfig(); logging.getLogger("cuflash").setLevel(logging.DEBUG)``.
"""
from __future__ import annotations

import logging
import threading

logger = logging.getLogger("cuflash")

_warned = set()
_lock = threading.Lock()


def warn_once(reason: str, message: str, *args) -> None:
    """``logger.warning(message, *args)`` the first time ``reason`` comes up in this
    process; nothing afterwards."""
    if reason in _warned:
        return
    with _lock:
        if reason in _warned:
            return
        _warned.add(reason)
    logger.warning(message, *args)
