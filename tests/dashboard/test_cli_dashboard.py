"""`oppsync dashboard`: a bad configuration fails before Streamlit starts; a good one becomes Streamlit (exec,
so signals reach the server) serving the page's script with the same configuration file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oppsync_pipeline import cli


def test_a_bad_configuration_is_reported_with_its_key_and_nothing_starts(tmp_path: Path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(os, "execve", lambda *a: started.append(a))
    bad = tmp_path / "oppsync.yaml"
    bad.write_text("teams:\n  East: [nobody]\n", encoding="utf-8")
    assert cli.main(["dashboard", "--config", str(bad)]) == 2
    assert "teams.East[0]: 'nobody' is not a user id" in capsys.readouterr().err
    assert started == []


def test_the_page_gets_the_configuration_and_the_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, cmd, env: calls.append((cmd, env)))
    good = tmp_path / "oppsync.yaml"
    good.write_text("warehouse: {url: 'duckdb:///w.duckdb'}\n", encoding="utf-8")
    assert cli.main(["dashboard", "--config", str(good), "--port", "8765"]) == 0
    ((cmd, env),) = calls
    app = Path(cmd[cmd.index("run") + 1])
    assert app.name == "app.py" and app.is_file()
    assert cmd[cmd.index("--server.port") + 1] == "8765" and cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert env["OPPSYNC_CONFIG"] == str(good.resolve())
