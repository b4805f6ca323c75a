"""All DuckDB SQL lives here: read-only views over a library's Parquet files.

The connection may read only the library folder (DuckDB's allowed_directories
with external access off and the configuration locked), and only SELECT
statements are run, so a query cannot write or read anything else.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import duckdb

from refbuild.errors import RefbuildError
from refbuild.library import Library

VIEWS = {
    "faces": lambda lib: lib.faces,
    "rejects": lambda lib: lib.rejects,
    "features": lambda lib: lib.features("hr"),
    "features_lr": lambda lib: lib.features("lr"),
    "splits": lambda lib: lib.splits,
    "pairs": lambda lib: lib.pairs,
}


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def connect(lib: Library) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory connection with one view per Parquet file present."""
    root = lib.root.resolve()
    if not root.is_dir():
        raise RefbuildError(f"{lib.root}: library folder not found")
    con = duckdb.connect(":memory:", config={"temp_directory": ""})  # DuckDB allows reads of its temp dir (<cwd>/.tmp)
    con.execute(f"SET allowed_directories=[{_quote(str(root) + '/')}]")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
    present = []
    for name, where in VIEWS.items():
        path = where(Library(root))
        if path.is_file():
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_quote(path)})")
            present.append(name)
    return con, present


DEFAULT_TIMEOUT = 60.0  # seconds a query may run before it is interrupted


def _check_select(sql: str) -> None:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise RefbuildError(f"SQL does not parse: {str(e).splitlines()[0]}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise RefbuildError("refbuild query runs one read-only SELECT statement (WITH ... SELECT is fine)")


@contextmanager
def open_query(lib: Library, sql: str, timeout: float | None = DEFAULT_TIMEOUT):
    """Run one read-only SELECT over the library's views; yields (columns, fetch), where
    fetch(n) returns the next at most n rows ([] at the end), so no caller holds every row.
    The query (fetches included) is interrupted after `timeout` seconds (None or 0: never)."""
    _check_select(sql)
    con, present = connect(lib)
    timer = threading.Timer(timeout, con.interrupt) if timeout else None

    def guarded(call):
        try:
            return call()
        except duckdb.InterruptException:
            raise RefbuildError(f"{lib.root}: query stopped after {timeout:g} s; add a WHERE or LIMIT, "
                                "or pass --timeout SECONDS (0: no limit)") from None
        except duckdb.CatalogException as e:
            raise RefbuildError(f"{str(e).splitlines()[0]} "
                                f"(views in {lib.root}: {', '.join(present) or 'none'})") from None
        except duckdb.Error as e:
            raise RefbuildError(f"query failed: {str(e).splitlines()[0]}") from None
        except MemoryError:
            raise RefbuildError(f"{lib.root}: out of memory running the query; add a WHERE or LIMIT") from None

    try:
        if timer is not None:
            timer.daemon = True
            timer.start()
        cur = guarded(lambda: con.execute(sql))
        yield [d[0] for d in cur.description], lambda n: guarded(lambda: cur.fetchmany(n))
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


def run_query(lib: Library, sql: str, max_rows: int | None = None,
              timeout: float | None = DEFAULT_TIMEOUT) -> tuple[list[str], list[tuple]]:
    """Run one read-only SELECT over the library's views; returns (columns, rows): all rows,
    or the first `max_rows` when given."""
    with open_query(lib, sql, timeout) as (cols, fetch):
        if max_rows is not None:
            return cols, fetch(max_rows)
        rows: list[tuple] = []
        while batch := fetch(10_000):
            rows += batch
        return cols, rows

