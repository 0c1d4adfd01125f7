"""Every refusal code in the code is snake_case and listed (with its meaning) in docs/operations.md, and the docs
list no code the code does not have."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from driverd.hl7.orders import REFUSALS as HL7_REFUSALS
from driverd.runtime.failsafe import AUDIT_DEAD
from driverd.signing import LEGACY_SIGNATURE_CODES, current_code

ROOT = Path(__file__).resolve().parents[2]
SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
# Where a refusal code is made, and which positional argument is the code.
MAKERS = {"Refused": 1, "Refusal": 0, "SignatureRejected": 0, "_refuse": 2, "Breach": 0}
# Arguments that pass on a code made elsewhere (already collected where it was made).
PASS_THROUGH = {"breaches[0].code", "verdict.reason"}


def _string_constants(trees: list[ast.Module]) -> dict[str, str]:
    out: dict[str, str] = {}
    for tree in trees:
        for node in ast.walk(tree):
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
                node.target if isinstance(node, ast.AnnAssign) else None
            value = getattr(node, "value", None)
            if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                out[target.id] = value.value
    return out


def codes_in_code() -> set[str]:
    trees = [ast.parse(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "driverd").rglob("*.py"))]
    constants = _string_constants(trees)
    codes = {AUDIT_DEAD, *HL7_REFUSALS}
    for tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name not in MAKERS or len(node.args) <= MAKERS[name]:
                continue
            arg = node.args[MAKERS[name]]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                codes.add(arg.value)
            elif isinstance(arg, ast.Name) and arg.id in constants:
                codes.add(constants[arg.id])
            elif (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "getattr"
                  and isinstance(arg.args[-1], ast.Constant)):
                codes.add(arg.args[-1].value)  # getattr(exc, "reason", DEFAULT): the default is a code too
            else:
                assert ast.unparse(arg) in PASS_THROUGH, f"a refusal code made by an expression: {ast.unparse(arg)}"
    return codes


def codes_in_docs() -> list[str]:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("\n## Refusal codes\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def test_refusal_codes_are_one_style_and_all_documented() -> None:
    in_code = codes_in_code()
    listed = codes_in_docs()
    assert len(listed) == len(set(listed)), "a code is listed twice"
    assert sorted(listed) == listed, "keep the table sorted"
    assert set(listed) == in_code, (f"missing from the docs: {sorted(in_code - set(listed))}; "
                                    f"in the docs only: {sorted(set(listed) - in_code)}")
    assert [c for c in in_code if not SNAKE.fullmatch(c)] == []


def test_old_signature_codes_map_to_the_current_ones() -> None:
    codes = codes_in_code()
    for old, new in LEGACY_SIGNATURE_CODES.items():
        assert old not in codes and new in codes
        assert current_code(old) == new and current_code(new) == new
