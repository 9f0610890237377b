-- The per-user rollup of marts.outcomes across connections: one row per (period_grain, period_start, user_id)
-- for each base currency the user's connections report in (one row per user and period when the connections
-- share a base currency, the usual case; amounts in different base currencies are never summed together).
-- 'unmapped' collects the CRM users without a link of every connection.
with

outcomes as (

    select * from {{ ref('outcomes') }}

),

rolled_up as (

    select
        period_grain,
        period_start,
        user_id,
        currency,
        max(user_name) as user_name,
        count(distinct connection) as connections,
        sum(opportunities_created) as opportunities_created,
        sum(amount_created) as amount_created,
        sum(opportunities_won) as opportunities_won,
        sum(amount_won) as amount_won,
        sum(opportunities_lost) as opportunities_lost,
        sum(amount_lost) as amount_lost,
        sum(opportunities_created_qualified) as opportunities_created_qualified,
        sum(opportunities_won_qualified) as opportunities_won_qualified,
        sum(opportunities_lost_qualified) as opportunities_lost_qualified
    from outcomes
    group by period_grain, period_start, user_id, currency

),

final as (

    select
        cast(period_grain as text) as period_grain,
        cast(period_start as date) as period_start,
        cast(user_id as text) as user_id,
        cast(user_name as text) as user_name,
        cast(connections as bigint) as connections,
        cast(opportunities_created as bigint) as opportunities_created,
        cast(amount_created as double precision) as amount_created,
        cast(opportunities_won as bigint) as opportunities_won,
        cast(amount_won as double precision) as amount_won,
        cast(opportunities_lost as bigint) as opportunities_lost,
        cast(amount_lost as double precision) as amount_lost,
        cast(
            case
                when opportunities_won + opportunities_lost > 0
                    then 1.0 * opportunities_won / (opportunities_won + opportunities_lost)
            end as double precision
        ) as win_rate,
        cast(opportunities_created_qualified as bigint) as opportunities_created_qualified,
        cast(opportunities_won_qualified as bigint) as opportunities_won_qualified,
        cast(opportunities_lost_qualified as bigint) as opportunities_lost_qualified,
        cast(
            case
                when opportunities_won_qualified + opportunities_lost_qualified > 0
                    then 1.0 * opportunities_won_qualified
                        / (opportunities_won_qualified + opportunities_lost_qualified)
            end as double precision
        ) as qualified_win_rate,
        cast(currency as text) as currency
    from rolled_up

)

select * from final
