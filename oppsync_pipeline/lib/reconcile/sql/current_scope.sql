-- Scope: a record that left keeps its last tracked values; one that came back is tracked again.
UPDATE oppsync.opportunities AS o SET in_scope = (d.membership = 'entered'), scope_changed_at = :obs,
       last_run_id = :run
FROM rc_act d
WHERE o.connection = :c AND o.source_id = d.source_id AND d.membership IN ('left', 'entered')
