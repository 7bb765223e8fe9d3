"""The README's "Use the pieces" runs as written, on a copy of the checkout.

The blocks to run are marked in README.md with an HTML comment right above the fence
(invisible on the rendered page):

* ``<!-- readme-test: services -->``: every line is a command that serves in the
  foreground, each in its own terminal. The test starts them in order, in the background;
  after a line with ``--port N`` it waits until port N listens. A new ``services`` block
  first stops the previous one's processes (the README says to: the same ports).
* ``<!-- readme-test: commands -->``: every line runs in the foreground and must exit 0
  (while it runs, every background process must stay alive).
* ``<!-- readme-test: python -->``: the block runs with the venv's Python and must exit 0.

"A clean checkout": the tracked and untracked-but-not-ignored files are copied (mtimes
kept) to a temporary directory, which then has none of the build products. It gets the
venv, ``models/`` and ``data/`` of this checkout as symlinks (``make setup`` would download
and make the very same files), ``make setup`` then runs there (with the venv's stamp taken
as up to date: ``make -o .venv/.installed``) and must only generate the gRPC code, and
every command runs in it with ``PYTHONPATH`` pointing at its code. The commands use fixed
ports (8001, 50050, 50071, 6390): the test fails at once, saying so, when one is taken.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## Use the pieces"
BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\s*\n```\w*\n(.*?)```", re.S)
PORTS = (8001, 50050, 50071, 6390)
READY_S = 180.0
COMMAND_S = 300.0

pytestmark = pytest.mark.timeout(900)


def section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end != -1 else None]


def blocks() -> list[tuple[str, str]]:
    return [(kind, code) for kind, code in BLOCK.findall(section())]


def lines(code: str) -> list[str]:
    return [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_section_marks_what_the_test_runs():
    kinds = [k for k, _ in blocks()]
    assert set(kinds) <= {"services", "commands", "python"}, kinds
    assert kinds.count("services") == 2 and "python" in kinds and kinds[0] == "services", kinds
    # the one-line cluster, and both workers among the per-service lines
    assert lines(blocks()[0][1]) == ["pipeserve up"]
    per_service = " ".join(lines([c for k, c in blocks() if k == "services"][1]))
    assert "--task det" in per_service and "--task rec" in per_service
    # every fenced block of the section is either run or a sample of output
    fences = section().count("```") // 2
    assert fences == len(blocks()) + 1, "a fenced block in 'Use the pieces' is neither marked nor the status sample"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    for sub in ("models/ppocrv6", "data/eval/ground_truth.json", ".venv/bin/pipeserve"):
        if not (ROOT / sub).exists():
            pytest.fail(f"{ROOT / sub} is missing: run `make setup` first")
    dest = tmp_path_factory.mktemp("readme") / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():   # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for name in (".venv", "models", "data"):
        (dest / name).symlink_to(ROOT / name)
    out = subprocess.run(["make", "-o", ".venv/.installed", "setup"], cwd=dest, env=_env(dest),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # only the gRPC code was missing: nothing installed, no page or model made again
    assert "gen_proto.py" in out.stdout, out.stdout
    assert "pip install" not in out.stdout and "services.ocr.pages" not in out.stdout, out.stdout
    assert (dest / "services" / "gen" / "pipeserve_pb2.py").is_file()
    return dest


def _env(checkout: Path) -> dict[str, str]:
    """A terminal after `. .venv/bin/activate`, without this shell's pipeserve settings."""
    env = {k: v for k, v in os.environ.items()
           if k != "REDIS_URL" and not k.startswith("PIPESERVE_") and k != "PYTHONPATH"}
    venv = checkout / ".venv"
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               PYTHONPATH=str(checkout), PYTHONUNBUFFERED="1")
    return env


