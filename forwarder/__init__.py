"""Archive forwarding: the received images of each series go, as received, to the archive destinations.

The SCP and the web write :class:`openmsk.forwarding.ForwardOrder` records to the on-disk outbox; the
:class:`Forwarder` (a thread of the SCP process) drains it. See :mod:`openmsk.forwarding` for the records.
"""

from forwarder.forwarder import BACKOFF_S, Forwarder

__all__ = ["BACKOFF_S", "Forwarder"]
