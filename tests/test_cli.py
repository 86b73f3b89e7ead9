"""The command line: help text, wallet creation, and clear errors instead of tracebacks."""

import json
import subprocess
import sys
import pytest

from crypto.identity import Hotkey
from node.registry.genesis import Genesis, write_genesis
from protocol.membership import Member, Role


def sealmesh(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_explains_each_command():
    out = sealmesh("--help").stdout
    for command in ("wallet", "node", "testnet"):
        assert command in out
    node_help = sealmesh("node", "--help").stdout
    assert "--genesis" in node_help and "SIGINT/SIGTERM" in node_help


def test_wallet_create_then_show(tmp_path):
    created = sealmesh("wallet", "create", "--name", "w", "--hotkey", "h", "--path", str(tmp_path))
    assert created.returncode == 0, created.stderr
    shown = sealmesh("wallet", "show", "--name", "w", "--hotkey", "h", "--path", str(tmp_path))
    assert shown.stdout.strip() in created.stdout
    again = sealmesh("wallet", "create", "--name", "w", "--hotkey", "h", "--path", str(tmp_path))
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_node_refuses_a_hotkey_outside_the_mesh(tmp_path):
    sealmesh("wallet", "create", "--name", "w", "--hotkey", "h", "--path", str(tmp_path))
    write_genesis(tmp_path / "genesis.json", Genesis("m", (
        Member(Hotkey.from_uri("//Alice").ss58_address, frozenset({Role.VALIDATOR})),)))
    result = sealmesh("node", "--role", "miner", "--genesis", str(tmp_path / "genesis.json"),
                      "--wallet-name", "w", "--hotkey", "h", "--wallet-path", str(tmp_path),
                      "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert "not a member of mesh 'm'" in result.stderr and "Traceback" not in result.stderr


def test_node_errors_name_the_fix(tmp_path):
    no_wallet = sealmesh("node", "--role", "miner", "--genesis", str(tmp_path / "g.json"),
                         "--wallet-name", "nobody", "--wallet-path", str(tmp_path))
    assert no_wallet.returncode == 2 and "sealmesh wallet create" in no_wallet.stderr
    no_role = sealmesh("node", "--genesis", "x")
    assert no_role.returncode == 2 and "--role" in no_role.stderr
    (tmp_path / "bad.toml").write_text("role = [")
    bad_config = sealmesh("node", "--config", str(tmp_path / "bad.toml"))
    assert bad_config.returncode == 2 and "bad.toml" in bad_config.stderr


def test_committee_keygen_is_reachable_from_the_main_cli(capsys):
    from node.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["committee", "keygen", "--help"])
    assert exit_info.value.code == 0
    assert "--members" in capsys.readouterr().out
    assert main(["committee", "keygen", "--local", "3", "--out", "/nonexistent/x", "--bits", "7"]) != 0
