"""`sealmesh mesh init|add-member|add-bootstrap|show` through node.cli.main, and the
bootstrap rule of genesis files (issue 12: the genesis file by command, not by hand)."""

from __future__ import annotations

import json
import sys

import pytest

from crypto.identity import Hotkey
from node.cli import main
from node.registry.genesis import GenesisError, check_bootstrap_addr, load_genesis, parse_genesis
from protocol.membership import Role

ALICE = Hotkey.from_uri("//Alice").ss58_address
BOB = Hotkey.from_uri("//Bob").ss58_address
PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
OTHER_PEER = "12D3KooWMxND6qMSY9qD4Y5nHCg6JPnv2ntCqxMu3TEMpgmSYmm5"
ADDR = f"/ip4/10.88.0.1/tcp/9000/p2p/{PEER}"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["mesh", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(capsys, hint: str, *argv: str) -> str:
    """Exit 2, one line on stderr saying `sealmesh: error: ...` with `hint` in it."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (out, err)
    assert err.startswith("sealmesh: error: ") and err.count("\n") == 1, err
    assert hint in err, err
    return err


@pytest.fixture
def genesis(tmp_path, capsys):
    """A genesis file with Alice (validator, trainer) and one bootstrap address."""
    path = tmp_path / "genesis.json"
    assert run(capsys, "init", "--mesh-id", "lab-1", "--out", str(path))[0] == 0
    assert run(capsys, "add-member", str(path), "--hotkey", ALICE, "--roles", "validator,trainer",
               "--stake", "10", "--name", "alice")[0] == 0
    assert run(capsys, "add-bootstrap", str(path), ADDR)[0] == 0
    return path


# --- init ---------------------------------------------------------------------------


def test_init_writes_an_empty_genesis_that_loads(tmp_path, capsys):
    path = tmp_path / "sub" / "genesis.json"
    rc, out, _ = run(capsys, "init", "--mesh-id", "lab-1", "--out", str(path))
    assert rc == 0 and "add-member" in out
    assert json.loads(path.read_text()) == {"mesh_id": "lab-1", "members": [], "bootstrap": []}
    assert load_genesis(path).mesh_id == "lab-1"
    assert list(path.parent.iterdir()) == [path]  # written then renamed: no .tmp left behind


def test_init_refuses_to_overwrite_without_force(genesis, capsys):
    before = genesis.read_bytes()
    assert_refused(capsys, "--force", "init", "--mesh-id", "other", "--out", str(genesis))
    assert genesis.read_bytes() == before
    assert run(capsys, "init", "--mesh-id", "other", "--out", str(genesis), "--force")[0] == 0
    assert load_genesis(genesis).mesh_id == "other" and load_genesis(genesis).members == ()


def test_init_refuses_a_bad_mesh_id(tmp_path, capsys):
    assert_refused(capsys, "mesh_id must be", "init", "--mesh-id", "bad id!", "--out", str(tmp_path / "g.json"))
    assert not (tmp_path / "g.json").exists()


# --- add-member ---------------------------------------------------------------------


def test_add_member_writes_hotkey_roles_stake_and_name(genesis, capsys):
    rc, out, _ = run(capsys, "add-member", str(genesis), "--hotkey", BOB, "--roles", "trainer, miner",
                     "--stake", "2.5")
    assert rc == 0 and "2 members" in out
    doc = json.loads(genesis.read_text())
    assert doc["members"][0] == {"hotkey": ALICE, "roles": ["trainer", "validator"], "stake": 10.0,
                                 "name": "alice"}
    assert doc["members"][1] == {"hotkey": BOB, "roles": ["miner", "trainer"], "stake": 2.5}
    loaded = load_genesis(genesis)
    assert loaded.directory.member(BOB).roles == {Role.TRAINER, Role.MINER}
    assert loaded.directory.member(ALICE).stake == 10.0 and loaded.name_of(ALICE) == "alice"


@pytest.mark.parametrize("flags, hint", [
    (["--hotkey", ALICE, "--roles", "trainer", "--stake", "1"], "already a member"),
    (["--hotkey", "5notanaddress", "--roles", "trainer", "--stake", "1"], "not an SS58 address"),
    (["--hotkey", ALICE[:-1] + ("a" if ALICE[-1] != "a" else "b"), "--roles", "trainer", "--stake", "1"],
     "not an SS58 address"),  # one character off: the checksum catches it
    (["--hotkey", BOB, "--roles", "trainer,king", "--stake", "1"], "unknown role 'king'"),
    (["--hotkey", BOB, "--roles", ",", "--stake", "1"], "--roles is empty"),
    (["--hotkey", BOB, "--roles", "trainer", "--stake", "-1"], "non-negative"),
    (["--hotkey", BOB, "--roles", "trainer", "--stake", "ten"], "not a number"),
    (["--hotkey", BOB, "--roles", "trainer", "--stake", "inf"], "non-negative number"),
    (["--hotkey", BOB, "--roles", "trainer", "--stake", "1", "--name", "alice"], "already taken"),
])
def test_add_member_refuses_a_bad_edit_and_leaves_the_file(genesis, capsys, flags, hint):
    before = genesis.read_bytes()
    assert_refused(capsys, hint, "add-member", str(genesis), *flags)
    assert genesis.read_bytes() == before


def test_unknown_role_message_lists_the_roles(genesis, capsys):
    err = assert_refused(capsys, "king", "add-member", str(genesis), "--hotkey", BOB, "--roles", "king",
                         "--stake", "1")
    assert "trainer, validator, miner" in err


# --- add-bootstrap ------------------------------------------------------------------


@pytest.mark.parametrize("addr", [
    f"/ip6/2001:db8::7/tcp/9000/p2p/{OTHER_PEER}",
    f"/dns4/node.example.org/tcp/9000/p2p/{OTHER_PEER}",
    f"/dns6/node.example.org/tcp/9000/p2p/{OTHER_PEER}",
    f"/dns/node.example.org/tcp/9000/p2p/{OTHER_PEER}",
])
def test_add_bootstrap_takes_every_host_form(genesis, capsys, addr):
    rc, out, _ = run(capsys, "add-bootstrap", str(genesis), addr)
    assert rc == 0 and f"added bootstrap {addr}" in out
    assert load_genesis(genesis).bootstrap == (ADDR, addr)


@pytest.mark.parametrize("addr, hint", [
    ("/ip4/10.88.0.1/tcp/9000", "/ip4/1.2.3.4/tcp/9000/p2p/12D3KooW"),  # the expected form is shown
    ("/ip4/10.88.0.1/tcp/9000", "no peer id"),
    ("10.88.0.1:9000", "not a multiaddr"),
    ("/ip4/300.1.1.1/tcp/9000/p2p/" + PEER, "not a multiaddr"),
    ("/ip4/10.88.0.1/tcp/9000/p2p/x", "not a multiaddr"),
    (f"/ip4/10.88.0.1/udp/9000/p2p/{PEER}", "no host and TCP port"),
    (f"/p2p/{PEER}", "no host and TCP port"),
    (ADDR, "already listed"),
    (f"/ip4/10.88.0.1/tcp/9000/p2p/{PEER}/", "already listed"),  # the same address, written differently
])
def test_add_bootstrap_refuses_a_bad_address_and_leaves_the_file(genesis, capsys, addr, hint):
    before = genesis.read_bytes()
    assert_refused(capsys, hint, "add-bootstrap", str(genesis), addr)
    assert genesis.read_bytes() == before


def _ready(tmp_path, addrs, peer_id=OTHER_PEER):
    node_dir = tmp_path / "node"
    node_dir.mkdir(exist_ok=True)
    (node_dir / "ready.json").write_text(json.dumps(
        {"hotkey": BOB, "peer_id": peer_id, "addrs": addrs, "api_port": 8080, "pid": 1}))
    return node_dir / "ready.json"


def test_add_bootstrap_from_ready_json_skips_wildcards_and_loopback(genesis, tmp_path, capsys):
    ready = _ready(tmp_path, ["/ip4/0.0.0.0/tcp/9001", f"/ip4/127.0.0.1/tcp/9001/p2p/{OTHER_PEER}",
                              "/ip4/192.168.1.20/tcp/9001", f"/ip6/::/tcp/9001/p2p/{OTHER_PEER}",
                              "/ip6/::1/tcp/9001"])
    assert run(capsys, "add-bootstrap", str(genesis), str(ready))[0] == 0
    assert load_genesis(genesis).bootstrap == (ADDR, f"/ip4/192.168.1.20/tcp/9001/p2p/{OTHER_PEER}")


def test_add_bootstrap_from_ready_json_keeps_loopback_when_it_is_all_there_is(genesis, tmp_path, capsys):
    ready = _ready(tmp_path, ["/ip4/127.0.0.1/tcp/9001", "/ip4/0.0.0.0/tcp/9001", "/ip6/::1/tcp/9001"])
    assert run(capsys, "add-bootstrap", str(genesis), str(ready.parent))[0] == 0  # the data dir works too
    assert load_genesis(genesis).bootstrap == (ADDR, f"/ip4/127.0.0.1/tcp/9001/p2p/{OTHER_PEER}",
                                               f"/ip6/::1/tcp/9001/p2p/{OTHER_PEER}")
    # the same ready.json again adds nothing: refused as a duplicate
    assert_refused(capsys, "already listed", "add-bootstrap", str(genesis), str(ready))


@pytest.mark.parametrize("addrs, peer_id, hint", [
    (["/ip4/0.0.0.0/tcp/9001", "/ip6/::/tcp/9001"], OTHER_PEER, "--announce-addr"),
    ([f"/ip4/10.0.0.2/tcp/9001/p2p/{PEER}"], OTHER_PEER, "names another peer"),
    (["/ip4/10.0.0.2/tcp/9001"], "x", "not a multiaddr"),
    ("not a list", OTHER_PEER, "not a node's ready.json"),
])
def test_add_bootstrap_refuses_a_ready_json_without_a_dialable_address(
        genesis, tmp_path, capsys, addrs, peer_id, hint):
    ready = _ready(tmp_path, addrs, peer_id)
    before = genesis.read_bytes()
    assert_refused(capsys, hint, "add-bootstrap", str(genesis), str(ready))
    assert genesis.read_bytes() == before


def test_add_bootstrap_refuses_a_missing_or_broken_ready_json(genesis, tmp_path, capsys):
    assert_refused(capsys, "not found", "add-bootstrap", str(genesis), str(tmp_path / "nowhere" / "ready.json"))
    (tmp_path / "ready.json").write_text("{")
    assert_refused(capsys, "not a node's ready.json", "add-bootstrap", str(genesis), str(tmp_path / "ready.json"))


def test_a_ready_json_from_a_real_host_lets_another_host_bootstrap(tmp_path, capsys):
    """End to end: a listening py-libp2p host's own addresses, through ready.json and the
    commands, into a genesis file whose bootstrap list another host dials."""
    import trio

    from node.mesh import Mesh, MeshConfig

    path = tmp_path / "genesis.json"
    assert run(capsys, "init", "--mesh-id", "e2e", "--out", str(path))[0] == 0

    async def scenario() -> None:
        with trio.fail_after(30):
            await dial_through_the_genesis_file()

    async def dial_through_the_genesis_file() -> None:
        async with Mesh.open(MeshConfig("e2e"), bytes([1]) * 32) as first:
            ready = _ready(tmp_path, ["/ip4/0.0.0.0/tcp/1", *first.listen_addrs], first.peer_id)
            assert run(capsys, "add-bootstrap", str(path), str(ready))[0] == 0
            bootstrap = load_genesis(path).bootstrap
            assert bootstrap and all(a.endswith(f"/p2p/{first.peer_id}") for a in bootstrap)
            async with Mesh.open(MeshConfig("e2e", bootstrap=bootstrap, bootstrap_timeout_s=10),
                                 bytes([2]) * 32) as second:
                assert first.peer_id in second.connected_peers()

    trio.run(scenario)


# --- show, and files that are missing or bad ------------------------------------------


def test_show_prints_a_summary_and_json(genesis, capsys):
    run(capsys, "add-member", str(genesis), "--hotkey", BOB, "--roles", "miner", "--stake", "0.5")
    rc, out, _ = run(capsys, "show", str(genesis))
    assert rc == 0
    assert out.splitlines()[0] == "mesh lab-1: 2 members, 1 bootstrap address"
    alice_row = next(line for line in out.splitlines() if "alice" in line)
    assert alice_row.split() == ["alice", "trainer,validator", "10", f"{ALICE[:6]}...{ALICE[-4:]}"]
    bob_row = next(line for line in out.splitlines() if BOB[:6] in line)
    assert bob_row.split() == ["-", "miner", "0.5", f"{BOB[:6]}...{BOB[-4:]}"]
    assert f"  {ADDR}" in out.splitlines()
    rc, out, _ = run(capsys, "show", str(genesis), "--json")
    assert rc == 0 and json.loads(out) == json.loads(genesis.read_text())


def test_show_says_when_there_is_no_bootstrap(tmp_path, capsys):
    path = tmp_path / "g.json"
    run(capsys, "init", "--mesh-id", "m", "--out", str(path))
    out = run(capsys, "show", str(path))[1]
    assert "0 members, 0 bootstrap addresses" in out and "add-bootstrap" in out


@pytest.mark.parametrize("argv", [
    ["show"], ["add-member", "--hotkey", BOB, "--roles", "trainer", "--stake", "1"], ["add-bootstrap", ADDR]])
def test_a_missing_or_invalid_genesis_file_is_one_line(tmp_path, capsys, argv):
    action, *rest = argv
    missing = tmp_path / "missing.json"
    assert_refused(capsys, "sealmesh mesh init", action, str(missing), *rest)
    assert not missing.exists()
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert_refused(capsys, "not valid JSON", action, str(broken), *rest)
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"mesh_id": "m", "members": [], "bootstrap": ["/ip4/1.2.3.4/tcp/9000"]}))
    assert_refused(capsys, "bootstrap[0]", action, str(invalid), *rest)


# --- the bootstrap rule of genesis files ----------------------------------------------


def test_parse_genesis_refuses_a_bootstrap_without_peer_id_or_twice():
    doc = {"mesh_id": "m", "members": [], "bootstrap": ["/ip4/10.88.0.1/tcp/9000"]}
    with pytest.raises(GenesisError, match=r"bootstrap\[0\].*no peer id.*/tcp/9000/p2p/"):
        parse_genesis(doc)
    with pytest.raises(GenesisError, match="listed twice"):
        parse_genesis({**doc, "bootstrap": [ADDR, ADDR]})
    assert parse_genesis({**doc, "bootstrap": [ADDR]}).bootstrap == (ADDR,)


def test_check_bootstrap_addr_without_the_multiaddr_package(monkeypatch):
    """The strict regex fallback refuses and accepts the same common cases."""
    monkeypatch.setitem(sys.modules, "multiaddr", None)  # `import multiaddr` now raises ImportError
    assert check_bootstrap_addr(f" {ADDR} ") == ADDR
    assert check_bootstrap_addr(f"/dns4/a.example/tcp/1/p2p/{PEER}").startswith("/dns4/")
    for bad, hint in [("/ip4/10.88.0.1/tcp/9000", "no peer id"), ("garbage", "not a multiaddr"),
                      (f"/ip4/1.2.3.4/tcp/70000/p2p/{PEER}", "not a multiaddr"),
                      ("/ip4/1.2.3.4/tcp/1/p2p/0OIl", "not a multiaddr"), ("", "empty")]:
        with pytest.raises(GenesisError, match=hint):
            check_bootstrap_addr(bad)
