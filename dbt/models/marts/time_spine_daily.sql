-- One row per calendar day: the time spine MetricFlow needs for time-based joins (cumulative metrics, metrics
-- joined to the spine so that days without activity show as zero). A fixed range, not the data's: a spine that
-- moved with the data would rebuild on every sync for nothing, and CRM records older than 2000 or closing after
-- 2050 are not expected (a date outside it is still counted, only not joined to the spine).
with

days as (

    select {{ day_series("cast('2000-01-01' as date)", "cast('2050-12-31' as date)") }} as date_day

),

final as (

    select cast(date_day as date) as date_day
    from days

)

select * from final
