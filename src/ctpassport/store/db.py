"""The passport store: one row per study (its source CT), holding the passport JSON and study metadata.

Backends (SQLAlchemy 2): an SQLite file (default) or PostgreSQL (``postgresql://`` URLs use psycopg 3).

* **Idempotent adds**: a study is identified by ``source_sha256`` (the CT's hash, see
  :func:`ctpassport.io.load.source_sha256`); adding the same source again returns the stored row and
  changes nothing. Inserts use ``INSERT ... ON CONFLICT DO NOTHING`` so concurrent duplicate adds from
  several processes cannot fail or duplicate.
* **Concurrent writers**: SQLite runs in WAL mode with a busy timeout and ``BEGIN IMMEDIATE``
  transactions (writers queue instead of failing with "database is locked"); PostgreSQL's own locking
  covers it, and the schema is created under an advisory lock.
* **Readers** (``store list``, ``show``, ``register``, the app's list) open the store read-only: SQLite with
  ``mode=ro`` (``immutable`` when its folder cannot be written, e.g. a read-only share), no schema creation.
* ``study_key`` is the short name users type (``store show KEY``, ``register --fixed-study KEY``): given
  with ``--study`` or, by default, the first 12 hex digits of ``source_sha256``.

Dates are ISO ``YYYY-MM-DD``; times UTC.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Self

from ..errors import ConfigError, CTPassportError, InputError, OutputError
from ..passport.schema import Passport, validate_passport

#: Environment variable naming the default store (a URL or an SQLite file path).
DB_ENV = "CTPASSPORT_DB"
SCHEMA_VERSION = 1
_PG_LOCK_KEY = 0x43545053  # "CTPS": advisory lock serialising schema creation on PostgreSQL


class StoreError(CTPassportError):
    """The store cannot do what was asked (unknown study, key taken by another source, bad URL...)."""

    exit_code = 7


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/ctpassport/passports.sqlite`` (``~/.local/share/ctpassport/passports.sqlite``)."""
    base = os.environ.get("XDG_DATA_HOME")
    return (Path(base) if base else Path.home() / ".local" / "share") / "ctpassport" / "passports.sqlite"


def resolve_db_url(db: str | Path | None = None, *, must_exist: bool = False) -> str:
    """A SQLAlchemy URL for ``db``: a URL as given (``postgresql://`` -> ``postgresql+psycopg://``), a file
    path -> ``sqlite:///<absolute path>``; ``None`` -> ``$CTPASSPORT_DB`` or :func:`default_db_path`.

    ``must_exist``: an SQLite file that is not there is an :class:`InputError` (commands that only read never
    create an empty store); otherwise its folder is created."""
    value = str(db) if db is not None else (os.environ.get(DB_ENV) or str(default_db_path()))
    if "://" not in value:
        path = Path(value).expanduser().resolve()
        if must_exist and not path.is_file():
            raise InputError("no such passport store", path, "add passports with `ctpassport store add` first")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # already there when must_exist
        except OSError as exc:
            raise OutputError(f"cannot create the store's folder ({exc.strerror or exc})", path) from None
        return f"sqlite:///{path}"
    scheme, rest = value.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    if scheme.startswith(("postgresql+", "sqlite")):
        return value
    raise ConfigError(f"unsupported database URL scheme {scheme!r}",
                      hint="use an SQLite file path or postgresql://user@host:port/dbname")


def _sqlite_read_only_url(url: str) -> str:
    """``sqlite:///<path>`` opened read-only (SQLite URI ``mode=ro``): reading a store needs no write access.

    A store in a folder the reader cannot write (a read-only share) is opened ``immutable``: SQLite then needs
    no ``-shm`` file, which a WAL-mode database otherwise has to create."""
    from urllib.parse import quote

    path = url[len("sqlite:///"):]
    params = "mode=ro" if os.access(Path(path).parent, os.W_OK) else "mode=ro&immutable=1"
    return f"sqlite:///file:{quote(path)}?{params}&uri=true"


