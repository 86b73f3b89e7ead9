"""`sealmesh committee deal` and the ceremony's committee files: what each machine gets,
what it loads, what is refused (protocol/committee_rules.py) at deal time and at start."""

from __future__ import annotations

import json
import logging
import secrets
import stat
from pathlib import Path

import pytest

from crypto import paillier
from crypto.identity import Hotkey
from node import committee as cm
from protocol import aggregation as agg
from node import keygen
from node.cli import main
from node.keygen_cli import keygen_main
from node.wallet import create_hotkey
from protocol.committee_rules import committee_shape_problem, committee_size_problem

BITS = "1024"
TRAINER = Hotkey.from_uri("//deal-trainer").ss58_address


def write_genesis(path: Path, validators: int, *, names: bool = True) -> list[str]:
    """A genesis with `validators` validators and one trainer; their hotkeys, sorted."""
    hotkeys = [Hotkey.from_uri(f"//deal-validator-{i}").ss58_address for i in range(validators)]
    members = [{"hotkey": h, "roles": ["validator"], "stake": 10.0, **({"name": f"validator-{i}"} if names else {})}
               for i, h in enumerate(hotkeys)]
    members.append({"hotkey": TRAINER, "roles": ["trainer"], "stake": 1.0, "name": "trainer-0"})
    path.write_text(json.dumps({"mesh_id": "deal-test", "members": members, "bootstrap": []}))
    return sorted(hotkeys)


def deal(tmp_path: Path, validators: int, *extra: str, out: str = "dealt") -> tuple[int, list[str], Path]:
    hotkeys = write_genesis(tmp_path / "genesis.json", validators)
    code = main(["committee", "deal", "--genesis", str(tmp_path / "genesis.json"), "--out", str(tmp_path / out),
                 "--bits", BITS, *extra])
    return code, hotkeys, tmp_path / out


def decrypts_with(keys: list[cm.CommitteeKey], public: cm.CommitteeKey, alive: list[int]) -> list[int]:
    """Encrypt with the public key, partial-decrypt with the `alive` members' shares the way
    a round does (blocks_to_decrypt, cover), combine; returns the plaintexts."""
    values = [secrets.randbelow(1 << 40) for _ in range(5)]
    aggregate = [public.public.encrypt(v) for v in values]
    blocks = agg.blocks_for(len(aggregate), len(public.members), public.threshold)
    context_of = lambda b: cm.partial_context("deal-test", 0, "agg", b)  # noqa: E731
    batches = {}
    for key in keys:
        me = key.share.index
        if me not in alive:
            continue
        batches[me] = {b: paillier.partial_decrypt_many(key.share, aggregate[blocks[b].start:blocks[b].stop],
                                                        context_of(b), workers=1)
                       for b in agg.blocks_to_decrypt(blocks, me, alive, public.threshold)}
    chosen = agg.cover(blocks, {m: list(bs) for m, bs in batches.items()}, public.threshold)
    assert chosen is not None
    assert cm.combine_blocks(public, aggregate, blocks, batches, chosen, context_of) == values
    return values


def test_a_dealt_committee_loads_on_every_machine_and_decrypts_with_two_of_three(tmp_path, capsys):
    code, hotkeys, out = deal(tmp_path, 3, "--threshold", "2", "--min-contributors", "3")
    assert code == 0
    said = capsys.readouterr().out
    assert "TRUSTED DEALER" in said and "<node data dir>/committee" in said
    assert sorted(p.name for p in out.iterdir()) == ["public", "validator-0", "validator-1", "validator-2"]
    names = {Hotkey.from_uri(f"//deal-validator-{i}").ss58_address: f"validator-{i}" for i in range(3)}
    keys = []
    for hotkey in hotkeys:
        directory = out / names[hotkey]
        assert f"{directory}  ->  validator {names[hotkey]}" in said
        assert stat.S_IMODE((directory / cm.SHARE_FILE).stat().st_mode) == 0o600
        key = cm.load_committee(directory, hotkey)
        assert key.share is not None and key.share.index == hotkeys.index(hotkey) + 1  # sorted: share order
        assert key.members == tuple(hotkeys) and key.threshold == 2 and key.public.bits == 1024
        assert key.round_policy.min_contributors == 3
        keys.append(key)
    assert not (out / "public" / cm.SHARE_FILE).exists()
    public = cm.load_committee(out / "public", TRAINER)
    assert public.share is None and public.public_key_id == keys[0].public_key_id
    assert public.round_policy == keys[0].round_policy
    decrypts_with(keys, public, alive=[1, 3])  # any two of three
    assert len({k.public_key_id for k in keys}) == 1


