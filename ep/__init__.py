"""Expert-parallel dispatch and combine across processes (DeepEP semantics) on torch.distributed."""
