"""The tested set of package versions (`launch/requirements.lock`) against pyproject.toml and an installed venv.

    python launch/lockfile.py write LOCK      # freeze this interpreter's environment into LOCK (launch/lock.sh)
    python launch/lockfile.py check LOCK      # every locked package that is installed has its locked version
    python launch/lockfile.py diff LOCK       # print the installed versions that differ from LOCK (LATEST=1 runs)
    python launch/lockfile.py agree LOCK      # LOCK pins every dependency of pyproject.toml inside its range

The lock is a pip constraints file (`name==version` a line): `launch/install.sh` installs with `-c` on it, so
pyproject.toml keeps the ranges a user's own environment may take while our machines and CI get one exact set.
Local version labels are dropped (`torch==2.13.0`, not `2.13.0+cpu`) so a CUDA build of the same version satisfies it.
Only the standard library and `packaging` (vendored by pip, and a dependency of transformers) are used: this runs
before and after the project is installed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors tomli
    from pip._vendor import tomli as tomllib

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare venv: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PROJECT = "omni-moe"
# The venv's own tools: what a venv comes with varies by Python build, and they are not what the project runs on.
NOT_LOCKED = ("pip", "setuptools", "wheel")
# The extras whose dependencies the lock must cover: what launch/install.sh can install on our machines.
LOCKED_EXTRAS = ("test", "video")
HEADER = """\
# The tested set: every package of a fresh `bash launch/install.sh test` venv, exact versions (pip constraints).
# launch/install.sh installs with `-c` on this file; `LATEST=1 bash .ci/run` ignores it and tests the newest set.
# Refresh deliberately (a fresh venv, the newest versions pyproject.toml allows, frozen here): bash launch/lock.sh
"""
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file; any other kind of line is an error naming it."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {line!r}")
        name = canonicalize_name(match.group(1))
        if name in pins:
            raise ValueError(f"{path}:{number}: {name} is pinned twice")
        pins[name] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    """{canonical name: version} of this interpreter's environment, local labels dropped, without the project and
    the venv's own tools."""
    found = {canonicalize_name(d.metadata["Name"]): d.version.split("+")[0] for d in metadata.distributions()}
    for name in (PROJECT, *NOT_LOCKED):
        found.pop(canonicalize_name(name), None)
    return found


def project_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and those of the locked extras (markers applied for this interpreter)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        specs += project["optional-dependencies"][extra]
    return [req for req in map(Requirement, specs) if req.marker is None or req.marker.evaluate()]


def disagreements(pins: dict[str, str]) -> list[str]:
    """Each pyproject.toml dependency the lock leaves out or pins outside its range."""
    problems = []
    for req in project_requirements():
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name}: required by pyproject.toml ({req}) but not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}: the lock pins {version}, outside pyproject.toml's '{req.specifier}'")
    return problems


def write(path: Path) -> None:
    pins = installed()
    missing = disagreements(pins)
    if missing:
        raise SystemExit("lockfile: this environment does not satisfy pyproject.toml:\n  " + "\n  ".join(missing))
    Path(path).write_text(HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
    print(f"lockfile: {len(pins)} packages written to {path}")


def differences(pins: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, locked, installed) for every package whose installed version is not the locked one ('-' = absent)."""
    have = installed()
    rows = [(name, pins[name], have.get(name, "-")) for name in sorted(pins) if have.get(name, "-") != pins[name]]
    return rows + [(name, "-", have[name]) for name in sorted(set(have) - set(pins))]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check", "diff", "agree"):
        print(__doc__, file=sys.stderr)
        return 2
    command, path = argv[0], Path(argv[1])
    if command == "write":
        write(path)
        return 0
    pins = read_lock(path)
    if command == "agree":
        problems = disagreements(pins)
        for problem in problems:
            print(f"lockfile: {problem}", file=sys.stderr)
        return 1 if problems else 0
    rows = differences(pins)
    if command == "diff":
        print(f"lockfile: {len(rows)} package(s) differ from {path} (name: locked -> installed)")
        for name, locked, have in rows:
            print(f"  {name}: {locked} -> {have}")
        return 0
    wrong = [(name, locked, have) for name, locked, have in rows if locked != "-" and have != "-"]
    for name, locked, have in wrong:
        print(f"lockfile: {name} is {have}, the lock says {locked}", file=sys.stderr)
    absent = [name for name, locked, have in rows if have == "-"]
    if absent:  # platform-specific entries (e.g. a backport another Python needs) are not an error
        print(f"lockfile: locked but not installed here: {', '.join(absent)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
