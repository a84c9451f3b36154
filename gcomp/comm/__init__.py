"""Moving tensors between ranks: the communication thread and byte-counting collectives."""
from .transport import Transport
from .worker import CommWorker

__all__ = ["CommWorker", "Transport"]
