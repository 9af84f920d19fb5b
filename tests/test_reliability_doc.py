"""docs/reliability.md lists every fault test: regenerate it (run the suite) when you add one."""

from __future__ import annotations

from conftest import RELIABILITY_DOC, fault_descriptions


def test_every_fault_test_is_in_the_reliability_document():
    faults = fault_descriptions()
    if not any(node.startswith("tests/test_faults.py") for node in faults):
        return  # a partial run that did not collect the fault suite: nothing to compare
    doc = RELIABILITY_DOC.read_text()
    missing = [f"{text} ({node})" for node, text in faults.items() if f"`{node.split('::')[-1]}`".replace("|", "\\|") not in doc]
    assert not missing, f"docs/reliability.md is out of date; run `python -m pytest -q` and commit it. Missing: {missing}"
