"""The role wiring (node/roles/__init__.py): which services a node of each role runs,
loaded through an explicit table, and the errors for a role or module it does not have."""

from __future__ import annotations

import dataclasses

import pytest

from node import roles
from node.roles import ROLE_MODULES, SERVICES, TESTNET_MODULES, role_module, services_for
from node.settings import NodeSettings, SettingsError
from protocol.membership import Role


def test_every_role_is_wired_and_every_wired_name_is_a_module():
    assert set(SERVICES) == set(Role)
    named = {name for names in SERVICES.values() for name in names} | set(TESTNET_MODULES)
    assert named <= set(ROLE_MODULES)


def test_a_role_module_is_loaded_by_its_name():
    module = role_module("settlement")
    assert module.__name__ == "node.roles.settlement"
    assert callable(module.make_service)


def test_an_unknown_role_module_is_refused_by_name():
    with pytest.raises(SettingsError, match="unknown role module 'oracle'.*settlement"):
        role_module("oracle")


def test_a_role_without_services_is_refused_by_name():
    settings = dataclasses.replace(NodeSettings(role=Role.MINER), role="oracle")
    with pytest.raises(SettingsError, match="no services are wired for role 'oracle'.*validator"):
        services_for(settings)


def test_a_validator_runs_the_services_its_settings_call_for_in_order(tmp_path):
    settings = NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path, epochs=0)
    assert [type(s).__name__ for s in services_for(settings)] == ["SettlementService", "RoundsService"]
    no_rounds = dataclasses.replace(settings, training=False)
    assert [type(s).__name__ for s in services_for(no_rounds)] == ["SettlementService"]


def test_a_trainer_runs_the_trainer_service(tmp_path):
    assert [type(s).__name__ for s in services_for(NodeSettings(role=Role.TRAINER, data_dir=tmp_path))] == [
        "TrainerService"]


def test_the_testnet_modules_each_take_part_under_their_own_report_section():
    modules = roles.testnet_modules()
    assert [m.__name__ for m in modules] == [f"node.roles.{name}" for name in TESTNET_MODULES]
    sections = [m.REPORT_SECTION for m in modules]
    assert len(set(sections)) == len(sections) and all(isinstance(s, str) for s in sections)
    assert all(hasattr(m, "prepare_testnet") or hasattr(m, "summarize") for m in modules)
