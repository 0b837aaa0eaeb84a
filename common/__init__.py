"""Shared core of the cross-modal KD experiments: losses, divergences, the NTDH mask, Algorithm 1, run helpers."""
