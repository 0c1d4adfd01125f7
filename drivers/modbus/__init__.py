"""Modbus pumps: a register map as data (regmap), a pure codec (codec) and an async driver (driver)."""
