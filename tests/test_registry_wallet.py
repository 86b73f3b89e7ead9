"""Wallet files in btcli's layout, genesis files, metagraph mapping, node settings."""

import json

import pytest
from bittensor_wallet import Wallet

from node.registry.genesis import GenesisError, load_genesis, parse_genesis, write_genesis
from node.registry.metagraph import members_from_neurons
from node.settings import SettingsError, load_settings
from node.wallet import WalletError, create_hotkey, hotkey_path, load_hotkey
from protocol.membership import Role


def test_hotkey_made_here_loads_with_bittensor_wallet(tmp_path):
    hotkey = create_hotkey("alice", "hot", tmp_path)
    assert hotkey_path("alice", "hot", tmp_path).exists()
    wallet = Wallet(name="alice", hotkey="hot", path=str(tmp_path))
    assert wallet.hotkey.ss58_address == hotkey.ss58_address


def test_hotkey_made_by_bittensor_wallet_loads_here_and_signs(tmp_path):
    wallet = Wallet(name="bob", hotkey="hk", path=str(tmp_path))
    wallet.create_new_hotkey(n_words=12, use_password=False, overwrite=False, suppress=True)
    hotkey = load_hotkey("bob", "hk", tmp_path)
    assert hotkey.ss58_address == wallet.hotkey.ss58_address
    assert wallet.hotkey.verify(b"m", hotkey.sign(b"m"))


def test_wallet_errors_say_what_to_do(tmp_path):
    with pytest.raises(WalletError, match="sealmesh wallet create"):
        load_hotkey("nobody", "none", tmp_path)
    create_hotkey("a", "b", tmp_path)
    with pytest.raises(WalletError, match="--overwrite"):
        create_hotkey("a", "b", tmp_path)


def _genesis_doc(**over):
    from crypto.identity import Hotkey
    doc = {"mesh_id": "m1", "members": [
        {"hotkey": Hotkey.from_uri("//Alice").ss58_address, "roles": ["validator"], "stake": 5,
         "name": "v0"}], "bootstrap": ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"]}
    doc.update(over)
    return doc


def test_genesis_round_trip(tmp_path):
    genesis = parse_genesis(_genesis_doc())
    write_genesis(tmp_path / "g.json", genesis)
    again = load_genesis(tmp_path / "g.json")
    assert again == genesis
    assert again.directory.member(genesis.members[0].hotkey).roles == {Role.VALIDATOR}
    assert again.name_of(genesis.members[0].hotkey) == "v0"


@pytest.mark.parametrize("change, hint", [
    ({"mesh_id": "bad id!"}, "mesh_id"),
    ({"members": [{"hotkey": "nope", "roles": ["validator"]}]}, "SS58"),
    ({"members": [{"hotkey": "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY", "roles": ["king"]}]}, "roles"),
    ({"members": [{"hotkey": "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY", "roles": []}]}, "role"),
    ({"members": [{"hotkey": "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY", "roles": ["miner"], "stake": -1}]}, "stake"),
    ({"bootstrap": "not a list"}, "bootstrap"),
])
def test_bad_genesis_is_rejected_with_a_hint(change, hint):
    with pytest.raises(GenesisError, match=hint):
        parse_genesis(_genesis_doc(**change))


def test_duplicate_member_and_missing_file(tmp_path):
    doc = _genesis_doc()
    doc["members"] = doc["members"] * 2
    with pytest.raises(GenesisError, match="twice"):
        parse_genesis(doc)
    with pytest.raises(GenesisError, match="not found"):
        load_genesis(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(GenesisError, match="JSON"):
        load_genesis(tmp_path / "bad.json")


def test_metagraph_neurons_map_to_members():
    import bittensor as bt

    def neuron(uid, hotkey, permit, tao):
        return bt.MetagraphNeuron(
            uid=uid, hotkey=hotkey, coldkey=hotkey, active=True, validator_permit=permit,
            last_update=0, block_at_registration=0, rank=0.0, trust=0.0, consensus=0.0,
            incentive=0.0, dividends=0.0, pruning_score=0.0, emission=bt.Balance.from_tao(0),
            alpha_stake=bt.Balance.from_tao(0), tao_stake=bt.Balance.from_tao(tao),
            total_stake=bt.Balance.from_tao(tao), axon=None, identity=None, commitment=None)

    alice = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
    bob = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
    members = members_from_neurons([neuron(0, alice, True, 1200.5), neuron(1, bob, False, 3)])
    assert members[0].roles == {Role.VALIDATOR} and members[0].stake == pytest.approx(1200.5)
    assert members[1].roles == {Role.TRAINER, Role.MINER} and members[1].stake == pytest.approx(3)


def test_settings_merge_file_and_flags(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('role = "miner"\n[mesh]\nlisten_port = 4100\nbootstrap = ["/ip4/1.2.3.4/tcp/1"]\n')
    settings = load_settings(cfg, {"listen_port": 4200, "api_port": None})
    assert settings.role is Role.MINER and settings.listen_port == 4200
    assert settings.bootstrap == ("/ip4/1.2.3.4/tcp/1",)
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings(None, {"role": "miner", "colour": "blue"})
    with pytest.raises(SettingsError, match="role"):
        load_settings(None, {})
    with pytest.raises(SettingsError, match="unknown role"):
        load_settings(None, {"role": "king"})
