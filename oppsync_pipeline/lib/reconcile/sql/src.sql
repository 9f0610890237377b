-- One row per id, its latest version (a missing modified_at is older than any; ties go to the one staged
-- last). The raw payload stays in staging, joined back by seq when rows are written.
CREATE TEMPORARY TABLE rc_src AS
SELECT {s_src_columns} FROM oppsync.stage_opportunities s
WHERE s.extract_id = :x AND NOT EXISTS (SELECT 1 FROM rc_dup d WHERE d.source_id = s.source_id)
UNION ALL
SELECT {src_columns} FROM (
    SELECT {s_src_columns}, row_number() OVER (
        PARTITION BY s.source_id ORDER BY s.modified_at DESC NULLS LAST, s.seq DESC) AS rn
    FROM oppsync.stage_opportunities s
    WHERE s.extract_id = :x AND s.source_id IN (SELECT source_id FROM rc_dup)
) t WHERE rn = 1
