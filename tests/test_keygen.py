"""Dealer-free key ceremony: crypto/dkg.py's conversion and node/keygen.py's runner.

Fast tests replay TNO's secret-key sharing in one process (TNO's own IntegerShamir, known
primes) so the conversion math, the files and the failure paths run in seconds. The real
3-process ceremony over TNO's HTTP pool is slow (minutes on a busy 2-core machine) and
runs with SEALMESH_SLOW=1.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import gmpy2
import msgpack
import pytest

from crypto import dkg, paillier
from crypto.identity import Hotkey
from node import keygen
from node.keygen_cli import keygen_main
from protocol.errors import LocalProtocolError, RemoteProtocolError

BITS = 512
CONTEXT = b"test/dkg"


def _prime_3_mod_4(bits: int) -> int:
    while True:
        x = secrets.randbits(bits) | (3 << (bits - 2)) | 3  # p·q has exactly 2·bits bits
        if gmpy2.is_prime(x, 30):
            return x


def simulate_tno(params: dkg.CeremonyParameters) -> tuple[int, dict[int, int], int]:
    """TNO's DistributedPaillier.generate_secret_key for every member at once: each member's
    additive part of λ = φ(N) and a random β is shared with TNO's IntegerShamir, the sums are
    multiplied (degree 2t) and θ = Δ³·λ·β mod N reconstructed as TNO does."""
    from tno.mpc.encryption_schemes.shamir import IntegerShares
    from tno.mpc.encryption_schemes.shamir import ShamirSecretSharingIntegers as IntegerShamir

    n_par, t = params.n_parties, params.corruption_threshold
    p, q = _prime_3_mod_4(params.bits // 2), _prime_3_mod_4(params.bits // 2)
    modulus = p * q
    scheme = IntegerShamir(params.stat_sec, modulus, n_par, t)
    ps = [secrets.randbits(params.bits // 2 - 4) for _ in range(n_par - 1)]
    qs = [secrets.randbits(params.bits // 2 - 4) for _ in range(n_par - 1)]
    ps, qs = [p - sum(ps)] + ps, [q - sum(qs)] + qs
    lam_parts = [modulus - ps[0] - qs[0] + 1] + [-ps[i] - qs[i] for i in range(1, n_par)]
    beta_parts = [secrets.randbelow(modulus) for _ in range(n_par)]

    def summed(parts: list[int]) -> dict[int, int]:
        sharings = [scheme.share_secret(x) for x in parts]
        return {i: sum(s.shares[i] for s in sharings) for i in range(1, n_par + 1)}

    lam, beta = summed(lam_parts), summed(beta_parts)
    shares = {i: lam[i] * beta[i] for i in lam}
    delta = math.factorial(n_par)
    reduced = IntegerShares(scheme, {i: s % modulus for i, s in shares.items()}, 2 * t, delta**2)
    theta = reduced.reconstruct_secret(modulus=modulus) * delta**3 % modulus
    return modulus, shares, theta


def convert(params: dkg.CeremonyParameters, modulus: int, tno_shares: dict[int, int],
            theta: int) -> tuple[paillier.PublicKey, dict[int, paillier.KeyShare],
                                 paillier.VerificationKeys, int]:
    """What the members compute after TNO, without the network in between."""
    dealt = {i: dkg.deal_sub_shares(params, modulus, i, tno_shares[i])
             for i in params.reduction_set}
    public = paillier.PublicKey(modulus)
    v = dkg.verification_base(public, b"session")
    shares = {}
    for j in range(1, params.n_parties + 1):
        s = dkg.combine_sub_shares(params, modulus, j, {i: dealt[i][j] for i in dealt})
        shares[j] = paillier.KeyShare(public, j, params.threshold, params.n_parties, s, v,
                                      dkg.verification_key(public, v, s, params.n_parties))
    vks = paillier.VerificationKeys(v, tuple(shares[j].v_i for j in sorted(shares)))
    return public, shares, vks, dkg.plaintext_scale(params, modulus, theta)


@pytest.fixture(scope="module")
def ceremony() -> dict:
    params = dkg.CeremonyParameters(3, 2, BITS)
    modulus, tno_shares, theta = simulate_tno(params)
    public, shares, vks, scale = convert(params, modulus, tno_shares, theta)
    return {"params": params, "modulus": modulus, "tno_shares": tno_shares, "theta": theta,
            "public": public, "shares": shares, "vks": vks, "scale": scale}


# ---------------------------------------------------------------------------------------
# crypto/dkg.py


def test_any_threshold_members_decrypt_with_our_combine(ceremony):
    public, shares, vks, scale = (ceremony[k] for k in ("public", "shares", "vks", "scale"))
    m = secrets.randbelow(public.n)
    c = public.encrypt(m)
    partials = {j: paillier.partial_decrypt(s, c, CONTEXT) for j, s in shares.items()}
    for subset in ((1, 2), (1, 3), (2, 3)):
        assert dkg.combine(public, vks, 2, c, [partials[j] for j in subset], CONTEXT, scale) == m
    # Without the scale, combine yields E·m: the one difference from a dealt key.
    raw = paillier.combine(public, vks, 2, c, [partials[1], partials[2]], CONTEXT)
    assert raw == m * scale % public.n and scale != 1
    with pytest.raises(paillier.NotEnoughPartials):
        dkg.combine(public, vks, 2, c, [partials[3]], CONTEXT, scale)


def test_batch_decryption_and_homomorphic_sum(ceremony):
    public, shares, vks, scale = (ceremony[k] for k in ("public", "shares", "vks", "scale"))
    values = [secrets.randbelow(1 << 32) for _ in range(4)]
    cs = [public.encrypt(x) for x in values]
    total = public.add_many(cs)
    batches = [paillier.partial_decrypt_many(shares[j], cs + [total], CONTEXT, workers=1)
               for j in (3, 1)]
    out = dkg.combine_many(public, vks, 2, cs + [total], batches, CONTEXT, scale, workers=1)
    assert out == values + [sum(values)]


def test_tno_decryption_of_the_same_shares_agrees(ceremony):
    """TNO's own PaillierSharedKey (all 2t+1 raw shares) decrypts what our shares decrypt:
    the simulation really is TNO's sharing and θ means what crypto/dkg.py assumes."""
    from tno.mpc.encryption_schemes.paillier import Paillier, PaillierCiphertext, PaillierPublicKey
    from tno.mpc.encryption_schemes.shamir import IntegerShares
    from tno.mpc.encryption_schemes.shamir import ShamirSecretSharingIntegers as IntegerShamir
    from tno.mpc.protocols.distributed_keygen import PaillierSharedKey

    params, modulus, theta = ceremony["params"], ceremony["modulus"], ceremony["theta"]
    scheme = IntegerShamir(params.stat_sec, modulus, 3, 1)
    keys = {i: PaillierSharedKey(modulus, 1, i, IntegerShares(scheme, {i: s}, 2, 36), theta)
            for i, s in ceremony["tno_shares"].items()}
    m = secrets.randbelow(modulus)
    c = ceremony["public"].encrypt(m)
    tno_scheme = Paillier(PaillierPublicKey(modulus, modulus + 1), None)
    ciphertext = PaillierCiphertext(c, tno_scheme)
    partials = {i: k.partial_decrypt(ciphertext) for i, k in keys.items()}
    assert keys[1].decrypt(partials) == m