def redact_url(url: str) -> str:
    """``url`` safe to show: a database URL's password replaced by ``***``, in the address or as a libpq
    ``password=`` query parameter (file paths as they are)."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    import re

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        shown = url.split("@")[-1]
    return re.sub(r"([?&]password=)[^&]*", r"\1***", shown)


def _models() -> Any:
    """(metadata, studies table, meta table), declared once (SQLAlchemy is imported lazily)."""
    global _MODELS
    if _MODELS is not None:
        return _MODELS
    from sqlalchemy import Column, Date, DateTime, Integer, MetaData, String, Table, Text

    md = MetaData()
    studies = Table(
        "ctp_studies", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("study_key", String(128), unique=True, nullable=False),
        Column("source_sha256", String(64), unique=True, nullable=False),
        Column("patient_id", String(64), index=True),
        Column("study_date", Date, index=True),
        Column("modality", String(16)),
        Column("study_uid", String(64)),
        Column("series_uid", String(64)),
        Column("description", String(256)),
        Column("source_path", Text),
        Column("model_id", String(256)),
        Column("n_organs", Integer, nullable=False),
        Column("schema_version", String(16), nullable=False),
        Column("passport_json", Text, nullable=False),
        Column("added_at", DateTime(timezone=True), nullable=False),
    )
    meta = Table(
        "ctp_meta", md,
        Column("key", String(64), primary_key=True),
        Column("value", Text, nullable=False),
    )
    _MODELS = (md, studies, meta)
    return _MODELS


_MODELS: Any = None


@dataclass
class StudyMeta:
    """Study metadata stored beside a passport (all optional except the source hash)."""

    source_sha256: str
    study_key: str | None = None
    patient_id: str | None = None
    study_date: str | None = None  # ISO YYYY-MM-DD
    modality: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    description: str | None = None
    source_path: str | None = None


@dataclass
class StudyRecord:
    """A stored study (``passport`` is parsed on demand with :meth:`load_passport`)."""

    id: int
    study_key: str
    source_sha256: str
    patient_id: str | None
    study_date: str | None
    modality: str | None
    study_uid: str | None
    series_uid: str | None
    description: str | None
    source_path: str | None
    model_id: str | None
    n_organs: int
    schema_version: str
    added_at: str
    passport_json: str

    def load_passport(self) -> Passport:
        """The stored passport, validated; :class:`InputError` naming the study when this version cannot read
        it (e.g. one written by a newer ctpassport into a shared store)."""
        return validate_passport(self.passport_json, f"stored study {self.study_key}")

    def summary(self) -> dict[str, Any]:
        """Everything but the passport JSON."""
        return {k: v for k, v in self.__dict__.items() if k != "passport_json"}


def parse_date(value: str | date | None) -> date | None:
    """``YYYY-MM-DD`` or DICOM ``YYYYMMDD`` -> date; :class:`InputError` for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, date):
        return value
    s = str(value).strip()
    try:
        if len(s) == 8 and s.isdigit():
            return date(int(s[:4]), int(s[4:6]), int(s[6:]))
        return date.fromisoformat(s)
    except ValueError:
        raise InputError(f"study date {value!r} is not YYYY-MM-DD or YYYYMMDD") from None


#: How the user gave each length-limited study field (for the error message).
_FIELD_NAMES = {"study_key": "the study key (--study)", "patient_id": "the patient id (--patient-id)",
                "modality": "the modality (--modality)", "study_uid": "the StudyInstanceUID",
                "series_uid": "the SeriesInstanceUID", "model_id": "the passport's model id",
                "schema_version": "the passport's schema version"}


