"""workerkit.errors: one root, families to catch, and a useful message with no arguments."""

from __future__ import annotations

import pytest

from workerkit import errors
from workerkit.errors import (
    ConfigurationError,
    IdempotencyError,
    JobError,
    JobInterrupted,
    ReleaseJob,
    SettingError,
    StoreError,
    StoreUnavailable,
    UnknownSetting,
    WorkerkitError,
)

#: Control flow, not errors: BaseExceptions, so that a task's ``except Exception`` lets them by.
CONTROL_FLOW = (JobInterrupted, ReleaseJob)
ERRORS = [getattr(errors, name) for name in errors.__all__]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: e.__name__)
def test_every_error_is_a_workerkit_error_and_control_flow_passes_except_exception(
    error: type[BaseException],
) -> None:
    if error in CONTROL_FLOW:
        assert not issubclass(error, Exception)
    else:
        assert issubclass(error, WorkerkitError)


def test_an_error_raised_bare_says_what_its_docstring_says() -> None:
    assert str(StoreUnavailable()) == (StoreUnavailable.__doc__ or "").strip()
    assert str(StoreUnavailable("db down")) == "db down"


def test_the_families_split_the_errors() -> None:
    families = (ConfigurationError, StoreError, JobError, IdempotencyError)
    assert issubclass(StoreUnavailable, StoreError)
    assert issubclass(UnknownSetting, SettingError)
    assert issubclass(SettingError, ConfigurationError)
    for family in families:
        assert [f for f in families if issubclass(family, f)] == [family]


def test_a_setting_error_names_the_setting_the_value_and_the_source() -> None:
    exc = SettingError("grace_period", "soon", "expected seconds", source="WORKERKIT_GRACE_PERIOD")
    assert (exc.key, exc.value, exc.accepted) == ("grace_period", "soon", "expected seconds")
    assert str(exc) == (
        "setting 'grace_period' (from WORKERKIT_GRACE_PERIOD): got 'soon'; expected seconds"
    )
    unknown = UnknownSetting("grace", "did you mean grace_period?", source="workerkit.toml")
    assert (
        str(unknown) == "unknown setting 'grace' (from workerkit.toml); did you mean grace_period?"
    )
    assert unknown.key == "grace"