def test_shares_are_positive_and_within_the_proof_bound(ceremony):
    params, modulus = ceremony["params"], ceremony["modulus"]
    room = (modulus * modulus).bit_length() + dkg.MAX_EXPONENT_EXCESS_BITS
    for share in ceremony["shares"].values():
        assert share.secret > 0
        assert share.secret.bit_length() <= dkg.max_share_bits(params, modulus)
        assert (share.delta * share.secret).bit_length() <= room
        # Why crypto/dkg.py has its own codec: paillier's bounds secrets by n^2.
        assert share.secret.bit_length() > (modulus * modulus).bit_length()


def test_bad_sub_shares_name_the_member(ceremony):
    params, modulus = ceremony["params"], ceremony["modulus"]
    bound = dkg.sub_share_bound(params, modulus)
    good = {1: 5, 2: -7, 3: 11}
    shift = dkg.share_shift(params, modulus)
    assert dkg.combine_sub_shares(params, modulus, 2, good) == 9 + 2 * shift
    with pytest.raises(dkg.BadPeerValue) as info:
        dkg.combine_sub_shares(params, modulus, 1, {1: 5, 2: bound + 1, 3: 0})
    assert info.value.member == 2 and info.value.reason == "sub_share_range"
    assert isinstance(info.value, RemoteProtocolError)
    with pytest.raises(dkg.BadPeerValue) as info:
        dkg.combine_sub_shares(params, modulus, 1, {1: 5, 2: 1, 3: b"7"})
    assert info.value.member == 3 and info.value.reason == "sub_share_type"
    with pytest.raises(dkg.InvalidCeremony):
        dkg.combine_sub_shares(params, modulus, 1, {1: 5, 2: 1})
    with pytest.raises(dkg.InvalidCeremony):
        dkg.deal_sub_shares(params, modulus, 1, dkg.tno_share_bound(params, modulus) + 1)