class PassportStore:
    """A connection to the store at ``db`` (see :func:`resolve_db_url`); creates the schema if needed, or with
    ``read_only`` opens an existing store for reading only (its schema checked, never created).

    Safe to use from several processes at once. Close with :meth:`close` (or use as a context manager).
    """

    def __init__(self, db: str | Path | None = None, *, busy_timeout_s: float = 60.0,
                 read_only: bool = False) -> None:
        from sqlalchemy import create_engine, event
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        self.url = resolve_db_url(db, must_exist=read_only)
        self._immutable = False
        try:
            if self.url.startswith("sqlite"):
                ro_url = _sqlite_read_only_url(self.url)
                self._immutable = read_only and "immutable=1" in ro_url
                self.engine = create_engine(ro_url if read_only else self.url,
                                            connect_args={"timeout": busy_timeout_s})

                @event.listens_for(self.engine, "connect")
                def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
                    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
                    cur = dbapi_conn.cursor()
                    cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                    if not read_only:  # setting the journal mode writes; a reader takes the file as it is
                        cur.execute("PRAGMA journal_mode = WAL")
                    cur.execute("PRAGMA foreign_keys = ON")
                    cur.close()

                @event.listens_for(self.engine, "begin")
                def _sqlite_begin(conn: Any) -> None:
                    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
            else:
                self.engine = create_engine(self.url, pool_pre_ping=True)
        except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:  # ValueError: e.g. a bad port
            raise ConfigError(f"cannot use database {redact_url(self.url)} ({str(exc).splitlines()[0][:200]})") from None
        if read_only:
            self.check_schema()
        else:
            self.create_schema()

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _begin(self) -> Iterator[Any]:
        from sqlalchemy.exc import DatabaseError

        try:
            with self.engine.begin() as conn:
                yield conn
        except DatabaseError as exc:  # unreachable, locked, or not a database at all
            msg = str(exc.orig if getattr(exc, "orig", None) is not None else exc).splitlines()[0][:200]
            raise StoreError(f"database {redact_url(self.url)}: {msg}") from None

    def check_schema(self) -> None:
        """Check, reading only, that the database is a passport store this ctpassport understands."""
        from sqlalchemy import inspect, select

        md, _studies, meta = _models()
        self._check_immutable_read()
        with self._begin() as conn:
            names = set(inspect(conn).get_table_names())
            if not names and conn.dialect.name == "sqlite":  # (the file of a store whose first add is running)
                raise InputError("is an empty passport store (no study stored yet)", self.url[len("sqlite:///"):],
                                 "add passports with `ctpassport store add` first")
            if not {tb.name for tb in md.sorted_tables} <= names:
                raise StoreError(f"database {redact_url(self.url)} is not a passport store (no ctpassport tables)")
            row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"the store has schema version {row[0]}; this ctpassport knows {SCHEMA_VERSION}",
                             hint="upgrade ctpassport")

    def _check_immutable_read(self) -> None:
        """A store read from a folder this process cannot write is opened immutable (no locks, its write-ahead
        log ignored): right for a store nobody is writing. One whose ``-wal`` file holds changes (a writer
        elsewhere is using it, or stopped before they were checkpointed) would read stale or as damaged: refused."""
        if not self.url.startswith("sqlite"):
            return
        if not self._immutable:
            return
        path = Path(self.url[len("sqlite:///"):])
        wal = path.with_name(path.name + "-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            raise StoreError(f"{path}: has changes in its write-ahead log ({wal.name}) that a read-only folder "
                             "cannot take in: a writer elsewhere is using it or stopped before checkpointing",
                             hint="read it where its folder is writable, or after the writer's next `store add`")

    def create_schema(self) -> None:
        """Create the tables when missing (safe under concurrency) and record the schema version."""
        from sqlalchemy import select

        md, _studies, meta = _models()
        with self._begin() as conn:
            if conn.dialect.name == "postgresql":
                from sqlalchemy import text

                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            md.create_all(conn, checkfirst=True)
            row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
            if row is None:
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"the store has schema version {row[0]}; this ctpassport knows {SCHEMA_VERSION}",
                                 hint="upgrade ctpassport")

    # -- writing ------------------------------------------------------------------------------------
    def add(self, passport: Passport, meta: StudyMeta) -> tuple[StudyRecord, bool]:
        """Store ``passport`` with ``meta``; returns (the stored record, whether it was new).

        Adding a source already stored (same ``source_sha256``) returns the stored record unchanged
        (``False``). Raises :class:`StoreError` when ``meta.study_key`` belongs to another source.
        """
        from sqlalchemy import insert, select

        _md, t, _meta = _models()
        if not meta.source_sha256 or len(meta.source_sha256) > 64:
            raise InputError("a study needs a source hash (hex SHA-256)")
        if meta.study_key and not meta.study_key.strip():
            raise InputError(f"the study key {meta.study_key!r} is blank", hint="give a name, or none for the hash")
        key = (meta.study_key or "").strip() or meta.source_sha256[:12]
        values = {
            "study_key": key, "source_sha256": meta.source_sha256, "patient_id": meta.patient_id,
            "study_date": parse_date(meta.study_date), "modality": meta.modality, "study_uid": meta.study_uid,
            "series_uid": meta.series_uid, "description": (meta.description or None) and meta.description[:256],
            "source_path": meta.source_path, "model_id": passport.model_id, "n_organs": len(passport.organs),
            "schema_version": passport.schema_version, "passport_json": passport.model_dump_json(),
            "added_at": datetime.now(UTC),
        }
        for name, value in values.items():  # PostgreSQL refuses what SQLite would keep: the same rule for both
            limit = getattr(t.c[name].type, "length", None)
            if isinstance(value, str) and limit is not None and len(value) > limit:
                raise InputError(f"{_FIELD_NAMES.get(name, name)} is {len(value)} characters long "
                                 f"({value[:24]!r}...); the store keeps at most {limit}")
        with self._begin() as conn:
            dialect = conn.dialect.name
            upsert: Any = None
            if dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                upsert = pg_insert(t)
            elif dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                upsert = sqlite_insert(t)
            if upsert is not None:
                stmt = upsert.values(**values).on_conflict_do_nothing().returning(t.c.id)
                created = conn.execute(stmt).first() is not None
            else:  # pragma: no cover - other databases: plain insert, a duplicate is an IntegrityError
                from sqlalchemy.exc import IntegrityError

                try:
                    with conn.begin_nested():
                        conn.execute(insert(t).values(**values))
                    created = True
                except IntegrityError:
                    created = False
            row = conn.execute(select(t).where(t.c.source_sha256 == meta.source_sha256)).mappings().first()
            if row is None:
                raise StoreError(f"study key {key!r} is already used by another source",
                                 hint="choose another --study name")
            return _record(row), created

    def delete(self, study: str) -> StudyRecord:
        """Remove a study (by key, id or hash prefix); returns what was removed."""
        _md, t, _meta = _models()
        rec = self.get(study)
        with self._begin() as conn:
            conn.execute(t.delete().where(t.c.id == rec.id))
        return rec

    # -- reading ------------------------------------------------------------------------------------
    def list(self, *, patient_id: str | None = None, modality: str | None = None) -> list[StudyRecord]:
        """Stored studies, ordered by patient, study date and key."""
        from sqlalchemy import select

        _md, t, _meta = _models()
        q = select(t)
        if patient_id is not None:
            q = q.where(t.c.patient_id == patient_id)
        if modality is not None:
            q = q.where(t.c.modality == modality)
        q = q.order_by(t.c.patient_id, t.c.study_date, t.c.study_key)
        with self._begin() as conn:
            return [_record(r) for r in conn.execute(q).mappings()]

    def count(self) -> int:
        from sqlalchemy import func, select

        _md, t, _meta = _models()
        with self._begin() as conn:
            return int(conn.execute(select(func.count()).select_from(t)).scalar_one())

    def get(self, study: str) -> StudyRecord:
        """A study by key, numeric id, or a unique prefix (>= 6 hex digits) of its source hash."""
        from sqlalchemy import or_, select

        _md, t, _meta = _models()
        conds = [t.c.study_key == study]
        if study.isdigit():
            conds.append(t.c.id == int(study))
        is_hex = len(study) >= 6 and all(ch in "0123456789abcdef" for ch in study.lower())
        if is_hex:
            conds.append(t.c.source_sha256.startswith(study.lower(), autoescape=True))
        with self._begin() as conn:
            rows = [_record(r) for r in conn.execute(select(t).where(or_(*conds))).mappings()]
        exact = [r for r in rows if r.study_key == study]
        if exact:
            return exact[0]
        if len(rows) == 1:
            return rows[0]
        if not rows:
            raise StoreError(f"no study {study!r} in the store", hint="`ctpassport store list` shows the keys")
        raise StoreError(f"{study!r} matches {len(rows)} studies", hint="use the full key")


def _record(row: Any) -> StudyRecord:
    d = dict(row)
    added = d["added_at"]
    if isinstance(added, datetime):
        if added.tzinfo is None:
            added = added.replace(tzinfo=UTC)
        added = added.isoformat(timespec="seconds")
    sd = d["study_date"]
    return StudyRecord(
        id=int(d["id"]), study_key=d["study_key"], source_sha256=d["source_sha256"], patient_id=d["patient_id"],
        study_date=sd.isoformat() if isinstance(sd, date) else sd, modality=d["modality"],
        study_uid=d["study_uid"], series_uid=d["series_uid"], description=d["description"],
        source_path=d["source_path"], model_id=d["model_id"], n_organs=int(d["n_organs"]),
        schema_version=d["schema_version"], added_at=str(added), passport_json=d["passport_json"],
    )


def record_json(rec: StudyRecord, *, with_passport: bool = False) -> str:
    """JSON of a record (the passport embedded as an object when ``with_passport``)."""
    doc: dict[str, Any] = rec.summary()
    if with_passport:
        doc["passport"] = json.loads(rec.passport_json)
    return json.dumps(doc, indent=2)
