-- The current version of every rewritten or deleted record ends at the run.
UPDATE oppsync.opportunity_history SET valid_to = :obs
WHERE connection = :c AND valid_to IS NULL
  AND source_id IN (SELECT source_id FROM rc_act WHERE rewrite UNION SELECT source_id FROM rc_del)