def test_inconsistent_verification_key_is_named(ceremony):
    public, vks = ceremony["public"], ceremony["vks"]
    dkg.check_verification_keys(public, vks, 2)
    bad = paillier.VerificationKeys(vks.v, vks.keys[:2] + (vks.keys[2] * vks.v % public.n_squared,))
    with pytest.raises(dkg.BadPeerValue) as info:
        dkg.check_verification_keys(public, bad, 2)
    assert info.value.member == 3 and info.value.reason == "verification_key"


@pytest.mark.parametrize("n, threshold, bits, why", [
    (2, 2, 512, "members"),        # TNO needs n >= 2t+1 with t >= 1
    (3, 1, 512, "threshold"),      # t = 0 would hand φ(N) to everyone
    (3, 3, 512, "threshold"),      # 3 < 2·2+1
    (5, 4, 512, "threshold"),
    (3, 2, 511, "bits"),
    (3, 2, 256, "bits"),
])
def test_parameters_rejected(n, threshold, bits, why):
    with pytest.raises(dkg.InvalidCeremony) as info:
        dkg.CeremonyParameters(n, threshold, bits)
    assert info.value.reason == "parameters" and isinstance(info.value, LocalProtocolError)


def test_parameters_accepted_and_derived():
    params = dkg.CeremonyParameters(7, 4, 2048)
    assert params.corruption_threshold == 3 and params.reduction_set == (1, 2, 3, 4, 5, 6, 7)
    modulus = (1 << 2047) + 1
    dkg.check_exponent_room(params, modulus)
    with pytest.raises(dkg.InvalidCeremony, match="fewer members"):
        dkg.check_exponent_room(dkg.CeremonyParameters(41, 2, 2048), modulus)


def test_plaintext_scale_refuses_non_unit(ceremony):
    params, modulus = ceremony["params"], ceremony["modulus"]
    with pytest.raises(dkg.DkgError) as info:
        dkg.plaintext_scale(params, modulus, 0)
    assert info.value.reason == "theta"


def test_key_share_codec_round_trip_and_tampering(ceremony):
    key = dkg.DkgKeyShare(ceremony["shares"][2], ceremony["scale"])
    data = dkg.encode_key_share(key)
    assert dkg.decode_key_share(data) == key
    obj = msgpack.unpackb(data, raw=False)
    for field, value in [("secret", (key.share.secret + 1).to_bytes(200, "big")),
                         ("index", 9), ("threshold", 1), ("v", 2), ("scale", b"\x00" * 128)]:
        with pytest.raises(dkg.DkgDecodeError):
            dkg.decode_key_share(msgpack.packb({**obj, field: value}, use_bin_type=True))
    for garbage in (b"", b"\xc1", msgpack.packb([1, 2]), "text"):
        with pytest.raises(dkg.DkgDecodeError):
            dkg.decode_key_share(garbage)


# ---------------------------------------------------------------------------------------
# node/keygen.py: files, states, failures


HOTKEYS = tuple(Hotkey.from_uri(f"//keygen-test-{i}") for i in (1, 2, 3))
ROSTER = tuple(k.ss58_address for k in HOTKEYS)


def _settings(tmp_path: Path, **kw) -> keygen.KeygenSettings:
    ports = keygen.free_ports(3)
    index = kw.get("index", 1)
    base = dict(index=1, members=tuple(("127.0.0.1", p) for p in ports), threshold=2, bits=BITS,
                out_dir=tmp_path / "m1", allow_weak=True, heartbeat_s=0.5, hotkeys=ROSTER,
                hotkey=HOTKEYS[index - 1])
    return keygen.KeygenSettings(**{**base, **kw})


def _fake_output(ceremony: dict, index: int) -> dict:
    share = ceremony["shares"][index]
    return {"public": ceremony["public"], "share": share, "vks": ceremony["vks"],
            "scale": ceremony["scale"], "session": b"\x01" * 32,
            "tno": {"index": index, "share": ceremony["tno_shares"][index], "degree": 2,
                    "scaling": 36, "theta": ceremony["theta"].to_bytes(64, "big"), "stat_sec": 80,
                    "party_indices": {"self": index}}}


