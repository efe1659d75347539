"""Table layout (#17): results partitioned by sink.partition_by, Parquet written with zstd, and
statistics only on columns where a value's prefix is safe to copy into footers and the Delta log."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from connectors.delta import DeltaSink
from schemas.errors import SinkSchemaError, SpecError
from schemas.spec import ParquetSpec, parse_spec
from tests.conftest import results_table
from tests.test_delta_sink import TP0, dead

CANARY = "canary-layout-5521@example.com"


def test_results_are_partitioned_by_date_and_tenant(tmp_path):
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, partition_by=["processed_date", "tenant"])
    sink.open()
    sink.load_positions([TP0])
    rows = results_table([0, 1, 2, 3], tenant=["acme", "globex", "acme", "globex"])
    sink.commit(rows, dead([]), {TP0: 3})
    dt = DeltaTable(str(tmp_path / "res"))
    assert list(dt.metadata().partition_columns) == ["processed_date", "tenant"]
    dirs = sorted(p.relative_to(tmp_path / "res").parent.as_posix() for p in (tmp_path / "res").rglob("*.parquet"))
    day = rows.column("processed_at")[0].as_py().date().isoformat()
    assert dirs == [f"processed_date={day}/tenant=acme", f"processed_date={day}/tenant=globex"]
    # a reader's filter on a partition column prunes files
    got = pl.scan_delta(str(tmp_path / "res")).filter(pl.col("tenant") == "acme").collect()
    assert sorted(got["source_offset"]) == [0, 2]
    # partitioning is fixed at creation: a spec that says otherwise is refused, naming both
    other = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, partition_by=["tenant"])
    with pytest.raises(SinkSchemaError, match=r"partitioned by \['processed_date', 'tenant'\], the spec says \['tenant'\]"):
        other.open()


def test_partition_by_names_only_partitionable_columns(tmp_path):
    spec = {"name": "j", "source": {"kafka": {"topic": "t"}}, "prompt": {"template": "{{ q }}", "id_field": "id"},
            "model": {"path": "m"}, "sink": {"results": "r", "dead_letter": "d", "partition_by": ["output_text"]}}  # fmt: skip
    with pytest.raises(SpecError, match="sink.partition_by: Value error, output_text: partition by one of"):
        parse_spec(spec)


def test_no_statistics_on_ids_text_or_raw_bytes_and_zstd_files(tmp_path):
    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, parquet=ParquetSpec())
    sink.open()
    sink.load_positions([TP0])
    rows = results_table([0, 1], id=[CANARY, "b"], output_text=[f"reply to {CANARY}", "x"])
    bad = dead([2])
    bad = bad.set_column(bad.schema.get_field_index("raw"), "raw", bad.column("raw").cast("binary"))
    sink.commit(rows, bad, {TP0: 2})
    logs = "".join(p.read_text() for t in ("res", "dl") for p in (tmp_path / t / "_delta_log").glob("*.json"))
    assert CANARY not in logs
    stats = DeltaTable(str(tmp_path / "res")).get_add_actions(flatten=True).column_names
    assert "min.source_offset" in stats and "min.processed_at" in stats  # positions and times keep theirs
    assert not [c for c in stats if c.startswith(("min.id", "min.output_text", "max.id", "max.output_text"))]
    for f in Path(tmp_path / "res").rglob("*.parquet"):
        meta = pq.ParquetFile(f).metadata
        cols = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
        assert cols["id"].statistics is None and cols["output_text"].statistics is None
        assert cols["source_offset"].statistics is not None and cols["source_offset"].statistics.has_min_max
        assert cols["id"].compression == "ZSTD"
