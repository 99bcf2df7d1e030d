"""A vendor plugin whose import fails (its SDK is missing): discovery must survive it."""

raise ImportError("libvendor.so: cannot open shared object file")
