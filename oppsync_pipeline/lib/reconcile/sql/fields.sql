-- The changed fields, named only where the hash differs (or the id comes back from a delete or into scope),
-- split by the event kind that owns them (one event per kind of change).
CREATE TEMPORARY TABLE rc_fields AS
SELECT k.source_id, {changed_fields} AS changed_fields,
       {status_fields} AS status_fields, {stage_fields} AS stage_fields,
       {updated_fields} AS updated_fields,
       ({status_moved}) AS status_moved, {stage_moved} AS stage_moved
FROM rc_cls k
JOIN rc_src s ON s.source_id = k.source_id
JOIN oppsync.opportunities o ON o.connection = :c AND o.source_id = k.source_id
WHERE k.membership IN ('restored', 'entered')
   OR (k.membership = 'known' AND k.hash_differs)
