"""Which of the HL7 gateway's audit records are written without fdatasync.

One list, used both by the gateway (to decide durability) and by the daemon (the writer's `bulk_events`: the only
records a lost-page cut at start-up may remove, docs/audit.md "Crash consistency"). A record outside it is always
written durably, so a name alone says which it was.
"""

from __future__ import annotations

from typing import Final

#: `hl7_out` (a message queued in the outbox, which is durable itself) and `hl7_acked` (the receiver's answer to
#: one): records of traffic that the outbox already keeps; one lost with an unsynced page loses no order and no
#: decision. Every `hl7_in` (an order received, or a message refused) is durable: it is on disk before the reply
#: leaves, so what a ward system was answered is never lost.
HL7_BULK_EVENTS: Final = frozenset({"hl7_out", "hl7_acked"})