class Terminals:
    """The background 'terminals' of a services block."""

    def __init__(self, cwd: Path, logs: Path) -> None:
        self.cwd, self.logs = cwd, logs
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, line: str) -> None:
        log = self.logs / f"terminal-{len(list(self.logs.iterdir()))}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=self.cwd, env=_env(self.cwd),
                                 stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        self.procs.append((line, p, log))
        port = re.search(r"--port (\d+)", line)
        if port:
            deadline = time.monotonic() + READY_S
            while not listening(int(port.group(1))):
                self.check_alive()
                assert time.monotonic() < deadline, f"`{line}` does not listen on {port.group(1)}:\n{self.tail(log)}"
                time.sleep(0.2)

    @staticmethod
    def tail(log: Path) -> str:
        return log.read_text(errors="replace")[-3000:]

    def check_alive(self) -> None:
        for line, p, log in self.procs:
            assert p.poll() is None, f"`{line}` exited with {p.returncode}:\n{self.tail(log)}"

    def stop(self) -> dict[str, int]:
        """SIGTERM in reverse order (as Ctrl-C in each terminal), then wait."""
        codes = {}
        for line, p, log in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                codes[line] = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                codes[line] = p.wait()
        self.procs = []
        return codes

    def run(self, argv: list[str]) -> str:
        """A foreground command; the background ones must stay alive while it runs."""
        out = self.logs / f"command-{len(list(self.logs.iterdir()))}.log"
        with open(out, "wb") as f:
            p = subprocess.Popen(argv, cwd=self.cwd, env=_env(self.cwd), stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + COMMAND_S
        try:
            while p.poll() is None:
                self.check_alive()
                assert time.monotonic() < deadline, f"{argv} still running after {COMMAND_S}s"
                time.sleep(0.2)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        text = out.read_text(errors="replace")
        assert p.returncode == 0, f"{argv} exited with {p.returncode}:\n{text[-4000:]}"
        return text


def test_use_the_pieces_runs_as_written(checkout, tmp_path):
    taken = [p for p in PORTS if not port_free(p)]
    if taken:
        pytest.fail(f"ports {taken} are in use on this machine (a `pipeserve up` running?); "
                    "the README's commands use them")
    terms = Terminals(checkout, tmp_path)
    outputs: list[str] = []
    exits: dict[str, int] = {}
    try:
        for kind, code in blocks():
            if kind == "services":
                exits.update(terms.stop())
                for line in lines(code):
                    terms.start(line)
            elif kind == "commands":
                outputs += [terms.run(["bash", "-c", line]) for line in lines(code)]
            else:
                outputs.append(terms.run([str(checkout / ".venv" / "bin" / "python"), "-c", code]))
    finally:
        exits.update(terms.stop())
    assert all(code == 0 for code in exits.values()), f"unclean exits: {exits}"
    status = [o for o in outputs if o.startswith("pipeline ocr: controller")]
    assert len(status) == 2 and all("serving" in s and "plan v" in s for s in status), outputs
    assert "plan v" in status[1] and "Redis redis://127.0.0.1:6390/0" in status[1]
    [report] = [o for o in outputs if o.startswith("sent ")]
    sent = int(re.search(r"^sent\s+(\d+)", report, re.M).group(1))
    ok = int(re.search(r"^answered OK\s+(\d+)", report, re.M).group(1))
    assert sent > 0 and ok > 0, report
    # a busy machine may drop a request for its deadline; a wiring fault fails them all
    assert "UNAVAILABLE" not in report and "INTERNAL" not in report, report
    assert re.search(r"\(\d+, 8\)\s*$", outputs[-1]), outputs[-1]   # the client's lines and boxes
    # clean output: no solver banner (HiGHS prints one from C++ on its first use) in any log
    logs = list(tmp_path.glob("*.log")) + list((checkout / "runs").glob("up-*/*.log"))
    assert any(log.name == "controller.log" for log in logs)   # pipeserve up's, planner on
    for log in logs:
        text = log.read_text(errors="replace")
        assert not re.search(r"Running HiGHS|Copyright \(c\)|CVXPY\s+v\d", text), f"{log.name}: {text[:2000]}"
