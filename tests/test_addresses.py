"""What a node announces (node/addresses.py): --announce-addr when given, else its listen
addresses with a wildcard expanded to interface addresses, never 0.0.0.0; and the
usage errors for addresses given by hand."""

from __future__ import annotations

import pytest

from node.addresses import AddressError, announced_addrs, check_announce_addr, interface_ips, with_peer_id
from node.cli import main

PEER = "12D3KooWQ77awTEpyGSzcPxrgNEuorGco2DVQ4TsPHwJr7TgN7tx"
OTHER = "12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X"


def test_an_announce_addr_replaces_the_listen_addresses_and_carries_the_peer_id():
    got = announced_addrs([f"/ip4/0.0.0.0/tcp/9000/p2p/{PEER}"], ("/ip4/203.0.113.7/tcp/4001",), PEER)
    assert got == [f"/ip4/203.0.113.7/tcp/4001/p2p/{PEER}"]
    assert announced_addrs([], (f"/dns4/node.example.org/tcp/9000/p2p/{PEER}",), PEER) == [
        f"/dns4/node.example.org/tcp/9000/p2p/{PEER}"]


def test_a_wildcard_listen_address_is_announced_as_the_interface_addresses():
    got = announced_addrs([f"/ip4/0.0.0.0/tcp/9000/p2p/{PEER}"], (), PEER)
    ips = interface_ips("ip4")
    assert ips and "127.0.0.1" in ips  # this machine lists its interfaces
    assert got == [f"/ip4/{ip}/tcp/9000/p2p/{PEER}" for ip in ips]
    assert not any("0.0.0.0" in a for a in got)
    assert got[-1].startswith("/ip4/127.")  # loopback last: peers on other machines try the others first


def test_a_concrete_listen_address_is_announced_as_is():
    assert announced_addrs([f"/ip4/10.88.0.1/tcp/9000/p2p/{PEER}"], (), PEER) == [f"/ip4/10.88.0.1/tcp/9000/p2p/{PEER}"]


@pytest.mark.parametrize("text, says", [
    ("0.0.0.0:9000", "not a multiaddr"),
    ("/ip4/0.0.0.0/tcp/9000", "wildcard"),
    ("/ip4/10.0.0.1", "no host and TCP port"),
    ("/tcp/9000", "not a multiaddr|no host"),
])
def test_bad_announce_addrs_are_refused_with_the_expected_form(text, says):
    with pytest.raises(AddressError, match=says) as info:
        check_announce_addr(text)
    assert "/ip4/203.0.113.7/tcp/9000" in str(info.value) or "wildcard" in str(info.value)


def test_an_announce_addr_naming_another_peer_is_refused():
    with pytest.raises(AddressError, match="names peer"):
        with_peer_id(f"/ip4/10.0.0.1/tcp/9000/p2p/{OTHER}", PEER)


def test_the_node_command_refuses_a_wildcard_announce_addr_in_one_line(tmp_path, capsys):
    code = main(["node", "--role", "trainer", "--data-dir", str(tmp_path), "--announce-addr", "/ip4/0.0.0.0/tcp/1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sealmesh: error: --announce-addr")


def test_the_node_command_refuses_a_bootstrap_without_peer_id_in_one_line(tmp_path, capsys):
    """Before: `--bootstrap /ip4/10.88.0.1/tcp/9000` ended in a 60-line traceback from the dialler."""
    code = main(["node", "--role", "trainer", "--data-dir", str(tmp_path), "--bootstrap", "/ip4/10.88.0.1/tcp/9000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "/p2p/" in err[0] and err[0].startswith("sealmesh: error:")
