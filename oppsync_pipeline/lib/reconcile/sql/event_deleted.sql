-- A `deleted` event per delete, with the values the record had.
INSERT INTO oppsync.opportunity_events (event_id, connection, crm, source_id, event_type, occurred_at,
                                        recorded_at, run_id, changed_fields, old_value, new_value, owner_crm_id,
                                        created_by_crm_id, amount, status, change_id)
SELECT :run || ':' || x.source_id || ':' || 'deleted', :c, :crm, x.source_id, 'deleted', x.deleted_at, :rec,
       :run, NULL, NULL, NULL, o.owner_crm_id, o.created_by_crm_id, o.amount, o.status,
       :run || ':' || x.source_id
FROM rc_del x JOIN oppsync.opportunities o ON o.connection = :c AND o.source_id = x.source_id
