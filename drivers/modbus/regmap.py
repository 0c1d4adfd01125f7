"""Modbus register maps as data: load a TOML map, validate it completely, expose its points.

A map names every point the driver and the simulator use (the *required* points below) and says where each
lives (table + 0-based address), how it is encoded (type, scale, word order) and what it means.
Validation collects every problem (path + rule) before raising one ValidationError, so a map author sees them
all at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final, Literal

from driverd import resources
from driverd.core.errors import ConfigError, Problem, QuantityError
from driverd.core.quantities import Resolution, parse_decimal
from driverd.core.syringe_limits import PlungerLimits
from driverd.core.toml_text import load_toml
from drivers.base import AlarmKind

Table = Literal["coils", "discrete_inputs", "holding_registers", "input_registers"]
TABLES: Final[tuple[Table, ...]] = ("coils", "discrete_inputs", "holding_registers", "input_registers")
BIT_TABLES: Final = frozenset({"coils", "discrete_inputs"})
READ_ONLY_TABLES: Final = frozenset({"discrete_inputs", "input_registers"})

#: Register width of each fixed-size type (bool is one bit in a bit table).
TYPE_WIDTH: Final[dict[str, int]] = {
    "bool": 1,
    "uint16": 1,
    "int16": 1,
    "uint32": 2,
    "int32": 2,
    "float32": 2,
}
TYPES: Final = frozenset({*TYPE_WIDTH, "ascii"})
NUMERIC_TYPES: Final = frozenset({"uint16", "int16", "uint32", "int32", "float32"})
WORD_ORDERS: Final = frozenset({"big", "little"})
ACCESS: Final = frozenset({"r", "rw", "w"})
KNOWN_COMMANDS: Final = frozenset({"acknowledge_alarms", "clear_delivered"})

DEFAULT_MAP: Final = resources.REGISTER_MAP  # shipped package data (config/drivers/modbus-pump.toml in the repo)

_DEVICE_KEYS: Final = frozenset(
    {
        "name",
        "map_version",
        "address_base",
        "word_order",
        "description",
        # FC43/14 Read Device Identification, basic objects 0x00-0x02 (Modbus Application Protocol v1.1b3 §6.21)
        "vendor",
        "product_code",
        "revision",
        # The mechanism's plunger speed range: with the syringe bore it bounds the rate (issue 16.6)
        "plunger_min_mm_per_h",
        "plunger_max_mm_per_h",
    }
)
_POINT_KEYS: Final = frozenset(
    {"address", "type", "access", "meaning", "units", "scale", "length", "word_order", "alarm", "commands"}
)


@dataclass(frozen=True, slots=True)
class Requirement:
    table: Table
    kinds: frozenset[str]  # acceptable types
    writable: bool  # must the master be able to write it


_NUM = NUMERIC_TYPES
#: Points every pump map must define: the driver and the simulator address them by these names.
REQUIRED: Final[dict[str, Requirement]] = {
    "run": Requirement("coils", frozenset({"bool"}), True),
    "running": Requirement("discrete_inputs", frozenset({"bool"}), False),
    "alarm_active": Requirement("discrete_inputs", frozenset({"bool"}), False),
    "rate_setpoint": Requirement("holding_registers", _NUM, True),
    "diameter_setpoint": Requirement("holding_registers", _NUM, True),
    "target_volume": Requirement("holding_registers", _NUM, True),
    "watchdog_timeout": Requirement("holding_registers", frozenset({"uint16", "uint32"}), True),
    "command": Requirement("holding_registers", frozenset({"uint16"}), True),
    "rate_readback": Requirement("input_registers", _NUM, False),
    "diameter_readback": Requirement("input_registers", _NUM, False),
    "delivered_volume": Requirement("input_registers", _NUM, False),
    "model": Requirement("input_registers", frozenset({"ascii"}), False),
    "firmware": Requirement("input_registers", frozenset({"ascii"}), False),
    "map_version": Requirement("input_registers", frozenset({"uint16"}), False),
}
#: The engineering unit the driver assumes for each point it converts, as exact text (case matters: "mL" is not
#: "ML"). A map whose rate says "uL/h" is refused rather than read as mL/h (a 1000x error). remaining_volume is
#: optional; when present it is held to the same rule.
REQUIRED_UNITS: Final[dict[str, str]] = {
    "rate_setpoint": "mL/h",
    "rate_readback": "mL/h",
    "diameter_setpoint": "mm",
    "diameter_readback": "mm",
    "target_volume": "mL",
    "delivered_volume": "mL",
    "remaining_volume": "mL",
    "watchdog_timeout": "s",
}
#: Each setpoint and the read-back that verifies it: they must be encoded alike (type, scale, word order), or a
#: read-back could "verify" a value the pump holds at another scale.
READBACK_PAIRS: Final = (("rate_setpoint", "rate_readback"), ("diameter_setpoint", "diameter_readback"))
#: The coarsest delivered-volume step (one raw unit of an integer counter) a map may have. The accuracy check
#: allows two steps of a reading's counter step when that is coarser than the drug library's
#: counter_resolution_ml (0.01 mL in the shipped library): a map with scale "1" would have widened it to +-2 mL.
#: A Modbus counter is a register, not a 4-digit display, so nothing needs it coarser than the library's step.
MAX_DELIVERED_STEP_ML: Final = Decimal("0.01")
#: The finest rate scale: the rate resolution is the scale's decimals, and a Resolution has at most 9.
MIN_RATE_SCALE_EXPONENT: Final = -9

#: Alarms every map must expose as a bit (warnings included: the daemon must see near-end and low battery).
REQUIRED_ALARMS: Final = frozenset(
    {
        AlarmKind.OCCLUSION,
        AlarmKind.END_OF_SYRINGE,
        AlarmKind.NEAR_END,
        AlarmKind.LOW_BATTERY,
        AlarmKind.SAFE_MODE_TIMEOUT,
        AlarmKind.POWER_INTERRUPTED,
    }
)


@dataclass(frozen=True, slots=True)
class Point:
    """One coil, discrete input or register group. `width` is in registers (bits for bit tables)."""

    table: Table
    name: str
    address: int
    type: str
    access: str
    meaning: str
    units: str = ""
    scale: Decimal | None = None  # engineering value = raw * scale; None = raw value (or float as is)
    length: int = 0  # ascii only: registers
    word_order: str = "big"
    alarm: AlarmKind | None = None
    commands: Mapping[str, int] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.length if self.type == "ascii" else TYPE_WIDTH[self.type]

    @property
    def end(self) -> int:
        """One past the last address the point occupies."""
        return self.address + self.width

    @property
    def writable(self) -> bool:
        return "w" in self.access

    @property
    def path(self) -> str:
        return f"{self.table}.{self.name}"


@dataclass(frozen=True, slots=True)
class RegisterMap:
    name: str
    map_version: int
    word_order: str
    description: str
    points: Mapping[str, Point]  # by name; names are unique across tables
    source: str = ""
    vendor: str = ""  # FC43 object 0x00 VendorName
    product_code: str = ""  # FC43 object 0x01 ProductCode
    revision: str = ""  # FC43 object 0x02 MajorMinorRevision
    plunger: PlungerLimits | None = None  # None: the map states no rate range
    sha256: str = ""  # of the map file's bytes (of the text for parse_map_text): logged at daemon start
    # Derived once (the map is immutable): the driver asks for these on every status poll, the simulator on
    # every request, and sorting them each time was a measurable share of a poll (bench/scale.py).
    _tables: Mapping[Table, tuple[Point, ...]] = field(init=False, repr=False, compare=False)
    _alarms: tuple[Point, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tables = {
            t: tuple(sorted((p for p in self.points.values() if p.table == t), key=lambda p: p.address))
            for t in TABLES
        }
        object.__setattr__(self, "_tables", tables)
        alarms = tuple(p for p in tables["discrete_inputs"] + tables["coils"] if p.alarm is not None)
        object.__setattr__(self, "_alarms", alarms)

    def __getitem__(self, name: str) -> Point:
        return self.points[name]

    def table(self, table: Table) -> list[Point]:
        """The points of one table, by address."""
        return list(self._tables[table])

    def alarm_points(self) -> list[Point]:
        return list(self._alarms)

    def command(self, name: str) -> int:
        """The magic value of a command of the command register."""
        return self.points["command"].commands[name]

    def rate_resolution(self) -> Resolution:
        """Rates the map can carry exactly: decimals of the rate setpoint's scale (e.g. 0.001 -> 3)."""
        scale = self.points["rate_setpoint"].scale
        if scale is None:
            return Resolution(decimals=3)  # float or raw integer: the driver's documented default
        exponent = scale.normalize().as_tuple().exponent
        assert isinstance(exponent, int)  # finite by validation
        return Resolution(decimals=max(0, -exponent))

    def delivered_step(self) -> Decimal | None:
        """The delivered-volume counter's step in mL: one raw unit of an integer point (its scale, 1 without
        one); None for a float32 counter, whose step is not known."""
        point = self.points["delivered_volume"]
        if point.type == "float32":
            return None
        return Decimal(1) if point.scale is None else point.scale


