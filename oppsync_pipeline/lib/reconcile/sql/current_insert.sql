-- New rows take their values from the staged row itself (the latest version per id, found by seq): joined to
-- the narrow rc_act only, the hash join's build side stays small. Built from rc_src's data columns it held
-- every new row's values at once, and a first Dynamics sync of 1,000,000 (2.4 kB rows) ran out of a 256 MB
-- memory limit. The rows with a seq in [:lo, :hi): one pass, or several where memory is lean (apply.py).
INSERT INTO oppsync.opportunities (connection, source_id, {data_columns}, raw, row_hash, version, first_seen_at,
                                   last_seen_at, closed_at, closed_at_source, deleted_at, last_run_id, in_scope)
SELECT :c, r.source_id, {r_data_columns}, r.raw, r.row_hash, 1, :obs, :obs, d.new_closed_at, d.new_closed_at_source,
       NULL, :run, TRUE
FROM oppsync.stage_opportunities r JOIN rc_act d ON d.seq = r.seq
WHERE r.extract_id = :x AND d.membership = 'new' AND r.seq >= :lo AND r.seq < :hi AND d.seq >= :lo AND d.seq < :hi
