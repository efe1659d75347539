"""How Arrow tables travel between the job's processes through Ray's object store.

    use_table_transport()        in a process that sends tables (the driver: jobs/pipeline.py;
                                 every worker: jobs/worker.py, Ray's worker_process_setup_hook)
    table_to_parts(pa.Table)  -> ("columns", columns, schema) | ("ipc", pa.Buffer)
    table_from_parts(parts)   -> pa.Table

Why not Ray's own: Ray replaces pyarrow's pickling of a table (ray/_private/arrow_serialization.py)
with a reducer that rebuilds every column in Python, copying string offsets with Arrow compute
calls, so that a *slice* carries only its rows (pyarrow's pickle sends a sliced array's whole
buffers: ARROW-10739, still so in pyarrow 26). Almost every table the job sends is fresh (built by
a stage, not sliced), and for those that rebuilding was ~a fifth of a stage worker's profile
(docs/performance.md, "Orchestration ceiling"). Here a table whose chunks reference about as many
bytes as they hold goes with pyarrow's own pickling (its buffers out of band, no copy); a table that
references much more than its rows (a slice, e.g. a Delta file's chunk or a bisected batch) goes as
Arrow IPC, which writes only the rows it has. Both read back without a copy.

Only the sender needs the reducer: what it writes names `table_from_parts`, which any process of
the job can import. A process without it (a worker of a Ray cluster started without the hook) sends
with Ray's reducer, which every process reads as well.
"""

from __future__ import annotations

import pyarrow as pa

# A chunk may reference this much more than it holds before the table goes as IPC (fresh arrays
# have a few bytes of padding or an extra offset; a slice of a bigger array has the rest).
_SLACK_BYTES = 4096


def _compact(table: pa.Table) -> bool:
    """True when no chunk references much more memory than its own rows."""
    for column in table.columns:
        for chunk in column.chunks:
            if chunk.offset:
                return False
            held = chunk.nbytes  # the bytes its rows reference (counts slices; a null array counts more)
            if chunk.get_total_buffer_size() > held + held // 8 + _SLACK_BYTES:
                return False
    return table.num_columns > 0  # a table of no columns keeps its row count only through IPC


def table_to_parts(table: pa.Table) -> tuple:
    if _compact(table):
        return ("columns", table.columns, table.schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return ("ipc", sink.getvalue())


def table_from_parts(parts: tuple) -> pa.Table:
    if parts[0] == "columns":
        return pa.Table.from_arrays(parts[1], schema=parts[2])
    return pa.ipc.open_stream(parts[1]).read_all()


def use_table_transport() -> None:
    """Send this process's tables with table_to_parts (idempotent; needs a connected Ray)."""
    import ray.util

    ray.util.register_serializer(pa.Table, serializer=table_to_parts, deserializer=table_from_parts)