def load_map(path: str | Path = DEFAULT_MAP) -> RegisterMap:
    """Read and validate a map file. A file that is missing or not TOML is a ConfigError too."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError([Problem(str(p), "readable", f"cannot read register map: {exc}")]) from None
    return parse_map(load_toml(data, str(p)), source=str(p), sha256=hashlib.sha256(data).hexdigest())


def parse_map_text(text: str, *, source: str = "<string>") -> RegisterMap:
    data = load_toml(text, source)
    return parse_map(data, source=source, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def parse_map(data: Mapping[str, object], *, source: str = "<data>", sha256: str = "") -> RegisterMap:
    """Validate a decoded map; raise ConfigError (a ValidationError) listing every problem."""
    problems: list[Problem] = []
    for key in data:
        if key != "device" and key not in TABLES:
            problems.append(Problem(key, "unknown-key", f"unknown top-level key {key!r}; expected device or a table"))

    device = data.get("device")
    name, version, word_order, description = "", 0, "big", ""
    ident: dict[str, str] = {}
    plunger: PlungerLimits | None = None
    if not isinstance(device, Mapping):
        problems.append(Problem("device", "required", "a [device] table is required"))
    else:
        for key in device:
            if key not in _DEVICE_KEYS:
                problems.append(Problem(f"device.{key}", "unknown-key", f"unknown key {key!r}"))
        raw_name = device.get("name")
        if not isinstance(raw_name, str) or not raw_name.strip():
            problems.append(Problem("device.name", "required", "a non-empty device name is required"))
        else:
            name = raw_name
        raw_version = device.get("map_version")
        if isinstance(raw_version, bool) or not isinstance(raw_version, int) or not 1 <= raw_version <= 65535:
            problems.append(Problem("device.map_version", "range", "map_version must be an integer 1..65535"))
        else:
            version = raw_version
        if device.get("address_base") != 0:
            problems.append(
                Problem(
                    "device.address_base",
                    "zero-based",
                    "address_base must be 0: addresses are 0-based PDU addresses",
                )
            )
        raw_order = device.get("word_order", "big")
        if raw_order not in WORD_ORDERS:
            problems.append(
                Problem("device.word_order", "word-order", f"word_order must be big or little, got {raw_order!r}")
            )
        else:
            word_order = str(raw_order)
        raw_desc = device.get("description", "")
        if not isinstance(raw_desc, str):
            problems.append(Problem("device.description", "type", "description must be a string"))
        else:
            description = raw_desc
        for key in ("vendor", "product_code", "revision"):
            raw = device.get(key, "")
            if not isinstance(raw, str) or not raw.isascii() or len(raw) > MAX_IDENT_CHARS:
                problems.append(
                    Problem(f"device.{key}", "format", f"{key} must be ASCII text of at most {MAX_IDENT_CHARS} chars")
                )
            else:
                ident[key] = raw
        plunger = _parse_plunger(device, problems)

    points: dict[str, Point] = {}
    present: set[str] = set()  # names defined, even if invalid: not reported again as missing
    for table in TABLES:
        entries = data.get(table, {})
        if not isinstance(entries, Mapping):
            problems.append(Problem(table, "type", f"{table} must be a table of points"))
            continue
        for pname, spec in entries.items():
            path = f"{table}.{pname}"
            if pname in points:
                problems.append(
                    Problem(path, "unique-name", f"point name {pname!r} already used in {points[pname].table}")
                )
                continue
            present.add(pname)
            point = _parse_point(table, pname, spec, word_order, problems)
            if point is not None:
                points[pname] = point

    _check_overlaps(points, problems)
    _check_required(points, present, problems)
    _check_units_and_scales(points, problems)
    if problems:
        raise ConfigError(problems)
    return RegisterMap(
        name=name,
        map_version=version,
        word_order=word_order,
        description=description,
        points=points,
        source=source,
        vendor=ident.get("vendor", ""),
        product_code=ident.get("product_code", ""),
        revision=ident.get("revision", ""),
        plunger=plunger,
        sha256=sha256,
    )


MAX_IDENT_CHARS: Final = 64


def _parse_plunger(device: Mapping[str, Any], problems: list[Problem]) -> PlungerLimits | None:
    keys = ("plunger_min_mm_per_h", "plunger_max_mm_per_h")
    if not any(k in device for k in keys):
        return None
    got: dict[str, Decimal] = {}
    for key in keys:
        try:
            got[key] = parse_decimal(device.get(key), f"device.{key}", maximum=Decimal(100_000), allow_zero=False)
        except QuantityError as exc:
            problems.extend(exc.problems)
    if len(got) != 2:
        return None
    lo, hi = got["plunger_min_mm_per_h"], got["plunger_max_mm_per_h"]
    if lo >= hi:
        problems.append(Problem("device.plunger_min_mm_per_h", "range", "must be below device.plunger_max_mm_per_h"))
        return None
    return PlungerLimits(lo, hi)


def _parse_point(table: Table, name: str, spec: object, default_order: str, problems: list[Problem]) -> Point | None:
    path = f"{table}.{name}"
    if not isinstance(spec, Mapping):
        problems.append(Problem(path, "type", "a point must be a table of keys"))
        return None
    start = len(problems)
    for key in spec:
        if key not in _POINT_KEYS:
            problems.append(Problem(f"{path}.{key}", "unknown-key", f"unknown key {key!r}"))

    ptype = spec.get("type")
    if ptype not in TYPES:
        problems.append(
            Problem(f"{path}.type", "known-type", f"unknown type {ptype!r}; expected one of {sorted(TYPES)}")
        )
        ptype = None
    elif (ptype == "bool") != (table in BIT_TABLES):
        rule = "bool only in coils and discrete_inputs" if ptype == "bool" else f"{table} hold bool points only"
        problems.append(Problem(f"{path}.type", "table-type", f"type {ptype!r} not allowed here: {rule}"))

    length = 0
    raw_length = spec.get("length")
    if ptype == "ascii":
        if isinstance(raw_length, bool) or not isinstance(raw_length, int) or not 1 <= raw_length <= 125:
            problems.append(Problem(f"{path}.length", "range", "ascii points need length (registers) 1..125"))
        else:
            length = raw_length
    elif raw_length is not None:
        problems.append(Problem(f"{path}.length", "not-applicable", "length applies to ascii points only"))

    address = spec.get("address")
    width = length if ptype == "ascii" else TYPE_WIDTH.get(str(ptype), 1)
    if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address <= 65535:
        problems.append(Problem(f"{path}.address", "range", f"address must be an integer 0..65535, got {address!r}"))
        address = None
    elif address + max(width, 1) - 1 > 65535:
        problems.append(Problem(f"{path}.address", "range", "point extends past address 65535"))

    access = spec.get("access")
    if access not in ACCESS:
        problems.append(Problem(f"{path}.access", "access", f"access must be r, rw or w, got {access!r}"))
    elif table in READ_ONLY_TABLES and access != "r":
        problems.append(
            Problem(
                f"{path}.access",
                "read-only-table",
                f"{table} are read-only in Modbus: access must be r, got {access!r}",
            )
        )

    meaning = spec.get("meaning")
    if not isinstance(meaning, str) or not meaning.strip():
        problems.append(Problem(f"{path}.meaning", "required", "every point documents its meaning"))
    units = spec.get("units", "")
    if not isinstance(units, str):
        problems.append(Problem(f"{path}.units", "type", "units must be a string"))

    scale = _parse_scale(spec.get("scale"), ptype, f"{path}.scale", problems)

    order = spec.get("word_order", default_order)
    if "word_order" in spec and ptype not in {"uint32", "int32", "float32"}:
        problems.append(Problem(f"{path}.word_order", "not-applicable", "word_order applies to 32-bit types only"))
    elif order not in WORD_ORDERS:
        problems.append(Problem(f"{path}.word_order", "word-order", f"word_order must be big or little, got {order!r}"))

    alarm: AlarmKind | None = None
    if "alarm" in spec:
        raw_alarm = spec["alarm"]
        if ptype != "bool":
            problems.append(Problem(f"{path}.alarm", "not-applicable", "alarm applies to bool points only"))
        try:
            alarm = AlarmKind(raw_alarm)
        except ValueError:
            known = sorted(k.value for k in AlarmKind)
            problems.append(
                Problem(f"{path}.alarm", "known-alarm", f"unknown alarm {raw_alarm!r}; expected one of {known}")
            )

    commands: dict[str, int] = {}
    if "commands" in spec:
        raw_cmds = spec["commands"]
        if ptype != "uint16" or table != "holding_registers":
            problems.append(Problem(f"{path}.commands", "not-applicable", "commands apply to uint16 holding registers"))
        if not isinstance(raw_cmds, Mapping):
            problems.append(Problem(f"{path}.commands", "type", "commands must be a table name = magic value"))
        else:
            for cname, magic in raw_cmds.items():
                cpath = f"{path}.commands.{cname}"
                if cname not in KNOWN_COMMANDS:
                    problems.append(
                        Problem(
                            cpath,
                            "known-command",
                            f"unknown command {cname!r}; expected {sorted(KNOWN_COMMANDS)}",
                        )
                    )
                elif isinstance(magic, bool) or not isinstance(magic, int) or not 1 <= magic <= 0xFFFF:
                    problems.append(Problem(cpath, "range", "a magic value must be an integer 0x0001..0xFFFF"))
                elif magic in commands.values():
                    problems.append(Problem(cpath, "unique-magic", f"magic value {magic:#06x} used twice"))
                else:
                    commands[cname] = magic

    if len(problems) > start or ptype is None or address is None:
        return None
    return Point(
        table=table,
        name=name,
        address=address,
        type=ptype,
        access=str(access),
        meaning=str(meaning),
        units=str(units),
        scale=scale,
        length=length,
        word_order=str(order),
        alarm=alarm,
        commands=commands,
    )


def _parse_scale(raw: object, ptype: object, path: str, problems: list[Problem]) -> Decimal | None:
    if raw is None:
        return None
    if ptype not in NUMERIC_TYPES:
        problems.append(Problem(path, "not-applicable", "scale applies to numeric types only"))
        return None
    if isinstance(raw, float):
        # A TOML float already went through binary; a scale must be exact.
        problems.append(
            Problem(path, "scale", f'scale must be a decimal string like "0.001" or an integer, got float {raw!r}')
        )
        return None
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        problems.append(Problem(path, "scale", "scale must be a decimal string or an integer"))
        return None
    try:
        scale = Decimal(raw)
    except InvalidOperation:
        problems.append(Problem(path, "scale", f"scale is not a number: {raw!r}"))
        return None
    if not scale.is_finite() or scale <= 0:
        problems.append(Problem(path, "scale", f"scale must be a finite number > 0, got {raw!r}"))
        return None
    return scale


def _check_overlaps(points: Mapping[str, Point], problems: list[Problem]) -> None:
    for table in TABLES:
        ordered = sorted((p for p in points.values() if p.table == table), key=lambda p: (p.address, p.name))
        widest: Point | None = None  # the earlier point reaching furthest: catches overlaps of non-neighbours
        for cur in ordered:
            if widest is not None and cur.address < widest.end:
                span = f"{widest.address}..{widest.end - 1}"
                detail = f"address {cur.address} overlaps {widest.name} ({table} {span})"
                problems.append(Problem(f"{cur.path}.address", "overlap", detail))
            if widest is None or cur.end > widest.end:
                widest = cur


def _check_required(points: Mapping[str, Point], present: set[str], problems: list[Problem]) -> None:
    for name, req in REQUIRED.items():
        path = f"{req.table}.{name}"
        point = points.get(name)
        if point is None and name in present:
            continue  # defined but invalid: its own problems are already listed
        if point is None:
            problems.append(Problem(path, "missing-point", f"required point {name!r} is missing from {req.table}"))
            continue
        if point.table != req.table:
            problems.append(Problem(point.path, "required-table", f"point {name!r} must be in {req.table}"))
        if point.type not in req.kinds:
            problems.append(
                Problem(f"{point.path}.type", "required-type", f"{name} must be one of {sorted(req.kinds)}")
            )
        if req.writable and not point.writable:
            problems.append(Problem(f"{point.path}.access", "required-writable", f"{name} must be writable (rw or w)"))
    command = points.get("command")
    # Both are needed: alarms are acknowledged, and the delivered counter is cleared before every course and at
    # every syringe load (docs/drivers.md).
    for needed in ("acknowledge_alarms", "clear_delivered"):
        if command is not None and needed not in command.commands:
            problems.append(
                Problem(
                    "holding_registers.command.commands",
                    "missing-command",
                    f"the command register needs {needed}",
                )
            )
    mapped = {p.alarm for p in points.values() if p.alarm is not None}
    for kind in sorted(REQUIRED_ALARMS - mapped, key=lambda k: k.value):
        problems.append(Problem("discrete_inputs", "missing-alarm", f"no point has alarm = {kind.value!r}"))
    seen: dict[AlarmKind, str] = {}
    for p in points.values():
        if p.alarm is not None:
            if p.alarm in seen:
                problems.append(
                    Problem(f"{p.path}.alarm", "unique-alarm", f"alarm {p.alarm.value!r} also on {seen[p.alarm]}")
                )
            seen[p.alarm] = p.name


def _check_units_and_scales(points: Mapping[str, Point], problems: list[Problem]) -> None:
    """The rules that tie the map's numbers to what the driver assumes: exact units, a setpoint encoded like its
    read-back, a rate scale that is a power of ten, a delivered-volume step no coarser than 0.01 mL."""
    for name, unit in REQUIRED_UNITS.items():
        point = points.get(name)
        if point is not None and point.units != unit:
            problems.append(
                Problem(f"{point.path}.units", "units", f'{name} must have units exactly "{unit}", got {point.units!r}')
            )
    for setpoint, readback in READBACK_PAIRS:
        sp, rb = points.get(setpoint), points.get(readback)
        if sp is None or rb is None:
            continue
        for key in ("type", "scale", "word_order"):
            if getattr(sp, key) != getattr(rb, key):
                problems.append(
                    Problem(
                        f"{rb.path}.{key}",
                        "readback-encoding",
                        f"{readback} must have the same {key} as {setpoint} ({_shown(getattr(sp, key))}), "
                        f"got {_shown(getattr(rb, key))}",
                    )
                )
    rate = points.get("rate_setpoint")
    if rate is not None and rate.scale is not None:
        _sign, digits, exponent = rate.scale.normalize().as_tuple()
        if digits != (1,) or not isinstance(exponent, int) or not MIN_RATE_SCALE_EXPONENT <= exponent <= 0:
            problems.append(
                Problem(
                    f"{rate.path}.scale",
                    "scale-power-of-ten",
                    f"the rate scale must be 1, 0.1, 0.01, ... down to 1E{MIN_RATE_SCALE_EXPONENT} mL/h "
                    f"(the pump's rate resolution), got {rate.scale}",
                )
            )
    delivered = points.get("delivered_volume")
    if delivered is not None and delivered.type != "float32":
        step = Decimal(1) if delivered.scale is None else delivered.scale
        if step > MAX_DELIVERED_STEP_ML:
            problems.append(
                Problem(
                    f"{delivered.path}.scale",
                    "counter-step",
                    f"the delivered-volume step (one raw unit) must be at most {MAX_DELIVERED_STEP_ML} mL, "
                    f"got {step} mL",
                )
            )


def _shown(value: object) -> str:
    return "none" if value is None else str(value)
