-- One kind of event (apply.py's EVENTS names each kind's type, time, rows and values). The events one
-- observed CRM edit produced share a change_id.
INSERT INTO oppsync.opportunity_events (event_id, connection, crm, source_id, event_type, occurred_at,
                                        recorded_at, run_id, changed_fields, old_value, new_value, owner_crm_id,
                                        created_by_crm_id, amount, status, change_id)
SELECT :run || ':' || d.source_id || ':' || {event_type}, :c, :crm, d.source_id, {event_type}, {occurred}, :rec,
       :run, {changed}, {old}, {new}, {values}.owner_crm_id, {values}.created_by_crm_id, {values}.amount,
       {values}.status, :run || ':' || d.source_id
FROM rc_act d
{join_current}
WHERE {where}
