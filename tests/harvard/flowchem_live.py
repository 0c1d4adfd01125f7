"""Drive flowchem's own Elite11 client (flowchem.devices.harvardapparatus) against our simulator's PTY.

Run with a Python that has flowchem installed (not a driverd dependency):  python flowchem_live.py DEVICE ADDRESS
Prints one JSON object with what flowchem read; tests/harvard/test_flowchem_crosscheck.py runs it when flowchem is
importable and docs/simulators.md records a run.
"""

import asyncio
import json
import sys


async def main(device: str, address: int) -> dict[str, object]:
    from flowchem.devices.harvardapparatus.elite11 import Elite11

    pump = Elite11.from_config(port=device, syringe_diameter="19.13 mm", syringe_volume="20 ml", address=address)
    out: dict[str, object] = {}
    try:
        await pump.initialize()
    except Exception as exc:  # what flowchem itself raises is the result
        return {"initialize": f"{type(exc).__name__}: {exc}"}
    out["initialize"] = "ok"
    out["version"] = await pump.version()
    out["infuse_only"] = pump._infuse_only
    out["diameter"] = await pump.get_syringe_diameter()
    out["syringe_volume"] = await pump.get_syringe_volume()
    out["force"] = await pump.get_force()
    await pump.set_flow_rate("0.05 ml/min")
    out["flow_rate_ml_min"] = await pump.get_flow_rate()
    out["moving_before"] = await pump.is_moving()
    await pump.infuse()
    out["moving_after_infuse"] = await pump.is_moving()
    out["current_rate_ml_min"] = await pump.get_current_flow_rate()
    await pump.stop()
    out["moving_after_stop"] = await pump.is_moving()
    info = await pump.pump_info()
    out["pump_info"] = [info.pump_type, info.pump_description, info.infuse_only]
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2])))))
