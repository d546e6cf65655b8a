"""Prefill and decode engine drivers that speak the KV hand-off protocol (no Ray needed)."""
