"""Simulated pumps: one physics model (``pump``) on an injectable clock (``clock``), wire-level fault plans
(``faults``) and a registry of named pumps (``world``). Protocol front-ends (New Era, Modbus) sit on top."""
