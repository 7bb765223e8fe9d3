"""Install Triton's perf_analyzer for the tests and by hand (``make perf-tools``).

1. a virtual environment of its own (default ``.venv-perf``) with the ``perf`` extra of
   pyproject.toml: the tritonclient 2.51.0 wheel (it ships the perf_analyzer binary, and
   pins numpy < 2 and protobuf < 5, so it cannot live in the project's ``.venv``) and the
   CUDA runtime library the binary links (no GPU needed);
2. Debian's ``libb64-0d``, which the binary links too, with apt-get when it is missing
   (as root, or through ``sudo -n``; otherwise it says what to run);
3. a check that the binary starts (``perf_analyzer --version``).

Run it with the project's virtual environment's Python (it reads pyproject.toml).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LIBB64 = "libb64-0d"


def requirements(extra: str = "perf") -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    try:
        return list(project["optional-dependencies"][extra])
    except KeyError:
        raise SystemExit(f"pyproject.toml has no extra {extra!r}") from None


def run(cmd: list[str], **kw) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def has_libb64() -> bool:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True)
    return "libb64.so.0d" in out.stdout


def install_libb64() -> None:
    if has_libb64():
        return
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        raise SystemExit(f"perf_analyzer needs Debian's {LIBB64}; run as root: "
                         f"apt-get install -y {LIBB64}")
    if not shutil.which("apt-get"):
        raise SystemExit(f"perf_analyzer needs {LIBB64} (libb64.so.0d) and this system has no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run([*prefix, "apt-get", "update", "-qq"], env=env)
    run([*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", LIBB64], env=env)
    if not has_libb64():
        raise SystemExit(f"{LIBB64} is installed but libb64.so.0d is not in the linker cache")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-perf",
                   help="virtual environment to install into (default .venv-perf)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that creates the environment (default: this one)")
    a = p.parse_args(argv)
    venv = a.venv if a.venv.is_absolute() else ROOT / a.venv
    if not (venv / "bin" / "python").exists():
        run([a.python, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         *requirements()])
    install_libb64()
    sys.path.insert(0, str(ROOT))
    from services.tools.perf_analyzer import PerfAnalyzerMissing, find_perf_analyzer

    os.environ.pop("PERF_ANALYZER", None)   # check the one installed here
    try:
        pa = find_perf_analyzer(venv)
    except PerfAnalyzerMissing as exc:
        raise SystemExit(f"error: {exc}") from None
    version = subprocess.run([str(pa.path), "--version"], env=pa.env, capture_output=True, text=True)
    print(f"{pa.path}: {(version.stdout + version.stderr).strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
