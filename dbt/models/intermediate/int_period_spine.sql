-- Every day / week / month (in the reporting time zone; weeks start Monday) from the first to the last
-- credited activity. marts.outcomes fills the periods without activity with zeros.
with

activities as (

    select * from {{ ref('int_outcome_activities') }}

),

bounds as (

    select
        min({{ to_reporting_tz('activity_at') }}) as first_at,
        max({{ to_reporting_tz('activity_at') }}) as last_at
    from activities

),

days as (

    select {{ day_series('cast(first_at as date)', 'cast(last_at as date)') }} as day
    from bounds
    where first_at is not null

),

final as (

    {% for grain in period_grains() %}
        select distinct
            cast('{{ grain }}' as text) as period_grain,
            {{ period_start(grain, 'day') }} as period_start
        from days
        {% if not loop.last %}union all{% endif %}
    {% endfor %}

)

select * from final
