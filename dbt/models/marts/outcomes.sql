-- Outcomes per (period_grain, period_start, connection, user_id). Periods are cut in
-- var('reporting_timezone'), weeks start Monday. Created counts go to the creator (created_at period),
-- won / lost to the owner at close (closed_at period). Users without activity in a period get zeros
-- from their first active period on. Amounts are sums in the connection's base currency (amount_base).
with

activities as (

    select * from {{ ref('int_outcome_activities') }}

),

spine as (

    select * from {{ ref('int_period_spine') }}

),

localized as (

    select
        *,
        {{ to_reporting_tz('activity_at') }} as activity_at_local
    from activities

),

periodized as (

    {% for grain in period_grains() %}
        select
            cast('{{ grain }}' as text) as period_grain,
            {{ period_start(grain, 'activity_at_local') }} as period_start,
            connection,
            crm,
            user_id,
            user_name,
            activity,
            coalesce(amount_base, 0) as amount_base,
            base_currency,
            is_qualified
        from localized
        {% if not loop.last %}union all{% endif %}
    {% endfor %}

),

metrics as (

    select
        period_grain,
        period_start,
        connection,
        user_id,
        sum(case when activity = 'created' then 1 else 0 end) as opportunities_created,
        sum(case when activity = 'created' then amount_base else 0 end) as amount_created,
        sum(case when activity = 'won' then 1 else 0 end) as opportunities_won,
        sum(case when activity = 'won' then amount_base else 0 end) as amount_won,
        sum(case when activity = 'lost' then 1 else 0 end) as opportunities_lost,
        sum(case when activity = 'lost' then amount_base else 0 end) as amount_lost,
        sum(case when activity = 'created' and is_qualified then 1 else 0 end) as opportunities_created_qualified,
        sum(case when activity = 'won' and is_qualified then 1 else 0 end) as opportunities_won_qualified,
        sum(case when activity = 'lost' and is_qualified then 1 else 0 end) as opportunities_lost_qualified,
        min(base_currency) as min_currency,
        max(base_currency) as max_currency
    from periodized
    group by period_grain, period_start, connection, user_id

),

members as (

    select
        period_grain,
        connection,
        user_id,
        max(crm) as crm,
        max(user_name) as user_name,
        max(base_currency) as base_currency,
        min(period_start) as first_period_start
    from periodized
    group by period_grain, connection, user_id

),

dense as (

    select
        m.period_grain,
        s.period_start,
        m.connection,
        m.crm,
        m.user_id,
        m.user_name,
        m.base_currency
    from members as m
    inner join spine as s
        on m.period_grain = s.period_grain
        and m.first_period_start <= s.period_start

),

final as (

    select
        cast(d.period_grain as text) as period_grain,
        cast(d.period_start as date) as period_start,
        cast(d.connection as text) as connection,
        cast(d.crm as text) as crm,
        cast(d.user_id as text) as user_id,
        cast(d.user_name as text) as user_name,
        cast(coalesce(x.opportunities_created, 0) as bigint) as opportunities_created,
        cast(coalesce(x.amount_created, 0) as double precision) as amount_created,
        cast(coalesce(x.opportunities_won, 0) as bigint) as opportunities_won,
        cast(coalesce(x.amount_won, 0) as double precision) as amount_won,
        cast(coalesce(x.opportunities_lost, 0) as bigint) as opportunities_lost,
        cast(coalesce(x.amount_lost, 0) as double precision) as amount_lost,
        cast(
            case
                when coalesce(x.opportunities_won, 0) + coalesce(x.opportunities_lost, 0) > 0
                    then 1.0 * x.opportunities_won / (x.opportunities_won + x.opportunities_lost)
            end as double precision
        ) as win_rate,
        cast(coalesce(x.opportunities_created_qualified, 0) as bigint) as opportunities_created_qualified,
        cast(coalesce(x.opportunities_won_qualified, 0) as bigint) as opportunities_won_qualified,
        cast(coalesce(x.opportunities_lost_qualified, 0) as bigint) as opportunities_lost_qualified,
        cast(
            case
                when coalesce(x.opportunities_won_qualified, 0) + coalesce(x.opportunities_lost_qualified, 0) > 0
                    then 1.0 * x.opportunities_won_qualified
                        / (x.opportunities_won_qualified + x.opportunities_lost_qualified)
            end as double precision
        ) as qualified_win_rate,
        -- one connection has one base currency; should the CRM's change (a new org), the row names none
        -- (a period without activity: the user's base currency on the connection)
        cast(
            case
                when x.period_grain is null then d.base_currency
                when x.min_currency = x.max_currency then x.min_currency
            end as text
        ) as currency
    from dense as d
    left join metrics as x
        on d.period_grain = x.period_grain
        and d.period_start = x.period_start
        and d.connection = x.connection
        and d.user_id = x.user_id

)

select * from final
