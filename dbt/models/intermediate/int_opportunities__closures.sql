-- When an opportunity reached its current closed category (won / lost) and who owned it then.
-- Normal case (CRM status closed): closed_at from the warehouse and the owner recorded on the latest
-- closed_won / closed_lost event ("owner at the event"), falling back to the current owner.
-- When the stage mapping makes a deal won / lost although the CRM status is still open (no close event),
-- the first SCD2 version of the current closed streak supplies the time (its CRM modified_at) and owner.
-- closed_at_source: the CRM field the close time came from (e.g. actualclosedate), 'modified_at' / 'observed'
-- where the CRM has none, 'stage_mapping' for the history-based time above.
-- One row per opportunity whose stage_category is won or lost.
with

opportunities as (

    select * from {{ ref('int_opportunities__categorized') }}

),

events as (

    select * from {{ ref('stg_oppsync__opportunity_events') }}

),

history as (

    select * from {{ ref('stg_oppsync__opportunity_history') }}

),

stages as (

    select * from {{ ref('stg_oppsync__crm_stages') }}

),

closed_opportunities as (

    select * from opportunities
    where stage_category in ('won', 'lost')

),

close_events as (

    select
        connection,
        source_id,
        owner_crm_id,
        occurred_at,
        row_number() over (
            partition by connection, source_id
            order by recorded_at desc, occurred_at desc, event_id desc
        ) as event_rank
    from events
    where event_type in ('closed_won', 'closed_lost')

),

latest_close_events as (

    select * from close_events
    where event_rank = 1

),

history_categorized as (

    select
        h.connection,
        h.source_id,
        h.version,
        h.owner_crm_id,
        coalesce(h.modified_at, h.valid_from) as changed_at,
        coalesce(s.stage_category, h.status) as stage_category
    from history as h
    left join stages as s
        on h.connection = s.connection
        and h.stage = s.stage_key

),

last_other_version as (

    select
        h.connection,
        h.source_id,
        max(h.version) as version
    from history_categorized as h
    inner join closed_opportunities as o
        on h.connection = o.connection
        and h.source_id = o.source_id
    where h.stage_category <> o.stage_category
    group by h.connection, h.source_id

),

streak_starts as (

    select
        h.connection,
        h.source_id,
        h.changed_at,
        h.owner_crm_id,
        row_number() over (partition by h.connection, h.source_id order by h.version) as streak_rank
    from history_categorized as h
    inner join closed_opportunities as o
        on h.connection = o.connection
        and h.source_id = o.source_id
    left join last_other_version as l
        on h.connection = l.connection
        and h.source_id = l.source_id
    where h.stage_category = o.stage_category
        and h.version > coalesce(l.version, 0)

),

final as (

    select
        o.connection,
        o.source_id,
        coalesce(o.closed_at, s.changed_at, o.modified_at, o.last_seen_at) as closed_at,
        case
            when o.closed_at is not null then coalesce(o.closed_at_source, 'modified_at')
            else 'stage_mapping'
        end as closed_at_source,
        case
            when o.closed_at is not null and e.source_id is not null then e.owner_crm_id
            when o.closed_at is not null then o.owner_crm_id
            else coalesce(s.owner_crm_id, o.owner_crm_id)
        end as owner_at_close_crm_id
    from closed_opportunities as o
    left join latest_close_events as e
        on o.connection = e.connection
        and o.source_id = e.source_id
    left join streak_starts as s
        on o.connection = s.connection
        and o.source_id = s.source_id
        and s.streak_rank = 1

)

select * from final
