"""Harvard Apparatus Pump 11 Elite / PHD ULTRA pump-chain protocol: codec, transport and driver."""
