"""Moving tensors between ranks: the communication thread, collectives that count their bytes,
the agreement check, and the host/device boundary (streams, futures, host reads)."""
from .agreement import check_agreement
from .device import DeviceRuntime
from .transport import Transport
from .worker import CommWorker

__all__ = ["CommWorker", "DeviceRuntime", "Transport", "check_agreement"]
