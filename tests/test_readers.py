"""Reading the results table (#17): polars (lazy, filters pushed down), pandas, pyarrow datasets and
DuckDB read the same rows; read_results filters before it decrypts, so a reader holding one
tenant's key reads that tenant's rows of a table that also holds others."""

from __future__ import annotations

import base64
import os

import duckdb
import polars as pl
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from actors.writer import CommitWriter
from crypto.keyring import Keyring, LocalMasterKeyProvider
from crypto.reader import read_results
from schemas.errors import KeyPermissionError
from schemas.spec import parse_spec
from tests.conftest import results_table
from tests.test_delta_sink import TP0, dead


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A results table of 40 rows for two tenants, output_text encrypted, partitioned by tenant."""
    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    keyring = tmp_path / "keys" / "all.json"
    kr = Keyring.init(keyring, LocalMasterKeyProvider())
    kr.create_tenant("acme")
    kr.create_tenant("globex")
    spec = parse_spec({
        "name": "readers", "source": {"kafka": {"topic": "t"}}, "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": "m"},
        "sink": {"results": str(tmp_path / "res"), "dead_letter": str(tmp_path / "dl"), "partition_by": ["tenant"]},
        "encryption": {"keyring": str(keyring), "tenant": "acme", "output_fields": ["output_text"]},
    })  # fmt: skip
    writer = CommitWriter(spec)
    writer.open()
    writer.resume([TP0])
    for c in range(4):
        offsets = list(range(10 * c, 10 * c + 10))
        rows = results_table(offsets, output_text=[f"answer {o}" for o in offsets],
                             tenant=["acme" if o % 2 else "globex" for o in offsets],
                             status=["flagged" if o % 5 == 0 else "ok" for o in offsets])  # fmt: skip
        writer.write_tables(rows, dead([]).slice(0, 0), {TP0: offsets[-1]}, None)
    acme_only = tmp_path / "keys" / "acme.json"
    kr.export(acme_only, ["acme"], same_master_key=True)
    return {"uri": str(tmp_path / "res"), "all": keyring, "acme": acme_only}


def test_read_results_filters_then_decrypts_only_what_is_selected(table):
    acme = pl.col("tenant") == "acme"
    got = read_results(table["uri"], table["acme"], columns=["source_offset", "output_text"], where=acme)
    assert got.columns == ["source_offset", "output_text"]
    assert sorted(got["source_offset"]) == list(range(1, 40, 2))
    assert set(got["output_text"]) == {f"answer {o}" for o in range(1, 40, 2)}
    with pytest.raises(KeyPermissionError, match="globex"):  # the other tenant's rows need its key
        read_results(table["uri"], table["acme"], columns=["output_text"])
    everything = read_results(table["uri"], table["all"], where=pl.col("status") == "flagged", backend="pandas")
    assert sorted(everything["source_offset"]) == [0, 5, 10, 15, 20, 25, 30, 35]


def test_an_encrypted_column_is_text_whatever_rows_are_selected(table):
    """A filter that leaves none of an encrypted column's values (here: no rows) returned it as
    binary, and as text otherwise: two reads of one table did not concatenate."""
    none = read_results(table["uri"], table["all"], columns=["source_offset", "output_text"],
                        where=pl.col("status") == "no such status")  # fmt: skip
    some = read_results(table["uri"], table["all"], columns=["source_offset", "output_text"],
                        where=pl.col("status") == "flagged")  # fmt: skip
    assert none.height == 0 and none.schema == some.schema and some.schema["output_text"] == pl.String
    assert pl.concat([some, none]).height == some.height


def test_polars_pandas_pyarrow_and_duckdb_read_the_same_rows(table):
    uri = table["uri"]
    lazy = pl.scan_delta(uri).filter(pl.col("status") == "ok").select("id", "source_offset", "tenant")
    by_polars = sorted(lazy.collect()["source_offset"])
    dt = DeltaTable(uri)
    by_pandas = sorted(dt.to_pandas(columns=["source_offset"], filters=[("status", "=", "ok")])["source_offset"])
    ds = dt.to_pyarrow_dataset()
    by_arrow = sorted(ds.to_table(columns=["source_offset"], filter=pc.field("status") == "ok")["source_offset"].to_pylist())
    files = dt.file_uris()  # the current version's files: what DuckDB reads offline (no delta extension download)
    by_duckdb = sorted(r[0] for r in duckdb.sql(
        f"SELECT source_offset FROM read_parquet({files!r}) WHERE status = 'ok'").fetchall())  # fmt: skip
    expected = [o for o in range(40) if o % 5]
    assert by_polars == by_pandas == by_arrow == by_duckdb == expected
    # encrypted columns read as stored bytes everywhere except read_results
    assert pl.read_delta(uri)["output_text"].dtype == pl.Binary


def test_a_keyring_path_is_opened_with_the_master_key_variable_the_job_names(table, monkeypatch):
    """A job whose spec says encryption.master_key_env: ACME_MASTER_KEY is read with that variable:
    crypto.reader.read_results(master_key_env=...), and tidegate.read_results(spec, keyring=PATH)
    from the spec. Before stop 44 a keyring given as a path always took TIDEGATE_MASTER_KEY."""
    import tidegate
    from schemas.errors import KeyringError

    monkeypatch.setenv("ACME_MASTER_KEY", os.environ["TIDEGATE_MASTER_KEY"])
    monkeypatch.setenv("TIDEGATE_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())  # another key
    acme = pl.col("tenant") == "acme"
    with pytest.raises(KeyringError, match="wrong master key"):
        read_results(table["uri"], table["all"], columns=["output_text"], where=acme)
    got = read_results(table["uri"], str(table["all"]), columns=["output_text"], where=acme,
                       master_key_env="ACME_MASTER_KEY")  # fmt: skip
    assert set(got["output_text"]) == {f"answer {o}" for o in range(1, 40, 2)}

    spec = tidegate.parse_spec({
        "name": "readers", "source": {"kafka": {"topic": "t"}}, "prompt": {"template": "{{ q }}", "id_field": "id"},
        "model": {"path": "m"}, "sink": {"results": table["uri"], "dead_letter": table["uri"] + "-dl"},
        "encryption": {"keyring": str(table["acme"]), "tenant": "acme", "output_fields": ["output_text"],
                       "master_key_env": "ACME_MASTER_KEY"},
    })  # fmt: skip
    for keyring in (None, table["all"], str(table["all"])):  # the spec's, or one given as a path
        got = tidegate.read_results(spec, keyring=keyring, columns=["output_text"], where=acme)
        assert set(got["output_text"]) == {f"answer {o}" for o in range(1, 40, 2)}, keyring
