-- Deletes from the CRM's delete feed, of live ids this extract did not also read.
CREATE TEMPORARY TABLE rc_del AS
SELECT d.source_id, MAX(COALESCE(d.deleted_at, :obs)) AS deleted_at, FALSE AS inferred
FROM oppsync.stage_deletes d
JOIN oppsync.opportunities o ON o.connection = :c AND o.source_id = d.source_id AND o.deleted_at IS NULL
WHERE d.extract_id = :x AND NOT EXISTS (SELECT 1 FROM rc_src s WHERE s.source_id = d.source_id)
GROUP BY d.source_id
