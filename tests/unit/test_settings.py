from __future__ import annotations

import threading
from pathlib import Path

import pytest

from workerkit._settings_doc import render
from workerkit.errors import ConfigurationError, SettingError
from workerkit.settings import (
    MAX_SECONDS,
    Settings,
    load_settings,
    setting_specs,
    settings_to_env,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_come_from_one_place() -> None:
    settings = load_settings(env={}, cwd=ROOT / "tests")
    assert settings == Settings()
    assert settings.drain_window == 25
    assert settings.effective_heartbeat_interval == settings.effective_visibility_timeout / 3


def test_engine_default_visibility_timeouts() -> None:
    assert Settings(engine="sql").effective_visibility_timeout == 30
    assert Settings(engine="celery").effective_visibility_timeout == 3600
    assert Settings(engine="celery", visibility_timeout=7200).effective_visibility_timeout == 7200


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    (tmp_path / "workerkit.toml").write_text(
        "grace_period = 40\nrelease_margin = 7\nqueues = ['a']\n"
    )
    env = {"WORKERKIT_GRACE_PERIOD": "50"}
    settings = load_settings({"grace_period": "60"}, env=env, cwd=tmp_path)
    assert settings.grace_period == 60
    assert settings.release_margin == 7
    assert settings.queues == ("a",)
    assert load_settings(env=env, cwd=tmp_path).grace_period == 50
    assert load_settings(env={}, cwd=tmp_path).grace_period == 40


def test_pyproject_tool_table_is_read(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.workerkit]\nconcurrency = 4\n")
    assert load_settings(env={}, cwd=tmp_path).concurrency == 4


def test_explicit_config_file_wins_over_discovery(tmp_path: Path) -> None:
    (tmp_path / "workerkit.toml").write_text("concurrency = 4\n")
    (tmp_path / "prod.toml").write_text("concurrency = 8\n")
    assert load_settings(env={"WORKERKIT_CONFIG": "prod.toml"}, cwd=tmp_path).concurrency == 8
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(env={}, cwd=tmp_path, config_file="missing.toml")


def test_misspelled_config_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    (tmp_path / "workerkit.toml").write_text("grace_periode = 40\n")
    with pytest.raises(SettingError) as info:
        load_settings(env={}, cwd=tmp_path)
    message = str(info.value)
    assert "grace_periode" in message
    assert "did you mean 'grace_period'" in message
    assert "workerkit.toml" in message


def test_misspelled_environment_variable_is_refused() -> None:
    with pytest.raises(SettingError, match=r"WORKERKIT_GRACE_PERIODS.*grace_period"):
        load_settings(env={"WORKERKIT_GRACE_PERIODS": "10"}, cwd=ROOT / "tests")


def test_the_rq_serializer_variable_docs_recommend_is_not_refused_as_a_setting() -> None:
    # docs/engines/rq.md: WORKERKIT_RQ_SERIALIZER=safe-pickle, read by the RQ engine's options.
    env = {"WORKERKIT_RQ_SERIALIZER": "safe-pickle"}
    assert load_settings(env=env, cwd=ROOT / "tests") == Settings()


def test_kubernetes_service_link_variables_are_not_settings() -> None:
    env = {
        "WORKERKIT_SERVICE_HOST": "10.0.0.1",
        "WORKERKIT_PORT": "tcp://10.0.0.1:8080",
        "WORKERKIT_PORT_8080_TCP_ADDR": "10.0.0.1",
    }
    assert load_settings(env=env, cwd=ROOT / "tests") == Settings()


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("grace_period", "30s", "number of seconds"),
        ("grace_period", "0", "above 0"),
        ("grace_period", "nan", "finite"),
        ("prestop_delay", "-1", "at least 0"),
        ("concurrency", "two", "whole number"),
        ("concurrency", "0", "at least 1"),
        ("engine", "sidekiq", "'sql', 'rq', 'celery'"),
        ("strict", "maybe", "true or false"),
        ("http_port", "70000", "at most 65535"),
        ("queues", ",", "at least one name"),
        ("heartbeat_interval", "1e-7", "at least 0.1 (renewing leases more than 10 times"),
        ("poll_interval", "0.000001", "at least 0.01 (polling more than 100 times"),
        ("poll_interval", "3600", "at most 60 (an idle worker"),
        ("visibility_timeout", "0.5", "at least 1 (a shorter lease"),
        ("liveness_timeout", "1", "at least 3 (the worker reports every 2 s"),
        ("startup_timeout", "0.001", "at least 1"),
        ("job_timeout", "1e10", "at most 1e+09 (about 31 years"),
        ("grace_period", "1e12", "at most 1e+09"),
        ("database_url", "nonsense", "expected a SQLAlchemy URL, such as sqlite:///PATH"),
        ("database_url", "", "expected a SQLAlchemy URL"),
        ("database_url", "://host/db", "expected a SQLAlchemy URL"),
        ("database_url", "postgresql://u@h:notaport/db", "port is a number"),
        ("scheduler_namespace", "", "1 to 64 letters, digits"),
        ("scheduler_namespace", "my app", "1 to 64 letters, digits"),
        ("scheduler_namespace", "x" * 65, "1 to 64 letters, digits"),
        ("finished_job_retention", "-1", "at least 0"),
        ("finished_job_retention", "7d", "number of seconds"),
        ("failed_job_retention", "0", "above 0"),
    ],
)
def test_bad_values_name_the_setting_and_what_is_accepted(
    key: str, raw: str, expected: str
) -> None:
    var = "WORKERKIT_" + key.upper()
    with pytest.raises(SettingError) as info:
        load_settings(env={var: raw}, cwd=ROOT / "tests")
    message = str(info.value)
    assert repr(key) in message
    assert var in message
    assert expected in message


