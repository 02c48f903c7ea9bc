"""Anatomical passports: a compact, versioned JSON description of one scan's anatomy (world mm, RAS+)."""
