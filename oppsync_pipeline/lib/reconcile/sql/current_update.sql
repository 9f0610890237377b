UPDATE oppsync.opportunities AS o SET {set_data_columns}, raw = u.raw, row_hash = u.row_hash, version = u.version,
       last_seen_at = :obs, deleted_at = NULL, last_run_id = :run, closed_at = u.closed_at,
       closed_at_source = u.closed_at_source
FROM rc_upd u
WHERE o.connection = :c AND o.source_id = u.source_id
