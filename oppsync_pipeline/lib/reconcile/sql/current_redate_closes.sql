-- A re-baseline: the log dated first-load closes by the last edit; the CRM's close time now corrects the
-- close event that set the old closed_at (recognised by that timestamp), so event-based counts agree with
-- the mart.
UPDATE oppsync.opportunity_events AS e SET occurred_at = u.closed_at
FROM rc_upd u
WHERE e.connection = :c AND e.source_id = u.source_id AND e.event_type IN ('closed_won', 'closed_lost')
  AND NOT u.status_moved AND u.closed_at IS NOT NULL AND e.occurred_at = u.old_closed_at
  AND u.closed_at <> u.old_closed_at
