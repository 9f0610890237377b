-- One row per opportunity with everything the marts report: stage category, qualification, closure,
-- the internal users credited (creator / current owner / owner at close; 'unmapped' when no link) and
-- freshness, amounts in the org's base currency, expected revenue (default probability where the CRM has
-- none) and the stage a lost deal was lost at. Deleted opportunities stay here (is_deleted) and are left
-- out of the outcomes.
-- A table: the join of the views above is the expensive step, read by three models and their tests.
{{ config(materialized='table') }}

with

opportunities as (

    select * from {{ ref('int_opportunities__categorized') }}

),

qualified as (

    select * from {{ ref('int_opportunities__qualified') }}

),

closures as (

    select * from {{ ref('int_opportunities__closures') }}

),

lost_at_stage as (

    select * from {{ ref('int_opportunities__lost_at_stage') }}

),

attribution as (

    select * from {{ ref('int_crm_user_attribution') }}

),

sync_state as (

    select * from {{ ref('stg_oppsync__sync_state') }}

),

sync_runs as (

    select * from {{ ref('stg_oppsync__sync_runs') }}

),

joined as (

    select
        o.connection,
        o.crm,
        o.source_id,
        o.project_name,
        o.client_name,
        o.account_id,
        o.service_location,
        o.sales_executive,
        o.owner_crm_id,
        owner_attr.crm_user_name as owner_crm_name,
        coalesce(owner_attr.user_id, '{{ var("unmapped_user_id") }}') as owner_user_id,
        coalesce(owner_attr.user_name, '{{ var("unmapped_user_name") }}') as owner_user_name,
        o.stage,
        o.stage_id,
        o.stage_label,
        o.stage_category,
        o.stage_known,
        o.crm_status,
        o.status,
        o.deleted_at is not null as is_deleted,
        o.deleted_at,
        o.in_scope as is_in_scope,
        o.scope_changed_at,
        o.amount,
        o.currency,
        o.amount_base,
        o.base_currency,
        o.revenue_one_time,
        o.revenue_recurring,
        o.cost,
        o.close_date,
        o.probability,
        {{ default_probability('o.connection') }} as default_probability,
        l.lost_at_stage,
        l.lost_at_stage_id,
        coalesce(o.created_at, o.first_seen_at) as created_at,
        o.created_at is null as created_at_is_estimated,
        o.created_by_crm_id,
        creator_attr.crm_user_name as created_by_crm_name,
        coalesce(creator_attr.user_id, '{{ var("unmapped_user_id") }}') as created_by_user_id,
        coalesce(creator_attr.user_name, '{{ var("unmapped_user_name") }}') as created_by_user_name,
        c.closed_at,
        c.closed_at_source,
        c.owner_at_close_crm_id,
        case
            when c.source_id is null then null
            else coalesce(close_attr.user_id, '{{ var("unmapped_user_id") }}')
        end as owner_at_close_user_id,
        case
            when c.source_id is null then null
            else coalesce(close_attr.user_name, '{{ var("unmapped_user_name") }}')
        end as owner_at_close_user_name,
        coalesce(q.is_qualified, false) as is_qualified,
        o.modified_at,
        o.first_seen_at,
        case
            when o.deleted_at is not null then coalesce(r.finished_at, o.last_seen_at)
            else coalesce(greatest(s.last_success_at, o.last_seen_at), o.last_seen_at)
        end as last_synced_at,
        o.version
    from opportunities as o
    left join qualified as q
        on o.connection = q.connection
        and o.source_id = q.source_id
    left join closures as c
        on o.connection = c.connection
        and o.source_id = c.source_id
    left join lost_at_stage as l
        on o.connection = l.connection
        and o.source_id = l.source_id
    left join attribution as owner_attr
        on o.connection = owner_attr.connection
        and o.owner_crm_id = owner_attr.crm_user_id
    left join attribution as creator_attr
        on o.connection = creator_attr.connection
        and o.created_by_crm_id = creator_attr.crm_user_id
    left join attribution as close_attr
        on o.connection = close_attr.connection
        and c.owner_at_close_crm_id = close_attr.crm_user_id
    left join sync_state as s
        on o.connection = s.connection
    left join sync_runs as r
        on o.last_run_id = r.run_id

),

final as (

    select
        *,
        -- expected revenue = amount x probability; the configured default where the CRM has no probability
        coalesce(probability, default_probability) as expected_probability,
        probability is null and default_probability is not null as probability_is_default,
        amount * coalesce(probability, default_probability) / 100.0 as expected_revenue,
        amount_base * coalesce(probability, default_probability) / 100.0 as expected_revenue_base,
        {{ to_reporting_tz('created_at') }} as created_at_local,
        -- a close time the CRM keeps as a date (Salesforce CloseDate) is that local day, not a UTC midnight
        case
            when closed_at_source in ({{ "'" ~ var('date_only_close_sources') | join("', '") ~ "'" }})
                then cast(closed_at as timestamp)
            else {{ to_reporting_tz('closed_at') }}
        end as closed_at_local
    from joined

)

select * from final
