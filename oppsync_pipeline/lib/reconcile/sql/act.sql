-- The rows that write something (an event, a version, the current row), with the staged values events
-- record: the event statements read this instead of joining rc_diff to the whole staged copy each (at
-- 1,000,000 a full extract has ~120,000 such rows), and the history and current-row statements join it as
-- their small side. A tracked record with a status, stage or other value change always has `rewrite` (its
-- changed_fields are not empty).
CREATE TEMPORARY TABLE rc_act AS
SELECT d.*, s.created_at, s.owner_crm_id, s.created_by_crm_id, s.amount, s.status
FROM rc_diff d JOIN rc_src s ON s.source_id = d.source_id
WHERE d.membership IN ('new', 'restored', 'entered', 'left') OR d.rewrite
