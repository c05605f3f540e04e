"""Read the gate's JUnit file (`REPORT/junit.xml`) and decide a release on it, as a CI step would.

    python examples/gate_summary.py runs/release/report/junit.xml

Prints one line per check. Exits 0 when every check passed, 1 when one failed, 2 when the file is missing or is
not a gate's JUnit file (so a broken run never reads as a passed gate).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def summarise(path: Path) -> tuple[int, list[str]]:
    """The exit code and the lines to print for the JUnit file at ``path``."""
    if not path.is_file():
        return 2, [f"error: {path} does not exist; did `fwsvd-deploy run` finish?"]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return 2, [f"error: {path} is not valid XML ({exc})"]
    cases = root.findall(".//testsuite[@name='fwsvd-deploy.gate']/testcase")
    if not cases:
        return 2, [f"error: {path} holds no gate checks"]
    lines, failed = [], 0
    for case in cases:
        failure = case.find("failure")
        if failure is None:
            lines.append(f"PASS {case.get('name')}")
        else:
            failed += 1
            lines.append(f"FAIL {failure.get('message')}")
    lines.append(f"{len(cases) - failed} of {len(cases)} checks passed: release {'blocked' if failed else 'allowed'}")
    return (1 if failed else 0), lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python examples/gate_summary.py REPORT/junit.xml", file=sys.stderr)
        return 2
    code, lines = summarise(Path(args[0]))
    print("\n".join(lines), file=sys.stderr if code == 2 else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
