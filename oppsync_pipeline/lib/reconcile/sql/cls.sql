-- Each staged id's membership against the warehouse, on the narrow columns. The close time: the CRM's own
-- (crm_closed_at) whenever it has one; else kept from the warehouse while the record stays in the same
-- closed status; else the record's modified_at at the close (or the run).
CREATE TEMPORARY TABLE rc_cls AS
SELECT s.source_id, s.seq,
       CASE WHEN o.source_id IS NULL THEN CASE WHEN COALESCE(s.scope, 'in') = 'in' THEN 'new' ELSE 'ignore' END
            WHEN COALESCE(s.scope, 'in') = 'filtered_out' THEN
                CASE WHEN o.deleted_at IS NULL AND o.in_scope IS NOT FALSE THEN 'left' ELSE 'ignore' END
            WHEN o.deleted_at IS NOT NULL THEN 'restored'
            WHEN o.in_scope IS FALSE THEN 'entered'
            ELSE 'known' END AS membership,
       (o.source_id IS NOT NULL AND o.row_hash <> s.row_hash) AS hash_differs,
       o.status AS old_status, o.stage AS old_stage, o.version AS old_version, o.closed_at AS old_closed_at,
       s.status AS new_status, s.stage AS new_stage,
       COALESCE(s.modified_at, :obs) AS changed_at,
       CASE WHEN s.status = 'open' THEN NULL
            WHEN s.crm_closed_at IS NOT NULL THEN s.crm_closed_at
            WHEN o.source_id IS NOT NULL AND o.status = s.status AND o.closed_at IS NOT NULL THEN o.closed_at
            ELSE COALESCE(s.modified_at, :obs) END AS new_closed_at,
       CASE WHEN s.status = 'open' THEN NULL
            WHEN s.crm_closed_at IS NOT NULL THEN COALESCE(s.crm_closed_at_field, 'crm')
            WHEN o.source_id IS NOT NULL AND o.status = s.status AND o.closed_at IS NOT NULL
                THEN COALESCE(o.closed_at_source, 'modified_at')
            WHEN s.modified_at IS NOT NULL THEN 'modified_at'
            ELSE 'observed' END AS new_closed_at_source
FROM rc_src s
LEFT JOIN oppsync.opportunities o ON o.connection = :c AND o.source_id = s.source_id
