"""Interoperability with other model formats: :mod:`emu3_train.interop.hf` (transformers' Emu3)."""
