"""Tenants: who may call, which models are private to whom, and each tenant's limits.

The tenants file (`--tenants FILE` / `C2C_TENANTS_FILE`, JSON or YAML) has this shape:

    {"tenants": [{"name": "a", "api_keys": ["sk-a"], "models": ["m1"],
                  "limits": {"requests_per_minute": 600, "tokens_per_minute": 200000,
                             "max_concurrent": 8}}]}

`models` are the models the tenant owns (private to it); a catalog model no tenant owns is
public. An absent (or null) limit means unlimited. An API key may also be written as
`sha256:<64 hex digits>` so that the file need not hold it in clear.

`load_file` validates everything at once and raises `C2CError` naming the file, the tenant
and the field. Only key hashes (sha256) ever leave this module: `Tenants.to_json` is the
record every gateway shares through Redis (`keys.tenants()`), `Tenants.from_json` reads it
back. `Tenants.find` compares a presented key's hash against every stored hash with
`hmac.compare_digest` (constant time, and no early exit).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import C2CError

PUBLIC = "public"  # the catalog owner of a model every tenant may call
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HASHED = re.compile(r"^sha256:([0-9a-f]{64})$")
_TENANT_FIELDS = {"name", "api_keys", "models", "limits"}


@dataclass(frozen=True)
class Limits:
    """Per-tenant limits; None: unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in LIMIT_NAMES}


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256s: tuple[str, ...]
    models: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Tenants:
    tenants: tuple[Tenant, ...]

    @functools.cached_property
    def model_to_owner(self) -> dict[str, str]:
        return {model_id: t.name for t in self.tenants for model_id in t.models}

    def get(self, name: str) -> Tenant | None:
        return next((t for t in self.tenants if t.name == name), None)

    def find(self, api_key: str) -> Tenant | None:
        """The tenant holding `api_key`; every stored hash is compared in constant time."""
        presented = hash_key(api_key).encode()
        found = None
        for tenant in self.tenants:
            for key_sha256 in tenant.key_sha256s:
                if hmac.compare_digest(presented, key_sha256.encode()) and found is None:
                    found = tenant
        return found

    def to_json(self) -> str:
        """The shared record (key hashes only), canonical so equal sets give equal text."""
        return json.dumps({"tenants": [
            {"name": t.name, "api_key_sha256s": list(t.key_sha256s), "models": list(t.models),
             "limits": t.limits.as_dict()} for t in self.tenants]}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Tenants:
        doc = json.loads(text)
        return cls(tuple(Tenant(t["name"], tuple(t["api_key_sha256s"]), tuple(t["models"]), Limits(**t["limits"]))
                         for t in doc["tenants"]))


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def effective_owner(model_id: str, catalog_owner: str, tenants: Tenants) -> str:
    """Who may call a model: the tenants file wins; else the catalog's owner ("public" or a
    tenant name, which keeps the model private to that tenant even if it is absent)."""
    return tenants.model_to_owner.get(model_id) or catalog_owner or PUBLIC


def is_visible(model_id: str, catalog_owner: str, tenants: Tenants, tenant: Tenant) -> bool:
    owner = effective_owner(model_id, catalog_owner, tenants)
    return owner in (PUBLIC, tenant.name)


# -- the file ---------------------------------------------------------------------------------
def load_file(path: str | Path) -> Tenants:
    """Read and validate a tenants file (JSON, or YAML by extension or when not JSON);
    raises C2CError naming the file, the tenant and the field."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise C2CError(f"tenants file {path}: cannot read it ({exc})") from None
    return parse(text, str(path), is_yaml=path.suffix.lower() in (".yaml", ".yml"))


def parse(text: str, source: str = "tenants file", is_yaml: bool = False) -> Tenants:
    doc = _decode(text, source, is_yaml)
    if not isinstance(doc, dict) or set(doc) != {"tenants"}:
        found = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise C2CError(f"{source}: expected an object with one field, \"tenants\" (a list); found {found or 'nothing'}")
    if not isinstance(doc["tenants"], list):
        raise C2CError(f"{source}: \"tenants\" must be a list, got {type(doc['tenants']).__name__}")
    tenants = tuple(_tenant(raw, f"{source}: tenants[{i}]") for i, raw in enumerate(doc["tenants"]))
    _check_unique(tenants, source)
    return Tenants(tenants)


def _decode(text: str, source: str, is_yaml: bool):
    if not is_yaml:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith(("{", "[")):
                raise C2CError(f"{source}: not valid JSON: {exc}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise C2CError(f"{source}: not valid YAML or JSON: {exc}") from None


def _tenant(raw, where: str) -> Tenant:
    if not isinstance(raw, dict):
        raise C2CError(f"{where}: each tenant must be an object, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise C2CError(f"{where}: name: must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter "
                       f"or digit), got {name!r}")
    where = f"{where} ({name!r})"
    unknown = set(raw) - _TENANT_FIELDS
    if unknown:
        raise C2CError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                       f"allowed: {', '.join(sorted(_TENANT_FIELDS))}")
    keys = _strings(raw.get("api_keys"), f"{where}: api_keys", allow_empty=False)
    models = _strings(raw.get("models", []), f"{where}: models", allow_empty=True)
    return Tenant(name, tuple(_key_sha256(k) for k in keys), tuple(models), _limits(raw.get("limits"), where))


def _strings(value, where: str, allow_empty: bool) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise C2CError(f"{where}: must be a list of non-empty strings, got {value!r:.80}")
    if not value and not allow_empty:
        raise C2CError(f"{where}: must hold at least one key")
    if len(set(value)) != len(value):
        raise C2CError(f"{where}: lists an entry twice")
    return value


def _key_sha256(key: str) -> str:
    hashed = _HASHED.match(key)
    return hashed.group(1) if hashed else hash_key(key)


def _limits(raw, where: str) -> Limits:
    if raw is None:
        return Limits()
    if not isinstance(raw, dict):
        raise C2CError(f"{where}: limits: must be an object, got {type(raw).__name__}")
    unknown = set(raw) - set(LIMIT_NAMES)
    if unknown:
        raise C2CError(f"{where}: limits: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                       f"allowed: {', '.join(LIMIT_NAMES)}")
    for name, value in raw.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise C2CError(f"{where}: limits.{name}: must be a positive integer (absent or null: unlimited), "
                           f"got {value!r}")
    return Limits(**raw)


def _check_unique(tenants: tuple[Tenant, ...], source: str) -> None:
    names: set[str] = set()
    key_to_name: dict[str, str] = {}
    model_to_name: dict[str, str] = {}
    for tenant in tenants:
        if tenant.name in names:
            raise C2CError(f"{source}: tenant name {tenant.name!r} appears twice")
        names.add(tenant.name)
        for key in tenant.key_sha256s:
            if key in key_to_name:
                raise C2CError(f"{source}: tenant {tenant.name!r}: api_keys: a key of it is also a key of tenant "
                               f"{key_to_name[key]!r}; each key must name one tenant")
            key_to_name[key] = tenant.name
        for model_id in tenant.models:
            if model_id in model_to_name:
                raise C2CError(f"{source}: tenant {tenant.name!r}: models: {model_id!r} is already owned by tenant "
                               f"{model_to_name[model_id]!r}; a model has one owner")
            model_to_name[model_id] = tenant.name


# -- `c2cserve tenants check FILE` -------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("file", help="tenants file (JSON or YAML)")


def run(args) -> int:
    """Validate a tenants file as the gateway will (exit 2 with the reason if it is bad)."""
    loaded = load_file(args.file)
    for t in loaded.tenants:
        limits = ", ".join(f"{k}={v}" for k, v in t.limits.as_dict().items() if v is not None) or "unlimited"
        print(f"{t.name}: {len(t.key_sha256s)} key(s); private models: {', '.join(t.models) or 'none'}; {limits}")
    print(f"{args.file}: valid, {len(loaded.tenants)} tenant(s)")
    return 0
