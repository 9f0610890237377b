-- "Lost at stage": for each opportunity that is lost now, the sales stage it was in just before it was lost,
-- i.e. the stage of its latest version (oppsync.opportunity_history) that was still open. A deal lost,
-- reopened and lost again reports the stage before the latest loss. Some CRMs keep the stage at the loss
-- (Dynamics' business-process stage; Autotask when the admin leaves it, seed 003): a deal first seen already
-- lost then reports its own stage, unless that stage is itself a closed one (crm_stages), where it stays null.
with

opportunities as (

    select * from {{ ref('int_opportunities__categorized') }}
    where stage_category = 'lost'

),

history as (

    select * from {{ ref('stg_oppsync__opportunity_history') }}

),

stages as (

    select * from {{ ref('stg_oppsync__crm_stages') }}

),

open_versions as (

    select
        h.connection,
        h.source_id,
        h.stage,
        h.stage_id,
        row_number() over (partition by h.connection, h.source_id order by h.version desc) as open_rank
    from history as h
    inner join opportunities as o
        on h.connection = o.connection
        and h.source_id = o.source_id
    where h.status = 'open'

),

last_open as (

    select * from open_versions
    where open_rank = 1

),

final as (

    select
        o.connection,
        o.source_id,
        case
            when l.source_id is not null then l.stage
            when s.is_closed = false then o.stage
        end as lost_at_stage,
        case
            when l.source_id is not null then coalesce(l.stage_id, l.stage)
            when s.is_closed = false then coalesce(o.stage_id, o.stage)
        end as lost_at_stage_id,
        case
            when l.source_id is not null then 'history'
            when s.is_closed = false then 'current_stage'
        end as lost_at_stage_source
    from opportunities as o
    left join last_open as l
        on o.connection = l.connection
        and o.source_id = l.source_id
    left join stages as s
        on o.connection = s.connection
        and s.stage_key = coalesce(o.stage_id, o.stage)

)

select * from final