def test_retention_keeps_succeeded_jobs_a_week_and_failed_ones_until_purged() -> None:
    defaults = load_settings(env={}, cwd=ROOT / "tests")
    assert defaults.finished_job_retention == 604800.0
    assert defaults.failed_job_retention is None
    env = {"WORKERKIT_FINISHED_JOB_RETENTION": "0", "WORKERKIT_FAILED_JOB_RETENTION": "86400"}
    chosen = load_settings(env=env, cwd=ROOT / "tests")
    assert chosen.finished_job_retention == 0.0  # 0: off
    assert chosen.failed_job_retention == 86400.0


def test_every_default_is_inside_its_own_bounds() -> None:
    for spec in setting_specs():
        if spec.default is not None:
            assert spec.coerce(spec.default, "default") == spec.default, spec.name


def test_every_duration_has_a_ceiling_the_platforms_clock_can_wait_for() -> None:
    durations = [
        s for s in setting_specs() if isinstance(s.default, float) or s.symbol in ("V", "H", "Ip")
    ]
    assert durations
    for spec in durations:
        assert spec.maximum is not None, spec.name
        assert spec.maximum <= MAX_SECONDS < threading.TIMEOUT_MAX, spec.name


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///workerkit.sqlite3",
        "sqlite:////var/lib/q.db",
        "postgres://u:pw@db:5432/q",  # the sql engine reads it as postgresql+psycopg
        "postgresql://u@db/q",
        "postgresql+psycopg://u:pw@[::1]:5432/q?sslmode=require",
    ],
)
def test_database_urls_sqlalchemy_can_parse_are_accepted(url: str) -> None:
    settings = load_settings(env={"WORKERKIT_DATABASE_URL": url}, cwd=ROOT / "tests")
    assert settings.database_url == url


def test_a_refused_database_url_does_not_show_its_password() -> None:
    with pytest.raises(SettingError) as info:
        load_settings(
            env={"WORKERKIT_DATABASE_URL": "postgresql://app:s3cret@db:port/q"},
            cwd=ROOT / "tests",
        )
    assert "s3cret" not in str(info.value)
    assert "postgresql://app:***@db:port/q" in str(info.value)


def test_wrong_toml_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "workerkit.toml").write_text('concurrency = "lots"\n')
    with pytest.raises(SettingError, match=r"'concurrency'.*whole number"):
        load_settings(env={}, cwd=tmp_path)


def test_settings_round_trip_through_the_environment() -> None:
    settings = load_settings(
        {"queues": "a,b", "visibility_timeout": "12", "strict": "true"},
        env={},
        cwd=ROOT / "tests",
    )
    assert load_settings(env=settings_to_env(settings), cwd=ROOT / "tests") == settings


def test_replace_checks_values() -> None:
    assert Settings().replace(grace_period=60).grace_period == 60
    with pytest.raises(SettingError):
        Settings().replace(grace_period=-1)


def test_every_setting_has_help_and_a_documented_variable() -> None:
    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    for spec in setting_specs():
        assert spec.help
        assert f"`{spec.env_var}`" in page


def test_settings_reference_page_is_up_to_date() -> None:
    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    assert page == render(), "run: python -m workerkit._settings_doc > docs/reference/settings.md"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("LEADER_LEASE", "scheduler_lease_duration"),
        ("RENEW_DEADLINE", "scheduler_renew_deadline"),
        ("RETRY_PERIOD", "scheduler_retry_period"),
    ],
)
def test_a_renamed_scheduler_setting_names_its_new_name(old: str, new: str) -> None:
    with pytest.raises(ConfigurationError, match=f"did you mean '{new}'"):
        load_settings(env={f"WORKERKIT_{old}": "5"}, cwd=Path("/nonexistent"))


def test_the_scheduler_settings_have_their_documented_defaults() -> None:
    s = load_settings(env={}, cwd=Path("/nonexistent"))
    assert (
        s.scheduler_lease_duration,
        s.scheduler_renew_deadline,
        s.scheduler_retry_period,
        s.scheduler_standby_delay,
        s.scheduler_misfire_grace,
        s.scheduler_retention,
    ) == (15.0, 10.0, 2.0, 0.5, 2.0, 604800.0)


def test_scheduler_namespace_defaults_to_default_and_is_read_from_the_environment() -> None:
    assert load_settings(env={}, cwd=ROOT / "tests").scheduler_namespace == "default"
    env = {"WORKERKIT_SCHEDULER_NAMESPACE": "billing.v2"}
    assert load_settings(env=env, cwd=ROOT / "tests").scheduler_namespace == "billing.v2"
