"""The hostile-input suite: generated cases a hostile (or unlucky) user throws at atae, each with the
outcome a user should see. `test_hostile_suite.py` runs them; `python tests/hostile_cases.py` prints the
table of docs/hardening.md (tried / handled / with what message).

A case is handled when its entry point (``index``, ``search``, ``prune``, ``extract``, the web server)
* never prints a traceback or a character a terminal acts on (everything printed is escaped),
* refuses with one line naming the file and the fix (exit 2, or a 4xx JSON error with a fix), or skips
  and reports the input while a long job goes on with the rest, or accepts input that is valid;
* and the outcome is the one expected for the case (e.g. a header with a 1 Hz rate is refused, a silent
  file is indexed).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # ATAE_TEST_SRC: another tree's src, e.g. to count what an older atae handled
    sys.path[:0] = [os.environ.get("ATAE_TEST_SRC", str(HERE.parent / "src")), str(HERE)]

from hostile_inputs_files import (  # noqa: E402
    AUDIO,
    LINKS,
    NAMES,
    PERMS,
    index_case,
    links_case,
    name_case,
    perm_case,
    search_audio_case,
)
from hostile_inputs_states import EXTRACT, HTTP, STATES, extract_case, http_case, state_case  # noqa: E402
from hostile_run import Case, Outcome  # noqa: E402


def _cases() -> list[Case]:
    out = []
    for cid, what, make, expect in AUDIO:
        out.append(
            Case(
                f"index-{cid}",
                "audio headers, rates, lengths (`index`)",
                what,
                index_case(make, "indexed" if expect == "accepted" else "failed"),
            )
        )
        out.append(
            Case(
                f"search-{cid}",
                "audio headers, rates, lengths (`search --audio`)",
                what,
                search_audio_case(make, "answered" if expect == "accepted" else "refused"),
            )
        )
    for cid, what, make, expect in LINKS:
        out.append(Case(f"link-{cid}", "links, pipes, devices (`index`)", what, links_case(make, expect)))
    for cid, what, name in NAMES:
        out.append(
            Case(
                cid, "file names (`index`, `search` table/JSON/--paths-only/--print0)", what, name_case(name)
            )
        )
    for cid, what, setup, args_of, expect in PERMS:
        out.append(
            Case(f"perm-{cid}", "permissions (real denials)", what, perm_case(setup, args_of, expect))
        )
    for cid, what, setup, commands, expect, needle in STATES:
        out.append(
            Case(
                f"state-{cid}",
                "library states (`search`, `prune`, `index`)",
                what,
                state_case(setup, commands, expect, needle),
            )
        )
    for cid, what, rows, expect, needle in EXTRACT:
        out.append(
            Case(f"extract-{cid}", "dataset files (`extract`)", what, extract_case(rows, expect, needle))
        )
    for row in HTTP:
        cid, what, request, expect = row[:4]
        out.append(
            Case(
                f"http-{cid}",
                "HTTP requests (`serve`)",
                what,
                http_case(request, expect, row[4] if len(row) > 4 else None),
            )
        )
    return out


CASES = _cases()


def markdown_table(results: list[tuple[Case, Outcome]]) -> str:
    cats: dict[str, list] = {}
    for case, o in results:
        cats.setdefault(case.category, []).append((case, o))
    lines = ["| inputs | tried | handled |", "| --- | --- | --- |"]
    for cat, rows in cats.items():
        lines.append(f"| {cat} | {len(rows)} | {sum(o.handled for _, o in rows)} |")
    lines.append(f"| **all** | **{len(results)}** | **{sum(o.handled for _, o in results)}** |")
    lines += ["", "| case | input | handled | what the user sees |", "| --- | --- | --- | --- |"]
    for case, o in results:
        msg = o.message.replace("|", "\\|").replace("`", "'")
        lines.append(
            f"| `{case.id}` | {case.what.replace('|', '/')} | {'yes' if o.handled else '**no**'} | {msg} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    import cli_child

    cli_child.register()
    results = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as t:
            with contextlib.redirect_stderr(io.StringIO()):
                try:
                    o = case.run(Path(t))
                except KeyboardInterrupt:
                    raise
                except BaseException as e:  # noqa: BLE001 - a skip or a crash: reported as not handled
                    o = Outcome(False, f"{type(e).__name__}: {e}"[:150])
            results.append((case, o))
    print(markdown_table(results))
