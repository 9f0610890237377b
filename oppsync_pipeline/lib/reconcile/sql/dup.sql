-- The ids staged more than once: only they go through the window in src.sql.
CREATE TEMPORARY TABLE rc_dup AS
SELECT source_id FROM oppsync.stage_opportunities WHERE extract_id = :x GROUP BY source_id HAVING count(*) > 1
