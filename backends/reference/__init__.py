"""The pure-PyTorch reference backend: the executable contract, on any torch device."""
