"""torch CPU backend: the FP8 GEMMs as exact fp32 per-block products through torch's CPU kernels (MKL)."""
