-- The open pipeline at the end of each period, rebuilt from oppsync.opportunity_history: per period grain and
-- period, connection and owner (the internal user credited for the owner the version names), the opportunities
-- that were open at the period's end instant (the next period's first local midnight in
-- var('reporting_timezone')), their count and amount in the base currency. Only periods that have ended by
-- the last sync are snapshotted. A version is valid from the sync that saw it (the first version from the
-- opportunity's CRM creation time) until the sync that saw it change or go (deletes end it), so snapshot
-- instants resolve to sync times.
with

history as (

    select * from {{ ref('stg_oppsync__opportunity_history') }}

),

opportunities as (

    select * from {{ ref('stg_oppsync__opportunities') }}

),

spine as (

    select * from {{ ref('int_period_spine') }}

),

attribution as (

    select * from {{ ref('int_crm_user_attribution') }}

),

versions as (

    select
        connection,
        crm,
        source_id,
        version,
        owner_crm_id,
        status,
        amount_base,
        base_currency,
        -- the first version stands for the opportunity since its creation in the CRM
        case
            when version = min(version) over (partition by connection, source_id) and created_at < valid_from
                then created_at
            else valid_from
        end as valid_from,
        valid_to
    from history

),

localized as (

    select
        *,
        {{ to_reporting_tz('valid_from') }} as valid_from_local,
        {{ to_reporting_tz('valid_to') }} as valid_to_local
    from versions
    where status = 'open'

),

synced_until as (

    select max({{ to_reporting_tz('last_seen_at') }}) as as_of_local
    from opportunities

),

period_ends as (

    select
        s.period_grain,
        s.period_start,
        case s.period_grain
            when 'day' then cast(s.period_start + interval '1 day' as timestamp)
            when 'week' then cast(s.period_start + interval '7 day' as timestamp)
            else cast(s.period_start + interval '1 month' as timestamp)
        end as snapshot_at
    from spine as s

),

ended as (

    select p.*
    from period_ends as p
    cross join synced_until as u
    where p.snapshot_at <= u.as_of_local

),

open_at_end as (

    select
        p.period_grain,
        p.period_start,
        p.snapshot_at,
        v.connection,
        v.crm,
        v.source_id,
        v.owner_crm_id,
        v.amount_base,
        v.base_currency
    from ended as p
    inner join localized as v
        on p.snapshot_at >= v.valid_from_local
        and (v.valid_to_local is null or p.snapshot_at < v.valid_to_local)

),

final as (

    select
        cast(o.period_grain as text) as period_grain,
        cast(o.period_start as date) as period_start,
        cast(o.snapshot_at as timestamp) as snapshot_at,
        cast(o.connection as text) as connection,
        cast(max(o.crm) as text) as crm,
        cast(coalesce(a.user_id, '{{ var("unmapped_user_id") }}') as text) as owner_user_id,
        cast(max(coalesce(a.user_name, '{{ var("unmapped_user_name") }}')) as text) as owner_user_name,
        cast(count(*) as bigint) as open_opportunities,
        cast(coalesce(sum(o.amount_base), 0) as double precision) as open_amount,
        cast(case when min(o.base_currency) = max(o.base_currency) then min(o.base_currency) end as text) as currency
    from open_at_end as o
    left join attribution as a
        on o.connection = a.connection
        and o.owner_crm_id = a.crm_user_id
    group by
        o.period_grain,
        o.period_start,
        o.snapshot_at,
        o.connection,
        coalesce(a.user_id, '{{ var("unmapped_user_id") }}')

)

select * from final
