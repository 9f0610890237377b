-- A new version for every new and rewritten record.
INSERT INTO oppsync.opportunity_history (connection, source_id, version, {data_columns}, row_hash, valid_from,
                                         valid_to, run_id)
SELECT :c, s.source_id, COALESCE(d.old_version, 0) + 1, {s_data_columns}, s.row_hash, :obs, NULL, :run
FROM rc_act d JOIN rc_src s ON s.source_id = d.source_id
WHERE d.membership = 'new' OR d.rewrite
