-- `differs`: values to write (a new version); `rewrite`: the current row takes the staged values.
CREATE TEMPORARY TABLE rc_diff AS
SELECT k.source_id, k.seq, k.membership,
       (k.membership = 'new' OR COALESCE(f.changed_fields, '') <> '') AS differs,
       (k.membership = 'restored' OR (k.membership IN ('known', 'entered')
                                      AND COALESCE(f.changed_fields, '') <> '')) AS rewrite,
       COALESCE(f.changed_fields, '') AS changed_fields, COALESCE(f.status_fields, '') AS status_fields,
       COALESCE(f.stage_fields, '') AS stage_fields, COALESCE(f.updated_fields, '') AS updated_fields,
       COALESCE(f.status_moved, FALSE) AS status_moved, COALESCE(f.stage_moved, FALSE) AS stage_moved,
       k.old_status, k.old_stage, k.old_version, k.old_closed_at, k.new_status, k.new_stage, k.changed_at,
       k.new_closed_at, k.new_closed_at_source
FROM rc_cls k LEFT JOIN rc_fields f ON f.source_id = k.source_id
