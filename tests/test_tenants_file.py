"""The tenants file: its shape, validation errors naming tenant and field, hashed keys."""

from __future__ import annotations

import json

import pytest

from services.errors import C2CError
from services.tenants import (
    PUBLIC,
    Tenants,
    effective_owner,
    hash_key,
    is_visible,
    load_file,
    parse,
)

GOOD = {"tenants": [
    {"name": "a", "api_keys": ["sk-a", "sk-a2"], "models": ["m1"],
     "limits": {"requests_per_minute": 600, "tokens_per_minute": 200000, "max_concurrent": 8}},
    {"name": "b", "api_keys": ["sha256:" + hash_key("sk-b")], "models": ["m2"]},
]}


def test_the_issue_shape_parses_as_json_and_yaml(tmp_path):
    json_path = tmp_path / "tenants.json"
    json_path.write_text(json.dumps(GOOD))
    yaml_path = tmp_path / "tenants.yaml"
    yaml_path.write_text("tenants:\n"
                         "  - {name: a, api_keys: [sk-a, sk-a2], models: [m1], limits: {requests_per_minute: 600,"
                         " tokens_per_minute: 200000, max_concurrent: 8}}\n"
                         f"  - {{name: b, api_keys: ['sha256:{hash_key('sk-b')}'], models: [m2]}}\n")
    assert load_file(json_path) == load_file(yaml_path)
    tenants = load_file(json_path)
    a, b = tenants.tenants
    assert (a.name, a.models, a.limits.max_concurrent) == ("a", ("m1",), 8)
    assert b.limits.requests_per_minute is None  # absent: unlimited
    assert tenants.model_to_owner == {"m1": "a", "m2": "b"}


def test_keys_are_found_by_hash_and_never_kept_in_clear():
    tenants = parse(json.dumps(GOOD))
    assert tenants.find("sk-a").name == "a"
    assert tenants.find("sk-a2").name == "a"
    assert tenants.find("sk-b").name == "b"  # given as sha256:<hex> in the file
    assert tenants.find("sk-c") is None
    assert tenants.find("") is None
    shared = tenants.to_json()
    assert "sk-a" not in shared and hash_key("sk-a") in shared
    assert Tenants.from_json(shared) == tenants


def test_visibility_tenants_file_wins_over_catalog_owner():
    tenants = parse(json.dumps(GOOD))
    a, b = tenants.tenants
    assert is_visible("m1", PUBLIC, tenants, a) and not is_visible("m1", PUBLIC, tenants, b)
    assert is_visible("m3", PUBLIC, tenants, b)  # nobody owns it: public
    assert effective_owner("m2", "a", tenants) == "b"  # the file wins over the catalog field
    assert not is_visible("m4", "c", tenants, a)  # catalog says private to c: still private


@pytest.mark.parametrize(("doc", "message"), [
    ([], "expected an object with one field"),
    ({"tenant": []}, "found tenant"),
    ({"tenants": {}}, '"tenants" must be a list'),
    ({"tenants": ["a"]}, "tenants[0]: each tenant must be an object"),
    ({"tenants": [{"name": "a b", "api_keys": ["k"]}]}, "tenants[0]: name: must be"),
    ({"tenants": [{"name": "a"}]}, "tenants[0] ('a'): api_keys: must be a list"),
    ({"tenants": [{"name": "a", "api_keys": []}]}, "tenants[0] ('a'): api_keys: must hold at least one key"),
    ({"tenants": [{"name": "a", "api_keys": ["k"], "model": ["m"]}]}, "tenants[0] ('a'): unknown field(s) model"),
    ({"tenants": [{"name": "a", "api_keys": ["k"], "models": "m1"}]}, "tenants[0] ('a'): models: must be a list"),
    ({"tenants": [{"name": "a", "api_keys": ["k"], "limits": {"requests_per_minute": -1}}]},
     "tenants[0] ('a'): limits.requests_per_minute: must be a positive integer"),
    ({"tenants": [{"name": "a", "api_keys": ["k"], "limits": {"max_concurrent": 2.5}}]},
     "limits.max_concurrent: must be a positive integer"),
    ({"tenants": [{"name": "a", "api_keys": ["k"], "limits": {"max_concurrent": True}}]},
     "limits.max_concurrent: must be a positive integer"),
    ({"tenants": [{"name": "a", "api_keys": ["k"], "limits": {"rpm": 1}}]}, "limits: unknown field(s) rpm"),
    ({"tenants": [{"name": "a", "api_keys": ["k"]}, {"name": "b", "api_keys": ["j"]},
                  {"name": "a", "api_keys": ["i"]}]}, "tenant name 'a' appears twice"),
    ({"tenants": [{"name": "a", "api_keys": ["k"]}, {"name": "b", "api_keys": ["k"]}]},
     "tenant 'b': api_keys: a key of it is also a key of tenant 'a'"),
    ({"tenants": [{"name": "a", "api_keys": ["k"], "models": ["m"]}, {"name": "b", "api_keys": ["j"], "models": ["m"]}]},
     "tenant 'b': models: 'm' is already owned by tenant 'a'"),
])
def test_bad_files_name_tenant_and_field(tmp_path, doc, message):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(C2CError) as info:
        load_file(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(C2CError, match="cannot read it"):
        load_file(tmp_path / "missing.json")
    bad_json = tmp_path / "t.json"
    bad_json.write_text('{"tenants": [}')
    with pytest.raises(C2CError, match="not valid JSON"):
        load_file(bad_json)
    bad_yaml = tmp_path / "t.yaml"
    bad_yaml.write_text("tenants: [a, b\n")
    with pytest.raises(C2CError, match="not valid YAML"):
        load_file(bad_yaml)


def test_cli_check(tmp_path, capsys):
    from services.cli import main

    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(GOOD))
    assert main(["tenants", "check", str(path)]) == 0
    assert "valid, 2 tenant(s)" in capsys.readouterr().out
    path.write_text(json.dumps({"tenants": [{"name": "a", "api_keys": "k"}]}))
    assert main(["tenants", "check", str(path)]) == 2
    assert "api_keys: must be a list" in capsys.readouterr().err
