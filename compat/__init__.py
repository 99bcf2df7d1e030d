"""Drop-in modules: code written against DeepSeek's libraries changes one import.

    import hal.compat.flash_mla as flash_mla     # instead of: import flash_mla
    import hal.compat.deep_gemm as deep_gemm     # instead of: import deep_gemm
    import hal.compat.deep_ep as deep_ep         # instead of: import deep_ep
    import hal.compat.eplb as eplb               # instead of: import eplb

Names and signatures follow the anchors' public APIs; the work runs on the selected hal backend.
"""

from __future__ import annotations


def not_provided(module: str, table: dict[str, str], name: str) -> AttributeError:
    """The AttributeError for ``hal.compat.<module>.<name>``: saying why when ``table`` (a drop-in
    module's ``NOT_PROVIDED``: comma-separated names -> reason) lists the name, else Python's own
    message. An AttributeError, so that ``hasattr`` probes keep working."""
    for names, why in table.items():
        if name in [n.strip() for n in names.split(",")]:
            return AttributeError(f"{module}.{name} is not provided by hal.compat.{module}: {why}.")
    return AttributeError(f"module 'hal.compat.{module}' has no attribute {name!r}")
