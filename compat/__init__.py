"""Drop-in modules: code written against DeepSeek's libraries changes one import.

    import hal.compat.flash_mla as flash_mla     # instead of: import flash_mla
    import hal.compat.deep_gemm as deep_gemm     # instead of: import deep_gemm

Names and signatures follow the anchors' public APIs; the work runs on the selected hal backend.
"""
