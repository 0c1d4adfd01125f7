"""Harvard Apparatus Pump 11 Elite pump-chain protocol: codec, transport and driver."""
