-- The membership counts (the value-change counts come from the events written), and how many rows take
-- new values.
SELECT count(*),
       count(*) FILTER (WHERE membership = 'new'),
       count(*) FILTER (WHERE new_status <> 'open' AND (membership = 'new' OR
                          (membership IN ('known', 'restored', 'entered') AND status_moved))),
       count(*) FILTER (WHERE membership IN ('known', 'restored', 'entered') AND new_status = 'open'
                          AND status_moved),
       count(*) FILTER (WHERE membership = 'restored'),
       count(*) FILTER (WHERE membership = 'ignore' OR (membership = 'known' AND NOT differs)),
       count(*) FILTER (WHERE membership = 'left'),
       count(*) FILTER (WHERE membership = 'entered'),
       count(*) FILTER (WHERE rewrite)
FROM rc_diff
