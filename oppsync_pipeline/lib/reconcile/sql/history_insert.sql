-- A new version for every new and rewritten record. Its values come from the staged row itself (the latest
-- version per id, found by seq), as current_insert.sql's do: joined to the narrow rc_act only, the hash join's
-- build side stays small. Joined to rc_src (every staged row's data columns) it could not run in less than
-- 128 MB at 1,000,000 new rows.
INSERT INTO oppsync.opportunity_history (connection, source_id, version, {data_columns}, row_hash, valid_from,
                                         valid_to, run_id)
SELECT :c, r.source_id, COALESCE(d.old_version, 0) + 1, {r_data_columns}, r.row_hash, :obs, NULL, :run
FROM oppsync.stage_opportunities r JOIN rc_act d ON d.seq = r.seq
WHERE r.extract_id = :x AND (d.membership = 'new' OR d.rewrite)
