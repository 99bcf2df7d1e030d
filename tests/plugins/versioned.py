"""A backend that declares a contract version for ``paged_mqa_logits`` instead of a feature list."""

from hal.ops.indexer_reference import paged_mqa_logits_reference
from hal.plugin import Availability, BackendInfo, hookimpl


@hookimpl
def hal_backend_info():
    return BackendInfo("versioned (test plugin)", priority=-5, device_types=("cpu",), contract_versions={"paged_mqa_logits": 1})


@hookimpl
def hal_backend_availability():
    return Availability(True, device="cpu")


@hookimpl
def hal_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype):
    return paged_mqa_logits_reference(q, kv_cache, weights, context_lens, block_table, max_context_len, clean_logits, logits_dtype)
