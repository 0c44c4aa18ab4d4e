"""Prints the lowest versions ``pyproject.toml`` allows, as pip pins (``name==floor``).

``python .ci/min_versions.py`` pins the library's dependencies; ``python .ci/min_versions.py
nnx`` pins the requirements of the named optional extras instead. Every requirement printed
must have a floor (``>=``). CI installs the package with these pins and runs the unit tier
against them, so the floors are written once, in ``pyproject.toml``, and are the tested ones.
"""

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def floors(extras: list[str]) -> list[str]:
  project = tomllib.loads(PYPROJECT.read_text())["project"]
  optional = project.get("optional-dependencies", {})
  unknown = [e for e in extras if e not in optional]
  if unknown:
    raise SystemExit(f"no such extra in pyproject.toml: {unknown}")
  pins = []
  for req in [r for e in extras for r in optional[e]] if extras else project["dependencies"]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*", req)
    floor = re.search(r">=\s*([^,\s]+)", m.group(2)) if m else None
    if floor is None:
      raise SystemExit(f"pyproject.toml: {req!r} has no floor (>=) to pin")
    pins.append(f"{m.group(1)}=={floor.group(1)}")
  return pins


if __name__ == "__main__":
  print(" ".join(floors(sys.argv[1:])))
