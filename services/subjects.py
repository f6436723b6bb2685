"""Every NATS subject name, built here and nowhere else."""

from __future__ import annotations

PREFIX = "c2c"
SUBMIT = f"{PREFIX}.sched.submit"  # gateway -> placer, queue group PLACER_QUEUE
PLACER_QUEUE = "placer"
TELEMETRY_ALL = f"{PREFIX}.telemetry.*"
CONTROLLER_QUEUE = "controller"


def _token(value: str) -> str:
    """A subject token: no dots, spaces or wildcards (they would change the subject's shape)."""
    if not value or any(c in value for c in ". *>\t\r\n"):
        raise ValueError(f"not a valid subject token: {value!r}")
    return value


def worker_submit(worker_id: str) -> str:
    return f"{PREFIX}.worker.{_token(worker_id)}.submit"


def worker_abort(worker_id: str) -> str:
    return f"{PREFIX}.worker.{_token(worker_id)}.abort"


def worker_residency(worker_id: str) -> str:
    return f"{PREFIX}.worker.{_token(worker_id)}.residency"


def worker_migrate(worker_id: str, step: str = "") -> str:
    """`c2c.worker.<id>.migrate` (MigrateCommand) and, with a step, the target side of a live
    migration: `migrate_offer`, `migrate_kv`, `migrate_commit`, `migrate_cancel`."""
    if step not in MIGRATION_STEPS:
        raise ValueError(f"unknown migration step {step!r}")
    return f"{PREFIX}.worker.{_token(worker_id)}.migrate{'_' + step if step else ''}"


MIGRATION_STEPS = ("", "offer", "kv", "commit", "cancel")


def telemetry(worker_id: str) -> str:
    return f"{PREFIX}.telemetry.{_token(worker_id)}"


def control(worker_id: str) -> str:
    return f"{PREFIX}.control.{_token(worker_id)}"


def worker_id_of(subject: str) -> str:
    """The worker id in `c2c.telemetry.<id>` / `c2c.control.<id>` / `c2c.worker.<id>.*`."""
    parts = subject.split(".")
    return parts[2]


def gateway_inbox_prefix(gateway_id: str) -> str:
    """All reply inboxes of one gateway process; it subscribes to `<prefix>.*` once."""
    return f"{PREFIX}.inbox.{_token(gateway_id)}"


def gateway_inbox_all(gateway_id: str) -> str:
    return f"{gateway_inbox_prefix(gateway_id)}.*"


def gateway_inbox(gateway_id: str, request_id: str) -> str:
    """The reply inbox of one request: TokenChunks for it arrive here."""
    return f"{gateway_inbox_prefix(gateway_id)}.{_token(request_id)}"


def request_id_of_inbox(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def gateway_id_of_inbox(subject: str) -> str:
    """The gateway id in `c2c.inbox.<gateway_id>.<request_id>` ("" for another subject)."""
    parts = subject.split(".")
    return parts[2] if len(parts) == 4 and parts[1] == "inbox" else ""


def worker_pipeline(worker_id: str) -> str:
    """placer -> worker: serve a model as a pipeline of stages (`stage_wire.PipelineCommand`)."""
    return f"{PREFIX}.worker.{_token(worker_id)}.pipeline"


def stage(stage_id: str) -> str:
    """A pipeline stage server's calls (worker/stage_server.py): `StageCall` frames in parts."""
    return f"{PREFIX}.stage.{_token(stage_id)}"
