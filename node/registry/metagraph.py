"""Members from a Bittensor subnet's metagraph (`--network finney|test|ws://… --netuid N`).

Mapping: a neuron with a validator permit is a validator; every other registered
neuron may train and mine. Stake is the neuron's total stake in TAO. The bittensor SDK
is imported only when this backend is used: it is slow to import and needs a chain.
"""

from __future__ import annotations

from typing import Any, Iterable

from protocol.membership import Member, Role, StaticDirectory


def members_from_neurons(neurons: Iterable[Any]) -> tuple[Member, ...]:
    """Neurons as bittensor's MetagraphNeuron (hotkey, validator_permit, total_stake)."""
    members = []
    for neuron in neurons:
        roles = ({Role.VALIDATOR} if neuron.validator_permit else {Role.TRAINER, Role.MINER})
        members.append(Member(neuron.hotkey, frozenset(roles), _tao(neuron.total_stake)))
    return tuple(members)


def _tao(balance: Any) -> float:
    return float(getattr(balance, "tao", balance))


def load_metagraph_directory(network: str, netuid: int) -> StaticDirectory:
    """One metagraph snapshot from the chain; callers refresh it each epoch."""
    import bittensor

    client = bittensor.Subtensor(network)
    try:
        metagraph = client.subnets.metagraph(netuid)
    except Exception as exc:  # the SDK raises its own connection/chain errors
        raise ConnectionError(f"cannot read the metagraph of netuid {netuid} on {network!r}: {exc}") from exc
    return StaticDirectory(members_from_neurons(metagraph.neurons))
