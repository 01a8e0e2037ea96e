"""A machine without PostgreSQL or Java skips the tests that need them, saying why; CI fails them."""

from __future__ import annotations

import pytest
from conftest import REQUIRE_SERVICES, missing_service


@pytest.mark.parametrize("required, outcome", [("", pytest.skip.Exception), ("1", pytest.fail.Exception)])
def test_a_missing_service_skips_with_its_reason_unless_ci_requires_it(required, outcome, monkeypatch):
    monkeypatch.setenv(REQUIRE_SERVICES, required)
    with pytest.raises(outcome, match="PostgreSQL is not installed: apt-get install postgresql"):
        missing_service("PostgreSQL is not installed: apt-get install postgresql")
