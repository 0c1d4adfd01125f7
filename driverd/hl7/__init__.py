"""Ward integration over IHE PCD / HL7 v2.6 and MLLP (docs/hl7.md).

- `model`: the plain values the gateway hands to the message builders (no HL7 in them).
- `messages`: PCD-01 (DEC, ORU^R01), PCD-04 (ACM, ORU^R40), accept ACK and RRG^O16 builders; ACK parsing.
- `orders`: PCD-03 (PIV, RGV^O15) parsing and its mapping to a clinician command (the kernel still decides).
- `journal`: the durable file both stores are made of (checksummed JSON lines, fdatasync, torn-tail repair).
- `outbox`: the durable, ordered store-and-forward queue of outbound messages.
- `orderlog`: the durable record of received orders and their replies (idempotency on MSH-10).
- `mllp`: the sender (at-least-once until ACKed) and the order listener, on python-hl7's MLLP streams.
- `gateway`: joins them to the daemon.
"""
