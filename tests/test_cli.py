from __future__ import annotations

from typer.testing import CliRunner

from taskmill.cli import app


def test_serve_rejects_unparsable_database_url() -> None:
    result = CliRunner().invoke(app, ["serve", "--db", "garbage"])
    assert result.exit_code == 2
    assert "cannot open database 'garbage'" in result.output


def test_serve_rejects_unreachable_sqlite_file() -> None:
    result = CliRunner().invoke(app, ["serve", "--db", "sqlite:////no-such-dir/x.db"])
    assert result.exit_code == 2
    assert "unable to open database file" in result.output
