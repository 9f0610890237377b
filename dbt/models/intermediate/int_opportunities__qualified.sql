-- Seed 004: is an opportunity "qualified"? Per connection (oppsync.yaml connections[].qualification):
--   * a stage rule (stage keys or labels) and/or a minimum probability (0-100);
--   * qualified = the opportunity is, or ever was (any SCD2 version), in a listed stage or at/above the
--     probability threshold -- so a deal that moved on from "Qualification" to "Closed Won" stays qualified;
--   * a connection without any rule treats every opportunity as qualified (the CRM only holds qualified deals).
with

opportunities as (

    select * from {{ ref('stg_oppsync__opportunities') }}

),

history as (

    select * from {{ ref('stg_oppsync__opportunity_history') }}

),

stages as (

    select * from {{ ref('stg_oppsync__crm_stages') }}

),

connections as (

    select * from {{ ref('stg_oppsync__connections') }}

),

qualified_stage_parts as (

    select
        connection,
        unnest({{ split_to_array('qualified_stages', 'chr(31)') }}) as qualified_stage
    from connections
    where qualified_stages is not null

),

qualified_stages as (

    select distinct
        connection,
        trim(qualified_stage) as qualified_stage
    from qualified_stage_parts
    where trim(qualified_stage) <> ''

),

versions as (

    select
        connection,
        source_id,
        stage,
        stage_id,
        probability
    from history
    union all
    select
        connection,
        source_id,
        stage,
        stage_id,
        probability
    from opportunities

),

versions_labeled as (

    select
        v.connection,
        v.source_id,
        v.stage,
        v.stage_id,
        s.stage_label,
        v.probability
    from versions as v
    left join stages as s
        on v.connection = s.connection
        and s.stage_key = coalesce(v.stage_id, v.stage)

),

reached_stage as (

    select distinct
        v.connection,
        v.source_id
    from versions_labeled as v
    inner join qualified_stages as q
        on v.connection = q.connection
        and (q.qualified_stage in (v.stage, v.stage_id, v.stage_label))

),

reached_probability as (

    select distinct
        v.connection,
        v.source_id
    from versions as v
    inner join connections as c
        on v.connection = c.connection
    where c.qualified_min_probability is not null
        and v.probability >= c.qualified_min_probability

),

final as (

    select
        o.connection,
        o.source_id,
        case
            when c.qualified_stages is null and c.qualified_min_probability is null then true
            else (rs.source_id is not null or rp.source_id is not null)
        end as is_qualified
    from opportunities as o
    left join connections as c
        on o.connection = c.connection
    left join reached_stage as rs
        on o.connection = rs.connection
        and o.source_id = rs.source_id
    left join reached_probability as rp
        on o.connection = rp.connection
        and o.source_id = rp.source_id

)

select * from final
