"""Write a user text for `--calib-data` / `--eval-data`: Python standard-library source as JSONL.

    .venv/bin/python benchmarks/stdlib_code_text.py out/code     # -> out/code/calib.jsonl, out/code/eval.jsonl

One document per module file (over 2,000 characters, tests left out); calibration and evaluation
come from disjoint packages (calib: email, json, logging, concurrent, importlib; eval: http, xml,
urllib, asyncio), so the measurement is on code the calibration never saw. The text depends on
the Python version it is read from (its sha256 is in every result).
"""

import argparse
import json
import sysconfig
from pathlib import Path

CALIB = ("email", "json", "logging", "concurrent", "importlib")
EVAL = ("http", "xml", "urllib", "asyncio")


def write(packages: tuple[str, ...], out: Path) -> int:
    lib = Path(sysconfig.get_paths()["stdlib"])
    chars = 0
    with open(out, "w") as f:
        for pkg in packages:
            for path in sorted((lib / pkg).rglob("*.py")):
                text = path.read_text(errors="ignore")
                if "test" not in path.parts and len(text) > 2000:
                    f.write(json.dumps({"text": text}) + "\n")
                    chars += len(text)
    return chars


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    out = p.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    for name, packages in (("calib", CALIB), ("eval", EVAL)):
        print(f"{out / (name + '.jsonl')}: {write(packages, out / (name + '.jsonl')):,} characters")


if __name__ == "__main__":
    main()
