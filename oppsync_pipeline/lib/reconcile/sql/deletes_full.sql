-- A full run also infers deletes: a known live id the extract did not see at all (not in either set, not
-- found by id either: sync.py reads the missing ids by id first, and not quarantined). A native delete also
-- found by inference counts once, with the CRM's own timestamp.
CREATE TEMPORARY TABLE rc_del AS
SELECT source_id,
       COALESCE(MAX(deleted_at) FILTER (WHERE NOT inferred), MAX(deleted_at)) AS deleted_at,
       BOOL_AND(inferred) AS inferred
FROM (
    SELECT o.source_id, CAST(:obs AS TIMESTAMP) AS deleted_at, TRUE AS inferred
    FROM oppsync.opportunities o
    WHERE o.connection = :c AND o.deleted_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM rc_src s WHERE s.source_id = o.source_id)
      AND NOT EXISTS (SELECT 1 FROM oppsync.quarantine q WHERE q.extract_id = :x AND q.source_id = o.source_id)
    UNION ALL
    SELECT d.source_id, MAX(COALESCE(d.deleted_at, :obs)) AS deleted_at, FALSE AS inferred
    FROM oppsync.stage_deletes d
    JOIN oppsync.opportunities o ON o.connection = :c AND o.source_id = d.source_id AND o.deleted_at IS NULL
    WHERE d.extract_id = :x AND NOT EXISTS (SELECT 1 FROM rc_src s WHERE s.source_id = d.source_id)
    GROUP BY d.source_id
) u GROUP BY source_id