def test_save_is_private_and_loads_back(tmp_path, ceremony):
    settings = _settings(tmp_path)
    settings.out_dir.mkdir()
    summary = keygen._save(settings, _fake_output(ceremony, 1), keygen.Progress())
    assert stat.S_IMODE((settings.out_dir / keygen.KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((settings.out_dir / keygen.PUBLIC_FILE).stat().st_mode) == 0o644
    assert not [p for p in settings.out_dir.iterdir() if p.name.endswith(".tmp")]
    result = keygen.load_result(settings.out_dir)
    assert result["public"] == ceremony["public"]
    assert result["key_share"].share == ceremony["shares"][1]
    assert result["verification_keys"] == ceremony["vks"] and summary["modulus_bits"] == BITS
    public_only = msgpack.unpackb((settings.out_dir / keygen.PUBLIC_FILE).read_bytes(), raw=False)
    assert "key_share" not in public_only and "tno" not in public_only


def test_finished_ceremony_is_never_redone(tmp_path, ceremony):
    settings = _settings(tmp_path)
    settings.out_dir.mkdir()
    keygen._save(settings, _fake_output(ceremony, 1), keygen.Progress())
    state = {**keygen._new_state(settings), "status": "finished", "finished_at": 1.0}
    keygen.write_state(settings.out_dir, state)
    key_before = (settings.out_dir / keygen.KEY_FILE).read_bytes()
    for restart in (False, True):
        again = keygen.run_member(_settings(tmp_path, restart=restart))  # no network needed
        assert again["already_finished"] is True
    assert (settings.out_dir / keygen.KEY_FILE).read_bytes() == key_before
    (settings.out_dir / keygen.KEY_FILE).unlink()
    with pytest.raises(keygen.CeremonyCrashed, match="gone"):
        keygen.check_previous(settings.out_dir, restart=True)


def test_crashed_busy_and_failed_states(tmp_path):
    settings = _settings(tmp_path)
    out = settings.out_dir
    out.mkdir()
    assert keygen.check_previous(out, restart=False) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    keygen.write_state(out, {**keygen._new_state(settings), "pid": dead.pid, "phase": "modulus",
                             "elapsed_s": 42.0})
    with pytest.raises(keygen.CeremonyCrashed) as info:
        keygen.check_previous(out, restart=False)
    assert "cannot resume" in str(info.value) and "modulus" in str(info.value)
    assert keygen.check_previous(out, restart=True) is None
    keygen.write_state(out, keygen._new_state(settings))  # our own, live pid
    with pytest.raises(keygen.CeremonyBusy):
        keygen.check_previous(out, restart=True)
    keygen.write_state(out, {**keygen._new_state(settings), "status": "failed", "error": "x"})
    with pytest.raises(keygen.CeremonyCrashed) as info:
        keygen.check_previous(out, restart=False)
    assert info.value.reason == "previous_failed"
    (out / keygen.STATE_FILE).write_text("{not json")
    with pytest.raises(keygen.CeremonyCrashed, match="unreadable"):
        keygen.check_previous(out, restart=False)


def test_member_that_never_comes_up_fails_with_timeout_not_hang(tmp_path):
    settings = _settings(tmp_path, join_timeout_s=1.0, stall_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(keygen.MemberVanished) as info:
        keygen.run_member(settings)
    assert time.monotonic() - started < 30
    assert "member-2" in str(info.value) or "member-3" in str(info.value)
    assert "unreachable" in str(info.value)
    state = keygen.read_state(settings.out_dir)
    assert state["status"] == "failed" and state["reason"] == "member_vanished"
    assert state["phase"] == "hello"
    with pytest.raises(keygen.CeremonyCrashed):  # not silently retried
        keygen.run_member(settings)


def test_a_busy_member_is_slow_not_vanished_and_a_closed_port_is_vanished():
    """The watchdog's probe: a live process whose event loop never answers (busy in a long
    synchronous TNO step, or starved of CPU) still accepts TCP; a closed port does not."""
    import asyncio
    from types import SimpleNamespace

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(4)  # never accept()ed, never answered: the kernel still completes the handshake
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    handlers = {"member-2": SimpleNamespace(addr="127.0.0.1", port=busy.getsockname()[1], buffer={}),
                "member-3": SimpleNamespace(addr="127.0.0.1", port=closed_port, buffer={})}
    watchdog = keygen._Watchdog(None, None, SimpleNamespace(pool_handlers=handlers), {})
    try:
        assert asyncio.run(watchdog._probe("member-2")) is None
        assert "ConnectionRefused" in asyncio.run(watchdog._probe("member-3"))
    finally:
        busy.close()


def test_mismatched_member_is_named(tmp_path):
    ports = keygen.free_ports(3)
    members = tuple(("127.0.0.1", p) for p in ports)
    errors: dict[int, BaseException] = {}

    def member(index: int, threshold: int, bits: int, join_timeout_s: float) -> None:
        try:
            keygen.run_member(keygen.KeygenSettings(
                index=index, members=members, threshold=threshold, bits=bits,
                hotkeys=ROSTER, hotkey=HOTKEYS[index - 1],
                out_dir=tmp_path / f"m{index}", allow_weak=True, heartbeat_s=0.5,
                join_timeout_s=join_timeout_s))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors[index] = exc

    other = threading.Thread(target=member, args=(2, 2, 1024, 60.0))
    other.start()
    member(1, 2, BITS, 60.0)
    other.join(60)
    assert isinstance(errors[1], keygen.MemberMismatch) and "member-2" in str(errors[1])
    assert "--bits" in str(errors[1])
    assert isinstance(errors[2], keygen.MemberMismatch) and "member-1" in str(errors[2])
    assert keygen.read_state(tmp_path / "m1")["reason"] == "parameters_mismatch"


def test_sigterm_stops_cleanly(tmp_path):
    settings = _settings(tmp_path, join_timeout_s=60.0)

    def terminate_once_waiting() -> None:
        # Only once the ceremony's handler is installed: a default SIGTERM would end pytest.
        _wait_phase(settings.out_dir, {"hello"}, 60)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_waiting, daemon=True)
    killer.start()
    with pytest.raises(keygen.CeremonyInterrupted, match="SIGTERM"):
        keygen.run_member(settings)
    killer.join(5)
    state = keygen.read_state(settings.out_dir)
    assert state["status"] == "interrupted" and state["reason"] == "interrupted"
    # The port is free again: nothing was left listening.
    with socket.socket() as s:
        s.bind(settings.members[0])


def _members(*addresses: str) -> str:
    return ",".join(f"{k}@{a}" for k, a in zip(ROSTER, addresses))


@pytest.mark.parametrize("argv, code", [
    (["--index", "1", "--members", _members("a:1", "b"), "--bits", "512", "--allow-weak"], 2),
    (["--index", "1", "--members", _members("a:1", "a:1", "b:2"), "--bits", "512",
      "--allow-weak"], 2),
    (["--index", "4", "--members", _members("a:1", "b:2", "c:3"), "--bits", "512",
      "--allow-weak"], 2),
    (["--index", "1", "--members", _members("a:1", "b:2", "c:3"), "--bits", "512"], 2),  # weak
    (["--index", "1", "--members", _members("a:1", "b:2"), "--bits", "512", "--allow-weak"], 2),
    (["--index", "1", "--members", "a:1,b:2,c:3", "--bits", "512", "--allow-weak"], 2),  # no keys
    (["--index", "1", "--members", f"{ROSTER[0]}@a:1,{ROSTER[0]}@b:2,{ROSTER[2]}@c:3",
      "--bits", "512", "--allow-weak"], 2),  # one hotkey twice
    (["--index", "1", "--members", _members("a:1", "b:2", "c:3"), "--bits", "512",
      "--allow-weak"], 2),  # no --wallet-name
    (["--local", "3", "--threshold", "3", "--bits", "512", "--allow-weak"], 2),
    (["--local", "3", "--bits", "1001", "--allow-weak"], 2),
])
def test_cli_usage_errors(tmp_path, argv, code, capsys):
    assert keygen_main(argv + ["--out", str(tmp_path / "k")]) == code
    assert "keygen:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The real thing: 3 member processes over TNO's HTTP pool (minutes on a loaded machine)


def _wait_phase(path: Path, phases: set[str], limit: float) -> dict:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        state = keygen.read_state(path) or {}
        if state.get("phase") in phases:
            return state
        time.sleep(0.5)
    raise AssertionError(f"{path} never reached {phases}")


@pytest.mark.slow
def test_local_ceremony_512_bits_decrypts_with_any_two(tmp_path):
    local = keygen.LocalCeremony(3, 2, BITS, tmp_path, allow_weak=True, heartbeat_s=2.0,
                                 stall_timeout_s=60.0, timeout_s=1500.0)
    result = keygen.run_local(local)
    assert result["ok"], result
    loaded = {i: keygen.load_result(keygen.member_dir(tmp_path, i)) for i in (1, 2, 3)}
    public, vks = loaded[1]["public"], loaded[1]["verification_keys"]
    scale = loaded[1]["key_share"].plaintext_scale
    assert all(r["public"] == public and r["verification_keys"] == vks for r in loaded.values())
    assert public.bits >= BITS
    m = secrets.randbelow(public.n)
    c = public.encrypt(m)
    partials = {i: paillier.partial_decrypt(r["key_share"].share, c, CONTEXT)
                for i, r in loaded.items()}
    for pair in ((1, 2), (1, 3), (2, 3)):
        assert dkg.combine(public, vks, 2, c, [partials[i] for i in pair], CONTEXT, scale) == m
    for i in (1, 2, 3):
        state = keygen.read_state(keygen.member_dir(tmp_path, i))
        assert state["status"] == "finished" and state["elapsed_s"] > 0
        mode = stat.S_IMODE((keygen.member_dir(tmp_path, i) / keygen.KEY_FILE).stat().st_mode)
        assert mode == 0o600
    # Once finished, running it again only reports it.
    again = keygen.run_local(local)
    assert again["ok"]
    assert keygen.load_result(keygen.member_dir(tmp_path, 1))["key_share"] == loaded[1]["key_share"]


@pytest.mark.slow
def test_member_killed_mid_ceremony_fails_the_others_promptly(tmp_path):
    ports = keygen.free_ports(3)
    members = ",".join(f"{keygen.local_hotkey(tmp_path, i).ss58_address}@127.0.0.1:{p}"
                       for i, p in zip((1, 2, 3), ports))
    local = keygen.LocalCeremony(3, 2, BITS, tmp_path, allow_weak=True, heartbeat_s=1.0,
                                 stall_timeout_s=5.0, timeout_s=900.0)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    procs = {i: subprocess.Popen(keygen._member_argv(local, i, members), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in (1, 2, 3)}
    try:
        _wait_phase(keygen.member_dir(tmp_path, 3), {"modulus"}, 600)
        procs[3].kill()
        killed_at = time.monotonic()
        codes = {i: procs[i].wait(timeout=120) for i in (1, 2)}
        assert time.monotonic() - killed_at < 120
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert codes == {1: 1, 2: 1}
    for i in (1, 2):
        state = keygen.read_state(keygen.member_dir(tmp_path, i))
        assert state["status"] == "failed" and state["reason"] == "member_vanished", state
        assert "member-3" in state["error"]
    dead_state = keygen.member_dir(tmp_path, 3) / keygen.STATE_FILE
    assert json.loads(dead_state.read_text())["status"] == "running"
    with pytest.raises(keygen.CeremonyCrashed, match="cannot resume"):
        keygen.check_previous(keygen.member_dir(tmp_path, 3), restart=False)


# ------------------------------------------------------------------ progress line (issue 17)


def test_the_ceremony_tells_its_progress_line_each_phase_and_candidate_round():
    seen = []
    progress = keygen.Progress(on_change=lambda p: seen.append(
        (p.phase, keygen._round_detail(p.phase, p.round))))
    progress.enter("hello")
    progress.enter("modulus")
    progress.next_candidate_round()
    progress.next_candidate_round()
    progress.enter("secret-key")
    assert seen == [("hello", ""), ("modulus", ""), ("modulus", "candidate round 1"),
                    ("modulus", "candidate round 2"), ("secret-key", "")]
    assert set(progress.phase_times) == {"starting", "hello", "modulus"}
    assert {"hello", "modulus", "writing"} <= set(keygen.CEREMONY_PHASES)


def test_a_local_ceremony_shows_the_member_furthest_behind():
    states = {1: {"phase": "secret-key"}, 2: {"phase": "modulus", "round": 4}, 3: {"phase": "modulus", "round": 5},
              4: {}}
    assert keygen._slowest_member(states) == ("starting", "1 of 4 here")  # 4 has not written its state yet
    del states[4]
    assert keygen._slowest_member(states) == ("modulus", "2 of 3 here, candidate round 4")
