"""Role loops: each a RoleService (node/roles/base.py) that the daemon runs in its nursery.

A service module exposes `make_service(settings) -> RoleService | None` (None when the
node's role or settings do not call for it). They load lazily, so a miner never imports
torch's training stack and a trainer never imports Concrete-ML.
"""

from __future__ import annotations

from importlib import import_module

from node.roles.base import RoleContext, RoleService
from node.settings import NodeSettings

# Order matters only for start-up: settlement first, so rounds and epochs can record.
SERVICE_MODULES: tuple[str, ...] = (
    "node.roles.settlement",
    "node.roles.rounds",
    "node.roles.trainer",
    "node.roles.miner",
    "node.roles.challenger",
)

# Modules that take part in `sealmesh testnet`. Each may define
#   prepare_testnet(plan, nodes, root) -> None   (before any node starts: keys, data, config)
#   summarize(plan, statuses) -> dict            (its report.json section from the nodes'
#                                                 final status documents, name -> status)
# and names its report section REPORT_SECTION.
TESTNET_MODULES: tuple[str, ...] = (
    "node.roles.settlement",
    "node.roles.rounds",
    "node.roles.challenger",
)


def testnet_modules() -> list:
    return [import_module(name) for name in TESTNET_MODULES]


def services_for(settings: NodeSettings) -> list[RoleService]:
    services = []
    for name in SERVICE_MODULES:
        service = import_module(name).make_service(settings)
        if service is not None:
            services.append(service)
    return services


__all__ = ["RoleContext", "RoleService", "services_for", "testnet_modules"]
