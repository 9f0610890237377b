-- The credited activities behind marts.outcomes, one row per (opportunity, activity):
--   created -> the CREATOR (created_by_user_id) at created_at;
--   won / lost -> the OWNER AT CLOSE (owner_at_close_user_id) at closed_at.
-- Amounts are in the org's base currency as the CRM converts them (amount_base), so sums never mix currencies.
-- Deleted opportunities and those out of the connection's scope are excluded (they stay visible in
-- marts.opportunities with is_deleted / is_in_scope).
with

opportunities as (

    select * from {{ ref('int_opportunities__enriched') }}
    where not is_deleted
        and is_in_scope

),

created as (

    select
        connection,
        crm,
        source_id,
        'created' as activity,
        created_at as activity_at,
        created_by_user_id as user_id,
        created_by_user_name as user_name,
        amount_base,
        base_currency,
        is_qualified
    from opportunities
    where created_at is not null

),

closed as (

    select
        connection,
        crm,
        source_id,
        stage_category as activity,
        closed_at as activity_at,
        owner_at_close_user_id as user_id,
        owner_at_close_user_name as user_name,
        amount_base,
        base_currency,
        is_qualified
    from opportunities
    where stage_category in ('won', 'lost')
        and closed_at is not null

),

final as (

    select * from created
    union all
    select * from closed

)

select * from final
