"""Tidegate's client SDK: what producers and notebooks import (`tidegate.producer`).

The job itself lives in the layered packages (docs/architecture.md); this package sits above
schemas, crypto, compute and connectors and below jobs, and imports no Ray."""
