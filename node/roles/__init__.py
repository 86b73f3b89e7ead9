"""Role loops: each a RoleService (node/roles/base.py) that the daemon runs in its nursery.

The wiring is the two tables below: SERVICES says which role modules a node of each role
runs, ROLE_MODULES how each module is loaded. A role module exposes
`make_service(settings) -> RoleService | None` (None when the node's settings do not call
for it: no training rounds, no FHE epochs). Modules load on first use, so a miner never
imports the trainer's or the validator's modules, and a trainer never imports Concrete-ML.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

from node.roles.base import RoleContext, RoleService
from node.settings import NodeSettings, SettingsError
from protocol.membership import Role


def _settlement() -> ModuleType:
    from node.roles import settlement
    return settlement


def _rounds() -> ModuleType:
    from node.roles import rounds
    return rounds


def _trainer() -> ModuleType:
    from node.roles import trainer
    return trainer


def _miner() -> ModuleType:
    from node.roles import miner
    return miner


def _challenger() -> ModuleType:
    from node.roles import challenger
    return challenger


# Each role module by name, and the function that imports it.
ROLE_MODULES: dict[str, Callable[[], ModuleType]] = {
    "settlement": _settlement,
    "rounds": _rounds,
    "trainer": _trainer,
    "miner": _miner,
    "challenger": _challenger,
}

# The modules each node role runs, in start-up order: settlement first, so rounds and
# epochs can record.
SERVICES: dict[Role, tuple[str, ...]] = {
    Role.VALIDATOR: ("settlement", "rounds", "challenger"),
    Role.TRAINER: ("trainer",),
    Role.MINER: ("miner",),
}

# Modules that take part in `sealmesh testnet`. Each may define
#   prepare_testnet(plan, nodes, root) -> None   (before any node starts: keys, data, config)
#   summarize(plan, statuses) -> dict            (its report.json section from the nodes'
#                                                 final status documents, name -> status)
# and names its report section REPORT_SECTION.
TESTNET_MODULES: tuple[str, ...] = ("settlement", "rounds", "challenger")


def role_module(name: str) -> ModuleType:
    """The role module `name` (a key of ROLE_MODULES), imported on first use."""
    try:
        load = ROLE_MODULES[name]
    except KeyError:
        raise SettingsError(f"unknown role module {name!r}; node/roles/__init__.py ROLE_MODULES "
                            f"has {', '.join(ROLE_MODULES)}") from None
    return load()


def testnet_modules() -> list[ModuleType]:
    return [role_module(name) for name in TESTNET_MODULES]


def services_for(settings: NodeSettings) -> list[RoleService]:
    """The services a node with these settings runs, in start-up order."""
    try:
        names = SERVICES[settings.role]
    except (KeyError, TypeError):  # TypeError: an unhashable value where a Role belongs
        raise SettingsError(f"no services are wired for role {settings.role!r}; node/roles/__init__.py "
                            f"SERVICES has {', '.join(role.value for role in SERVICES)}") from None
    services = []
    for name in names:
        service = role_module(name).make_service(settings)
        if service is not None:
            services.append(service)
    return services


__all__ = ["ROLE_MODULES", "SERVICES", "RoleContext", "RoleService", "role_module", "services_for",
           "testnet_modules"]
