"""Serving blocks to peers: limits, the compute queue, RPC handlers."""