def test_default_threshold_is_a_strict_majority_and_hotkeys_name_unnamed_validators(tmp_path, capsys):
    hotkeys = write_genesis(tmp_path / "genesis.json", 4, names=False)
    assert main(["committee", "deal", "--genesis", str(tmp_path / "genesis.json"), "--out",
                 str(tmp_path / "dealt"), "--bits", BITS]) == 0
    assert sorted(p.name for p in (tmp_path / "dealt").iterdir()) == sorted(hotkeys + ["public"])
    assert cm.load_committee(tmp_path / "dealt" / hotkeys[0], hotkeys[0]).threshold == 3  # 4 // 2 + 1


@pytest.mark.parametrize("validators, extra, why", [
    (2, [], "a committee of 2 member(s) can decrypt single updates"),
    (3, ["--threshold", "1"], "threshold 1: any one member can decrypt single updates alone"),
    (3, ["--threshold", "4"], "threshold 4 with 3 members"),
    (0, [], "names no validator"),
    (0, ["--insecure-small-committee"], "names no validator"),
    (3, ["--threshold", "4", "--insecure-small-committee"], "threshold 4 with 3 members"),
    (3, ["--min-contributors", "0"], "min_contributors"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, validators, extra, why):
    code, _, out = deal(tmp_path, validators, *extra)
    err = capsys.readouterr().err
    assert code == 2 and why in err and err.startswith("sealmesh: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_an_existing_out_directory_is_never_dealt_into(tmp_path, capsys):
    (tmp_path / "dealt").mkdir()
    (tmp_path / "dealt" / "old").write_text("a previous key")
    code, _, out = deal(tmp_path, 3)
    assert code == 2 and "not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["old"]


def test_the_insecure_flag_writes_and_warns_and_the_node_refuses_it_unless_allowed(tmp_path, capsys, caplog):
    code, hotkeys, out = deal(tmp_path, 2, "--insecure-small-committee")
    assert code == 0
    captured = capsys.readouterr()
    assert "WARNING: INSECURE committee" in captured.err and "WARNING: INSECURE committee" in captured.out
    for directory, me in ((out / "validator-0", Hotkey.from_uri("//deal-validator-0").ss58_address),
                          (out / "public", TRAINER)):
        with pytest.raises(cm.CommitteeKeyError, match="insecure_small_committee = true"):
            cm.load_committee(directory, me)
        with caplog.at_level(logging.WARNING, logger="sealmesh.committee"):
            caplog.clear()
            key = cm.load_committee(directory, me, insecure_small_committee=True)
        assert key.threshold == 2 and len(key.members) == 2
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "INSECURE committee" in caplog.records[0].getMessage()


def test_a_threshold_one_committee_is_refused_at_start(tmp_path):
    keys = cm.deal_committee(["5A", "5B", "5C"], 512, threshold=1)
    cm.save_committee(tmp_path, keys[0])
    with pytest.raises(cm.CommitteeKeyError, match="threshold 1"):
        cm.load_committee(tmp_path, "5A")
    assert cm.load_committee(tmp_path, "5A", insecure_small_committee=True).share.index == 1


def test_the_rule_itself():
    assert committee_size_problem(3, 2) is None and committee_size_problem(5, 3) is None
    assert committee_size_problem(3, 3) is None  # every member needed: private, not live
    assert committee_size_problem(2, 2) and committee_size_problem(1, 1) and committee_size_problem(4, 1)
    assert committee_shape_problem(3, 4) and committee_shape_problem(3, 0) and committee_shape_problem(0, 1)
    assert committee_shape_problem(2, 1) is None


# --- the ceremony writes the same directory ---------------------------------------------


def finished_ceremony(tmp_path: Path, local: bool = False) -> tuple[list, list[str], str]:
    """Three members' finished ceremony results on disk, as node/keygen.py's _save leaves
    them, each with a btcli wallet. TNO's output is made up without TNO (whose import
    alone takes seconds): degree-2t integer shares of Δ²·φ·β as the product of two
    degree-t sharings, θ = Δ³·φ·β mod N; the rest is our conversion (tests/test_keygen.py)."""
    from test_keygen import _fake_output, _prime_3_mod_4, convert
    from crypto import dkg

    params = dkg.CeremonyParameters(3, 2, 512)
    p, q = _prime_3_mod_4(256), _prime_3_mod_4(256)
    modulus, phi, beta = p * q, (p - 1) * (q - 1), secrets.randbelow(p * q)
    points, t = range(1, 4), params.corruption_threshold
    lam_sharing = dkg._integer_shamir(phi, t, points, params.delta, modulus)
    beta_sharing = dkg._integer_shamir(beta, t, points, params.delta, modulus)
    tno_shares = {i: lam_sharing[i] * beta_sharing[i] for i in points}
    theta = params.delta ** 3 * phi * beta % modulus
    public, shares, vks, scale = convert(params, modulus, tno_shares, theta)
    ceremony = {"public": public, "shares": shares, "vks": vks, "scale": scale, "tno_shares": tno_shares,
                "theta": theta}
    if local:  # `--local 3 --out tmp_path`: its own wallets, member-I directories
        wallets = [keygen.local_hotkey(tmp_path, i) for i in (1, 2, 3)]
    else:
        wallets = [create_hotkey(f"member-{i}", "default", tmp_path / "wallets") for i in (1, 2, 3)]
    roster = [w.ss58_address for w in wallets]
    members_arg = ",".join(f"{h}@127.0.0.1:{8800 + i}" for i, h in enumerate(roster, start=1))
    for i in (1, 2, 3):
        out_dir = keygen.member_dir(tmp_path, i) if local else tmp_path / f"m{i}"
        settings = keygen.KeygenSettings(index=i, members=tuple(("127.0.0.1", 8800 + j) for j in (1, 2, 3)),
                                         threshold=2, bits=512, out_dir=out_dir, hotkeys=tuple(roster),
                                         hotkey=wallets[i - 1], allow_weak=True)
        settings.out_dir.mkdir(exist_ok=True)
        keygen._save(settings, _fake_output(ceremony, i), keygen.Progress())
        keygen.write_state(settings.out_dir, {**keygen._new_state(settings), "status": "finished",
                                              "finished_at": 1.0})
    return wallets, roster, members_arg


def test_the_ceremony_writes_a_directory_the_node_loads_without_hand_edits(tmp_path, capsys):
    wallets, roster, members_arg = finished_ceremony(tmp_path)
    keys = []
    for i in (1, 2, 3):
        argv = ["--index", str(i), "--members", members_arg, "--wallet-name", f"member-{i}", "--hotkey", "default",
                "--wallet-path", str(tmp_path / "wallets"), "--threshold", "2", "--bits", "512", "--allow-weak",
                "--out", str(tmp_path / f"m{i}"), "--min-contributors", "3", "--log-level", "ERROR"]
        assert keygen_main(argv) == 0  # finished already: no network, only the committee files
        printed = json.loads(capsys.readouterr().out)
        assert printed["committee_dir"] == str(tmp_path / f"m{i}")
        key = cm.load_committee(tmp_path / f"m{i}", roster[i - 1])
        assert key.share.index == i and key.members == tuple(roster) and key.threshold == 2
        assert key.round_policy.min_contributors == 3 and key.plaintext_scale not in (0, 1)
        assert stat.S_IMODE((tmp_path / f"m{i}" / keygen.KEY_FILE).stat().st_mode) == 0o600
        keys.append(key)
    public = cm.load_committee(tmp_path / "m2" / "public", TRAINER)
    assert public.share is None and not list((tmp_path / "m2" / "public").glob("*key*"))
    assert public.public_key_id == keys[0].public_key_id
    assert json.loads((tmp_path / "m1" / cm.INFO_FILE).read_text()) == \
        json.loads((tmp_path / "m3" / "public" / cm.INFO_FILE).read_text())
    decrypts_with(keys, public, alive=[2, 3])


@pytest.mark.parametrize("validators, flagged", [(2, True), (3, False)])
def test_testnet_allows_its_small_committee_and_only_that(tmp_path, validators, flagged):
    from node import testnet
    from node.settings import load_settings

    nodes = testnet.prepare(testnet.TestnetPlan(trainers=1, validators=validators, miners=0, key_bits=1024,
                                                directory=tmp_path / "tn"))
    for node in nodes:
        settings = load_settings(node.data_dir / "node.toml", {})
        assert settings.insecure_small_committee is flagged
        key = cm.load_committee(node.data_dir / cm.COMMITTEE_DIR, node.hotkey,
                                insecure_small_committee=settings.insecure_small_committee)
        assert len(key.members) == validators


@pytest.mark.slow  # three member processes: about 9 s on a busy 2-core machine
def test_a_local_ceremony_writes_every_member_a_committee_directory(tmp_path, capsys):
    _, roster, _ = finished_ceremony(tmp_path, local=True)
    argv = ["--local", "3", "--threshold", "2", "--bits", "512", "--allow-weak", "--out", str(tmp_path),
            "--heartbeat", "0.5", "--log-level", "ERROR"]
    assert keygen_main(argv) == 0  # each member process finds its ceremony finished
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    for i in (1, 2, 3):
        directory = keygen.member_dir(tmp_path, i)
        assert report["members"][str(i)]["committee_dir"] == str(directory)
        key = cm.load_committee(directory, roster[i - 1])
        assert key.share.index == i and key.members == tuple(roster)
        assert cm.load_committee(directory / "public", TRAINER).share is None
