"""The device check of varlen prefix sums (kernels_cu/varlen_check.cu), queued after the
kernels of a varlen call whose prefix sums were not read on the host: if they are invalid
(cu[0] != 0, cu[batch] != total, a negative length or one past max_seqlen), it fills every
output of the call with NaN bytes."""
from __future__ import annotations

import functools

import numpy as np

from .. import _compile, _core

FILE = "varlen_check.cu"
KERNEL = "cuflash::varlen_check"
THREADS = 256     # CHECK_THREADS
MAX_OUTPUTS = 5   # CHECK_MAX_OUTPUTS: out, lse or dq, dk, dv
# Every CTA reads all batch + 1 entries of both prefix sums: at most about this many
# entries in all (a few MiB of L2 reads) however long the batch.
_READS = 1 << 22

# VarlenCheckParams (varlen_check.cu).
PARAMS = np.dtype([
    ("cu_seqlens_q", np.uint64), ("cu_seqlens_k", np.uint64),
    ("outputs", np.uint64, (MAX_OUTPUTS,)), ("output_bytes", np.int64, (MAX_OUTPUTS,)),
    ("batch", np.int32), ("total_q", np.int32), ("total_k", np.int32),
    ("max_seqlen_q", np.int32), ("max_seqlen_k", np.int32),
], align=True)


class Plan:
    """The check of one varlen problem whose outputs (contiguous) have ``output_bytes``."""

    def __init__(self, device_id, batch, total_q, total_k, max_q, max_k, output_bytes):
        pad = MAX_OUTPUTS - len(output_bytes)
        record = (0, 0, [0] * MAX_OUTPUTS, list(output_bytes) + [0] * pad, batch, total_q,
                  total_k, max_q, max_k)
        base = PARAMS.fields["outputs"][1]
        self.record = _core.Record(PARAMS, record, ("cu_seqlens_q", "cu_seqlens_k"))
        self.record.slots += tuple(base // 8 + i for i in range(len(output_bytes)))
        fill = -(-sum(output_bytes) // (THREADS * 16 * 8))
        blocks = max(1, min(fill, _core.num_sms(device_id), _READS // (batch + 1)))
        self.kernel = _core.Kernel(FILE, KERNEL, device_id, (blocks,), (THREADS,), 0)

    def __call__(self, stream: int, cu_q, cu_k, *outputs) -> None:
        self.kernel(stream, self.record.fill(cu_q, cu_k, *outputs))


@functools.lru_cache(maxsize=256)
def plan(device_id, batch, total_q, total_k, max_q, max_k, output_bytes: tuple) -> Plan:
    _compile.device_arch(device_id)
    return Plan(device_id, batch, total_q, total_k, max_q, max_k, output_bytes)


def kernels(arch: str) -> list:
    return [(FILE, KERNEL, 0)]


def facts():
    return [(FILE, e, v) for e, v in
            _core.struct_facts("cuflash::VarlenCheckParams", PARAMS)] + \
        [(FILE, "cuflash::CHECK_THREADS", THREADS),
         (FILE, "cuflash::CHECK_MAX_OUTPUTS", MAX_OUTPUTS)]
