"""A deliberately wrong backend for the local EP operators: each makes one plausible mistake.

- ep_pack emits the buckets in descending order (a reversed sort key);
- ep_unpack drops the last row of every bucket (an off-by-one in the slot count);
- ep_combine_reduce leaves tokens without rows unwritten (an output that was never zeroed).
"""

import math

import torch

from hal.ops.ep_local import combine_reduce_reference, pack_reference, unpack_reference
from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo(description="wrong EP local kernels (test)", priority=-10)


@hookimpl
def hal_backend_availability():
    return Availability(True)


@hookimpl
def hal_ep_pack(rows, bucket_idx, num_buckets):
    flipped = torch.where(bucket_idx >= 0, num_buckets - 1 - bucket_idx, -1)
    packed, src_idx, counts = pack_reference(rows, flipped, num_buckets)
    return packed, src_idx, counts.flip(0)


@hookimpl
def hal_ep_unpack(rows, bucket_of_row, num_buckets, num_slots):
    slots, counts = unpack_reference(rows, bucket_of_row, num_buckets, num_slots)
    for bucket, count in enumerate(counts.tolist()):
        if count:
            slots[bucket, count - 1] = 0
    return slots, counts


@hookimpl
def hal_ep_combine_reduce(rows, src_idx, num_tokens, weights):
    out = combine_reduce_reference(rows, src_idx, num_tokens, weights)
    untouched = torch.bincount(src_idx.long(), minlength=num_tokens) == 0
    out[untouched] = math.nan
    return out
