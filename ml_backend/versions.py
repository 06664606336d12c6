"""Registry of model versions: which exist, how they scored, which one serves.

Every version has a :class:`VersionRecord` (name, created, status, parent, checkpoint, metrics,
reason). The registry lives in Redis (hash ``RedisKeys.versions``, key ``RedisKeys.serving``) and
is mirrored to ``VERSIONS_DIR/versions.json`` after every change (temp file + rename, so a crash
never leaves half a file); when Redis has lost it, it is restored from that file. Fine-tuned
checkpoints are written next to it under ``checkpoints/`` and never overwritten.

Versions are per project. The ``serving`` key names the *base* version: the model the workers
were started with (or one an operator promoted over it), which serves every project without a
version of its own. A fine-tune belongs to the project whose corrections made it (its
``scope``, ``schemas.project_scope``: Label Studio origin and project id); once promoted it
serves that project only, named in the hash ``RedisKeys.project_serving``, and the next
fine-tune of that project starts from it (its lineage). Rolling a project back removes or
changes its own entry and nothing else.

Statuses: ``training`` (a job is producing it), ``serving`` (the base, or a project's own),
``retired`` (served before), ``rejected`` (trained, but not better on the held-out set),
``failed`` (the job failed; ``reason`` says why). Workers read the small ``serving`` key between
jobs (:func:`read_serving`) and reload their base when it names another version; a job's
project's entry is one HGET (:func:`read_project_serving`), and its trained parts are swapped
in on the worker's base (``ml_backend.project_heads``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import logging

from redis import Redis

from ml_backend.errors import VersionError
from ml_backend.schemas import RedisKeys, known_fields
from talk2sam.files import atomic_write_text, fsync_path

log = logging.getLogger(__name__)

STATUSES = ("training", "serving", "retired", "rejected", "failed")
DEFAULT_PREFIX = RedisKeys().prefix  # what files written before they named their prefix used
LOCK_TIMEOUT_S = 30


@dataclass(frozen=True)
class ServingVersion:
    """What workers must load: a version name and its checkpoint (None: the base model of
    MODEL_CONFIG / MODEL_CHECKPOINT)."""

    name: str
    checkpoint: str | None


@dataclass(frozen=True)
class VersionRecord:
    """One model version.

    Attributes:
        name: the model_version reported to Label Studio.
        created: UTC ISO time.
        status: one of :data:`STATUSES`.
        parent: the version it was fine-tuned from, or None for a base model.
        checkpoint: path of its checkpoint, or None for the base model built from the settings.
        metrics: held-out scores and training facts (``old``/``new`` mIoU and mBIoU, counts).
        reason: why it was rejected or failed, or None.
        job_id: the training job that made it, or None.
        project: the Label Studio project it learnt from, or None.
        config: for a base model registered by a worker, the MODEL_CONFIG it was built from.
        scope: for a fine-tune, the project it serves once promoted (origin and id); None for
            a base (or a version of a release that kept one version for every project).
    """

    name: str
    created: str
    status: str
    parent: str | None = None
    checkpoint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    job_id: str | None = None
    project: int | None = None
    config: str | None = None
    scope: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VersionRecord:
        return cls(**known_fields(cls, raw))  # a field of a newer release is left out


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def read_serving(redis: Redis, keys: RedisKeys) -> ServingVersion | None:
    """The version workers must serve, or None when none was ever promoted (one GET)."""
    return _pointed(redis.get(keys.serving))


def read_project_serving(redis: Redis, keys: RedisKeys, scope: str | None
                         ) -> ServingVersion | None:
    """The version fine-tuned for ``scope`` and serving it, or None: the base serves (one
    HGET)."""
    return _pointed(redis.hget(keys.project_serving, scope) if scope else None)


def read_project_pointers(redis: Redis, keys: RedisKeys) -> dict[str, str]:
    """Scope -> name of the version serving it, for every project with its own (one HGETALL)."""
    raw = redis.hgetall(keys.project_serving)
    return {k.decode(): json.loads(v)["name"] for k, v in sorted(raw.items())}


def _pointer(record: VersionRecord) -> str:
    """What a serving key holds (read back by :func:`_pointed`)."""
    return json.dumps({"name": record.name, "checkpoint": record.checkpoint})


def _pointed(raw: bytes | None) -> ServingVersion | None:
    if raw is None:
        return None
    data = json.loads(raw)
    return ServingVersion(name=data["name"], checkpoint=data.get("checkpoint"))


def _same_file(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return os.path.realpath(a) == os.path.realpath(b)


class VersionRegistry:
    """Read and change the registry (Redis first, ``versions.json`` mirrored).

    Args:
        redis: connection.
        keys: key names.
        directory: VERSIONS_DIR (``versions.json`` and ``checkpoints/``).
    """

    def __init__(self, redis: Redis, keys: RedisKeys, directory: str | os.PathLike):
        self.redis = redis
        self.keys = keys
        self.directory = Path(directory)
        self._held = threading.local()  # whether this thread holds the registry's lock

    @property
    def file(self) -> Path:
        return self.directory / "versions.json"

    def checkpoint_path(self, name: str) -> Path:
        return self.directory / "checkpoints" / f"{name}.pt"

    # ------------------------------------------------------------ reading

    def list(self) -> list[VersionRecord]:
        """Every version, oldest first."""
        self._restore_if_lost()
        raw = self.redis.hgetall(self.keys.versions)
        records = [VersionRecord.from_dict(json.loads(v)) for v in raw.values()]
        return sorted(records, key=lambda r: (r.created, r.name))

    def get(self, name: str) -> VersionRecord | None:
        self._restore_if_lost()
        raw = self.redis.hget(self.keys.versions, name)
        return VersionRecord.from_dict(json.loads(raw)) if raw is not None else None

    def serving(self) -> VersionRecord | None:
        """The serving version's record, or None when none was registered."""
        current = self.serving_version()
        return self.get(current.name) if current else None

    def serving_version(self) -> ServingVersion | None:
        """What workers must serve, restored from ``versions.json`` first when Redis lost it."""
        self._restore_if_lost()
        return read_serving(self.redis, self.keys)

    def project_version(self, scope: str | None) -> ServingVersion | None:
        """The version fine-tuned for ``scope`` that serves it; None when the base does."""
        self._restore_if_lost()
        return read_project_serving(self.redis, self.keys, scope)

    def serving_for(self, scope: str | None) -> VersionRecord | None:
        """The record of what serves ``scope``: its own version, else the base."""
        own = self.project_version(scope)
        return self.get(own.name) if own is not None else self.serving()

    def projects(self) -> dict[str, str]:
        """Scope -> name of the version serving it, for every project with its own."""
        self._restore_if_lost()
        return read_project_pointers(self.redis, self.keys)

    # ------------------------------------------------------------ changing

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self.redis.lock(self.keys.versions_lock, timeout=LOCK_TIMEOUT_S,
                             blocking_timeout=LOCK_TIMEOUT_S):
            self._held.active = True  # this thread's reads inside need not take it again
            try:
                yield
            finally:
                self._held.active = False

    def put(self, record: VersionRecord) -> VersionRecord:
        """Add or replace a record (its status must not be ``serving``: see :meth:`promote`)."""
        if record.status not in STATUSES or record.status == "serving":
            raise VersionError(f"cannot store {record.name} as {record.status!r} with put()")
        with self._locked():
            self._restore_locked()
            self._check_file()
            self._store(self.redis, record)
            self._mirror()
        return record

    def base_of(self, record: VersionRecord) -> VersionRecord:
        """The base model a version was fine-tuned from (itself for a base model)."""
        for _ in range(1000):  # a registry never holds a cycle; this bounds a corrupt one
            parent = self.get(record.parent) if record.parent else None
            if parent is None:
                return record
            record = parent
        return record

    def descends_from(self, record: VersionRecord, checkpoint: str | None,
                      config: str | None) -> bool:
        """Whether ``record`` is, or was fine-tuned from, the base model of these settings
        (MODEL_CHECKPOINT, else MODEL_CONFIG)."""
        base = self.base_of(record)
        if not _same_file(base.checkpoint, checkpoint):
            return False
        return checkpoint is not None or base.config is None or base.config == config

    def ensure_base(self, name: str, checkpoint: str | None,
                    config: str | None = None) -> VersionRecord:
        """Register the model a worker was started with as serving, unless what serves is that
        model or was fine-tuned from it. A serving version of another base (an earlier start
        with other model settings: the demo before real weights were downloaded, another
        MODEL_CHECKPOINT) gives way; it stays in the registry, retired, for a rollback.

        Returns:
            The serving record.
        """
        with self._locked():
            self._restore_locked()
            self._check_file()
            current = read_serving(self.redis, self.keys)
            previous = self.get(current.name) if current else None
            if previous is not None and self.descends_from(previous, checkpoint, config):
                return previous
            known = self.get(name)
            record = replace(known, status="serving") if known is not None and _same_file(
                known.checkpoint, checkpoint) else VersionRecord(
                    name=name, created=utc_now(), status="serving", checkpoint=checkpoint,
                    config=config)
            self._set_serving(record, previous)
            self._mirror()
            return record

    def promote(self, name: str, reason: str | None = None,
                only_if_serving: str | None = None) -> VersionRecord:
        """Make ``name`` serve: a fine-tune its own project (the project's previous own version
        becomes ``retired``; the base keeps serving the others), any other version as the base
        (the base before becomes ``retired``).

        Args:
            name: the version to serve.
            reason: stored with it (e.g. ``rollback``).
            only_if_serving: promote only while this version serves the same project (a
                fine-tuned child replaces its parent, never a version rolled back to during its
                training).

        Raises:
            VersionError: unknown version, its checkpoint file is missing, or
                ``only_if_serving`` no longer serves.
        """
        with self._locked():
            self._restore_locked()
            self._check_file()
            record = self.get(name)
            if record is None:
                raise VersionError(f"no version named {name!r}; see `versions.py list`")
            if record.checkpoint is not None and not Path(record.checkpoint).is_file():
                raise VersionError(f"version {name}: checkpoint {record.checkpoint} is missing")
            if record.status == "failed" or (record.status == "training"
                                             and record.checkpoint is None):
                raise VersionError(f"version {name} is {record.status} and cannot serve")
            own = read_project_serving(self.redis, self.keys, record.scope)
            current = own or read_serving(self.redis, self.keys)
            if only_if_serving is not None and (current is None
                                                or current.name != only_if_serving):
                raise VersionError(
                    f"{name} was trained from {only_if_serving}, but "
                    f"{current.name if current else 'no version'} serves now (rolled back or "
                    f"promoted meanwhile); it is not promoted over it")
            if record.checkpoint is not None:
                fsync_path(record.checkpoint)  # on the disk before any worker is sent to it
            record = replace(record, status="serving",
                             reason=reason if reason is not None else record.reason)
            if record.scope is not None:
                self._set_project_serving(record, self.get(own.name) if own else None)
            else:
                self._set_serving(record, self.get(current.name) if current else None)
            self._mirror()
            return record

    def rollback_project(self, scope: str, name: str | None = None) -> VersionRecord | None:
        """Serve ``scope`` with its earlier version ``name`` (one of its own, not failed), or
        with the base when ``name`` is None; no other project changes.

        Returns:
            The record now serving the project (None: the base, unknown).

        Raises:
            VersionError: ``name`` is not a version of this project, or cannot serve.
        """
        if name is not None:
            record = self.get(name)
            if record is None or record.scope != scope:
                raise VersionError(f"{name!r} is not a version of project {scope}; see "
                                   f"`versions.py list --project ...`")
            return self.promote(name, reason="rollback")
        with self._locked():
            self._restore_locked()
            self._check_file()
            own = read_project_serving(self.redis, self.keys, scope)
            pipe = self.redis.pipeline(transaction=True)
            if own is not None and (previous := self.get(own.name)) is not None:
                self._store(pipe, replace(previous, status="retired"))
            pipe.hdel(self.keys.project_serving, scope)
            pipe.execute()
            self._mirror()
        return self.serving()

    def fail_training(self, job_id: str, reason: str) -> list[VersionRecord]:
        """Mark the ``training`` versions of ``job_id`` failed (their job is gone)."""
        with self._locked():
            self._check_file()
            failed = [replace(r, status="failed", reason=reason) for r in self.list()
                      if r.status == "training" and r.job_id == job_id]
            for r in failed:
                self._store(self.redis, r)
            if failed:
                self._mirror()
            return failed

    def _set_serving(self, record: VersionRecord, previous: VersionRecord | None) -> None:
        """Serve ``record`` as the base. A project whose version was fine-tuned from another
        base cannot run on this one: it is served by the base again (its version is kept,
        retired, for a rollback), so that what /setup reports is what answers."""
        root = self.base_of(record)
        stale = [own for own in (self.get(n) for n in read_project_pointers(
            self.redis, self.keys).values()) if own is not None
            and not self.descends_from(own, root.checkpoint, root.config)]
        pipe = self._replacing(record, previous)
        for own in stale:
            log.warning("project %s: its version %s was fine-tuned from another base than %s; "
                        "the base serves it now", own.scope, own.name, record.name)
            self._store(pipe, replace(own, status="retired", reason=f"its base no longer "
                                                                     f"serves ({record.name} does)"))
            pipe.hdel(self.keys.project_serving, own.scope)
        pipe.set(self.keys.serving, _pointer(record))
        pipe.execute()

    def _set_project_serving(self, record: VersionRecord, previous: VersionRecord | None
                             ) -> None:
        pipe = self._replacing(record, previous)
        pipe.hset(self.keys.project_serving, record.scope, _pointer(record))
        pipe.execute()

    def _replacing(self, record: VersionRecord, previous: VersionRecord | None) -> Any:
        """A transaction that stores ``record`` and retires ``previous``, the version it
        replaces; the caller adds the pointer and executes it."""
        pipe = self.redis.pipeline(transaction=True)
        if previous is not None and previous.name != record.name:
            self._store(pipe, replace(previous, status="retired"))
        self._store(pipe, record)
        return pipe

    def _store(self, pipe: Any, record: VersionRecord) -> None:
        """Write ``record`` through ``pipe`` (a pipeline, or the connection itself)."""
        pipe.hset(self.keys.versions, record.name, json.dumps(record.to_dict()))

    # ------------------------------------------------------------ disk mirror

    def _mirror(self) -> None:
        raw = self.redis.hgetall(self.keys.versions)
        records = sorted((json.loads(v) for v in raw.values()),
                         key=lambda r: (r["created"], r["name"]))
        current = read_serving(self.redis, self.keys)
        projects = read_project_pointers(self.redis, self.keys)
        try:  # Redis holds the change already; the mirror is its backup
            atomic_write_text(self.file, json.dumps(
                {"key_prefix": self.keys.prefix, "serving": current.name if current else None,
                 "projects": projects, "versions": records}, indent=1))
        except OSError as exc:
            log.error("the registry changed in Redis but %s was not written: %s", self.file, exc)

    def _check_file(self) -> None:
        """Refuse to change a registry whose mirror belongs to another backend (before any
        Redis write, so that nothing changes half-way)."""
        saved = self._saved()
        prefix = saved.get("key_prefix", DEFAULT_PREFIX)
        if saved and prefix != self.keys.prefix:
            raise VersionError(
                f"{self.file} holds the registry of KEY_PREFIX {prefix!r}, not "
                f"{self.keys.prefix!r}: give each backend its own VERSIONS_DIR")

    def _saved(self) -> dict[str, Any]:
        """The mirror's content; {} when there is none or it is unreadable."""
        try:
            saved = json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("%s is unreadable, not used: %s", self.file, exc)
            return {}
        return saved if isinstance(saved, dict) else {}

    def _restore_if_lost(self) -> None:
        """Refill Redis from ``versions.json`` when Redis holds no registry (flushed, new), if
        the file was written for the same KEY_PREFIX. Under the registry's lock, like every
        change: a reader restoring unlocked could write the file's older records over a change
        made meanwhile."""
        if self.redis.exists(self.keys.versions) or not self.file.is_file():
            return
        if getattr(self._held, "active", False):
            self._restore_locked()
            return
        with self._locked():
            self._restore_locked()

    def _restore_locked(self) -> None:
        """:meth:`_restore_if_lost` for a caller holding the lock."""
        if self.redis.exists(self.keys.versions) or not self.file.is_file():
            return  # restored meanwhile, or nothing to restore from
        saved = self._saved()
        if saved.get("key_prefix", DEFAULT_PREFIX) != self.keys.prefix:
            return
        records = {r["name"]: r for r in saved.get("versions", [])}
        if not records:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.versions, mapping={n: json.dumps(r) for n, r in records.items()})
        serving = records.get(saved.get("serving") or "")
        if serving is not None:
            pipe.set(self.keys.serving, _pointer(VersionRecord.from_dict(serving)), nx=True)
        for scope, name in (saved.get("projects") or {}).items():
            if name in records:
                pipe.hsetnx(self.keys.project_serving, scope,
                            _pointer(VersionRecord.from_dict(records[name])))
        pipe.execute()
