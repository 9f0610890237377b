UPDATE oppsync.opportunities AS o SET deleted_at = x.deleted_at, last_run_id = :run
FROM rc_del x WHERE o.connection = :c AND o.source_id = x.source_id
