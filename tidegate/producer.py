"""The producer SDK, `from tidegate.producer import EventProducer` (it lives in jobs/producer.py)."""

from jobs.producer import Delivery, EventContractError, EventProducer, ProduceError

__all__ = ["Delivery", "EventContractError", "EventProducer", "ProduceError"]
