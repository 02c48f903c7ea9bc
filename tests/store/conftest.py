"""Store fixtures: every store test runs on SQLite and on PostgreSQL.

PostgreSQL comes from ``$CTPASSPORT_TEST_POSTGRES_URL`` (e.g. set by ``eval "$(.ci/postgres.sh)"``) or,
when that is unset and the Debian server binaries exist (``/usr/lib/postgresql/*/bin``), from a throwaway
cluster this session starts on a free loopback port (as the ``postgres`` OS user when running as root)
and removes afterwards. Without either, the PostgreSQL variants are skipped with the reason. Each test
gets its own fresh database.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

PG_ENV = "CTPASSPORT_TEST_POSTGRES_URL"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A server URL (``postgresql+psycopg://user@127.0.0.1:port/postgres``)."""
    url = os.environ.get(PG_ENV)
    if url:
        yield url
        return
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in Path(p).parent.name.split(".")
                                                                           if x.isdigit()])
    if not bins or not Path(bins[-1], "initdb").exists():
        pytest.skip(f"no PostgreSQL: set {PG_ENV} or install the postgresql server package")
    if os.geteuid() == 0:
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' OS user to run the server")
    bin_dir = Path(bins[-1])
    base = Path(tempfile.mkdtemp(prefix="ctp-pg-"))  # /tmp: reachable by the postgres user
    if os.geteuid() == 0:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data = base / "data"
    port = _free_port()
    subprocess.run(_as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", "ctpassport", "-A", "trust",
                              "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
    opts = (f"-p {port} -c listen_addresses=127.0.0.1 -k {base} -c fsync=off -c synchronous_commit=off "
            f"-c full_page_writes=off -c max_connections=100")
    subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w",
                              "-t", "60", "-o", opts, "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://ctpassport@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _psycopg_conninfo(url: str) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def postgres_db(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the server; dropped after the test."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"ctp_test_{uuid.uuid4().hex[:12]}"
    admin = _psycopg_conninfo(postgres_server)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store URL of one backend: an SQLite file path, or a PostgreSQL database URL."""
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite")
    return str(request.getfixturevalue("postgres_db"))


# ------------------------------------------------------------------------------------------------
# passports
# ------------------------------------------------------------------------------------------------
def blob_labels(shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0), angle_deg: float = 0.0,
                shape: tuple[int, int, int] = (60, 60, 50), spacing: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Four ellipsoid 'organs' (ids 1, 2, 3, 5 = spleen, kidneys, liver) moved rigidly by a rotation of
    ``angle_deg`` about +z and a translation ``shift_mm`` (world mm, RAS+), on a 3 mm grid."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -np.array(shape) * spacing / 2
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    t = np.radians(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    # a point p of the moved scan shows the organ point rot^-1 (p - shift)
    src = (xyz - np.asarray(shift_mm)) @ rot
    labels = np.zeros(len(xyz), dtype=np.uint8)
    organs = {1: ((-40, 10, 10), (18, 14, 24)), 2: ((30, -20, -10), (12, 10, 20)),
              3: ((-30, -20, -12), (12, 10, 20)), 5: ((25, 25, 20), (30, 22, 18))}
    for k, (c, r) in organs.items():
        inside = (((src - np.asarray(c)) / np.asarray(r)) ** 2).sum(axis=1) <= 1.0
        labels[inside] = k
    return labels.reshape(shape), affine


@pytest.fixture(scope="session")
def make_passport():  # type: ignore[no-untyped-def]
    """``make_passport(shift_mm=(0, 0, 0), angle_deg=0)`` -> a Passport of :func:`blob_labels`."""
    from ctpassport.passport.build import build_passport

    def make(shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0), angle_deg: float = 0.0, points: int = 200):
        labels, affine = blob_labels(shift_mm, angle_deg)
        return build_passport(labels, affine, points=points, seed=0)

    return make


@pytest.fixture
def wait_until():  # type: ignore[no-untyped-def]
    def wait(pred, timeout: float = 30.0, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(step)
        return bool(pred())

    return wait
