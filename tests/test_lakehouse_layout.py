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


def test_no_statistics_on_unsafe_columns_of_either_table_after_commits_and_compaction(tmp_path):
    """docs/lakehouse.md: statistics only on STATS_SAFE_COLUMNS, in every file of both tables,
    however it was written (commits, then a compaction that rewrites them): never on a dead
    letter's id, error, raw or output_text, where a value's prefix would be copied into the
    footers and the Delta log."""
    from compute.prompts import dead_letter_table
    from schemas.records import STATS_SAFE_COLUMNS

    sink = DeltaSink("job", str(tmp_path / "res"), str(tmp_path / "dl"), {}, parquet=ParquetSpec())
    sink.open()
    sink.load_positions([TP0])
    for i in range(3):  # three files each, for the compaction to rewrite
        rows = results_table([2 * i], id=[f"{CANARY}-r{i}"], output_text=[f"reply to {CANARY}"])
        bad = dead_letter_table([dict(id=f"{CANARY}-d{i}", stage="validate", error_class="validation_failed",
                                      error=f"rejected {CANARY}", source_topic="t", source_partition=0,
                                      source_offset=2 * i + 1, raw=CANARY.encode(), output_text=f"out {CANARY}")],
                                "r")  # fmt: skip
        sink.commit(rows, bad, {TP0: 2 * i + 1})
    report = sink.maintain(checkpoint=False, vacuum=False)
    assert report["results"]["report"]["compacted"]["files_removed"] == 3
    assert report["dead_letter"]["report"]["compacted"]["files_removed"] == 3
    for table in ("res", "dl"):
        logs = "".join(p.read_text() for p in (tmp_path / table / "_delta_log").glob("*.json"))
        assert CANARY not in logs, table
        added = DeltaTable(str(tmp_path / table)).get_add_actions(flatten=True).column_names
        unsafe = [c for c in added if c.startswith(("min.", "max.")) and c.split(".", 1)[1] not in STATS_SAFE_COLUMNS]
        assert not unsafe, (table, unsafe)
        files = list((tmp_path / table).rglob("*.parquet"))
        assert len(files) == 4  # the three commits' and the compaction's
        for f in files:
            meta = pq.ParquetFile(f).metadata
            for rg in range(meta.num_row_groups):
                for i in range(meta.num_columns):
                    col = meta.row_group(rg).column(i)
                    name = col.path_in_schema.split(".")[0]
                    if name not in STATS_SAFE_COLUMNS:
                        assert col.statistics is None or not col.statistics.has_min_max, (table, f.name, name)
