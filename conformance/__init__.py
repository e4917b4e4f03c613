"""Conformance suite: seeded cases per op, checked against the pure-PyTorch reference (DESIGN.md section 5)."""
