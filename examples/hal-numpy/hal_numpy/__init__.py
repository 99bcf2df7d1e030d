"""The numpy backend for unihal (see plugin.py)."""
