"""The hostile-input suite (cases generated in ``hostile_cases.py``; counts and messages in
docs/hardening.md): every case must be handled as a user expects."""

from __future__ import annotations

import pytest

import cli_child
from hostile_cases import CASES


@pytest.fixture(autouse=True)
def fake_towers():
    with cli_child.towers_registered():
        yield


def test_the_suite_is_wide():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_handled(case, tmp_path):
    outcome = case.run(tmp_path)
    assert outcome.handled, f"{case.what}: {outcome.message}\n{outcome.detail}"
