"""`python tests/cli_child.py ARGS...` runs the `atae` command in a process of its own with the small
fake towers of ``library_fakes`` registered as ``bands`` (audio) and ``words`` (text): for tests that need
a real process (kill -9 at random points, dropped privileges, a private mount with a full disk).

`python tests/cli_child.py --zygote` imports everything once, then runs each command it is sent in a
forked process (``Zygote``): a command killed at a random point then costs its work, not the imports.
``ATAE_TEST_DELAY`` (seconds per encoded clip) slows the audio tower so a kill lands inside the work, and
``ATAE_TEST_LOAD`` (seconds) its construction, as loading real weights does;
``ATAE_TEST_SRC`` names the ``src`` folder to import atae from (``child_env()`` sets it to the parent's);
``ATAE_TEST_TORCH_THREADS`` imports torch (with that many threads) before the child says "ready", so the
time after "ready" is the command's own work.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    sys.path[:0] = [os.environ.get("ATAE_TEST_SRC", str(HERE.parent / "src")), str(HERE)]

from atae.towers import registry  # noqa: E402
from library_fakes import BandTower, WordTower  # noqa: E402


class Bands(BandTower):
    def __init__(self, weights=None, **kwargs):
        super().__init__(delay=float(os.environ.get("ATAE_TEST_DELAY", "0")))
        time.sleep(float(os.environ.get("ATAE_TEST_LOAD", "0")))


class Words(WordTower):
    def __init__(self, model=None, weights=None, **kwargs):
        pass


def register() -> None:
    registry.AUDIO_TOWERS.setdefault("bands", "cli_child:Bands")
    registry.TEXT_TOWERS.setdefault("words", "cli_child:Words")


@contextlib.contextmanager
def towers_registered():
    """The fake towers registered for the block only (a test must not change the registry for others)."""
    tables = ((registry.AUDIO_TOWERS, "bands"), (registry.TEXT_TOWERS, "words"))
    added = [(t, k) for t, k in tables if k not in t]
    register()
    try:
        yield
    finally:
        for table, key in added:
            table.pop(key, None)


def child_env(**extra) -> dict:
    """Environment for ``python cli_child.py``: the atae this process imported, plus ``extra``."""
    import atae

    return {**os.environ, "ATAE_TEST_SRC": str(Path(atae.__file__).resolve().parents[1]),
            **{k: str(v) for k, v in extra.items()}}

class Zygote:
    """A warm process that forks one `atae` command per ``start``; the caller kills it at will and
    ``reap``s it (the zygote waits for it only then, so its pid is never reused before the kill)."""

    def __init__(self, **env):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=child_env(**env))
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, args, log, **env) -> int:
        import json

        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in args], "log": str(log),
                                          "env": {k: str(v) for k, v in env.items()}}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def reap(self) -> int:
        """The command's exit code (negative: killed by that signal)."""
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _zygote() -> None:
    import json

    import matplotlib.figure  # noqa: F401 - everything a command imports, once
    import safetensors.torch  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401 - imported by the first optimiser

    import atae.features  # noqa: F401
    import atae.library  # noqa: F401
    import atae.train  # noqa: F401
    import atae.tuning  # noqa: F401
    from atae.cli import main

    torch.set_num_threads(int(os.environ.get("ATAE_TEST_TORCH_THREADS", "1")))
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.environ.update(req["env"])
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 1
            try:
                main(req["argv"], prog_name="atae")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        assert sys.stdin.readline().strip() == "reap"
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    register()
    if sys.argv[1:] == ["--zygote"]:
        _zygote()
        sys.exit(0)
    from atae.cli import main

    print("ready", flush=True)
    main(sys.argv[1:], prog_name="atae")
