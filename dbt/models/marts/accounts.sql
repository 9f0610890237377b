-- One row per (connection, account_id): the CRM account / company its opportunities name, with the name and
-- address its most recently modified live opportunity carried (a deleted one only where no live one is left).
with

opportunities as (

    select * from {{ ref('stg_oppsync__opportunities') }}
    where account_id is not null

),

ranked as (

    select
        connection,
        crm,
        account_id,
        client_name,
        service_location,
        modified_at,
        deleted_at,
        status,
        row_number() over (
            partition by connection, account_id
            order by
                case when deleted_at is null then 0 else 1 end asc,
                modified_at desc nulls last,
                last_seen_at desc,
                source_id asc
        ) as recency
    from opportunities

),

counts as (

    select
        connection,
        account_id,
        sum(case when deleted_at is null then 1 else 0 end) as opportunities,
        sum(case when deleted_at is null and status = 'open' then 1 else 0 end) as open_opportunities,
        max(modified_at) as last_modified_at
    from ranked
    group by connection, account_id

),

final as (

    select
        cast(r.connection as text) as connection,
        cast(r.crm as text) as crm,
        cast(r.account_id as text) as account_id,
        cast(r.client_name as text) as account_name,
        cast(r.service_location as text) as address,
        cast(c.opportunities as bigint) as opportunities,
        cast(c.open_opportunities as bigint) as open_opportunities,
        cast(c.last_modified_at as timestamp) as last_modified_at
    from ranked as r
    inner join counts as c
        on r.connection = c.connection
        and r.account_id = c.account_id
    where r.recency = 1

)

select * from final
