"""New Era NE-500/1000/1002X/4000 syringe pumps over RS-232: pure codec, pyserial transport, async driver."""
