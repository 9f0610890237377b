-- Stage category (open / won / lost) from the connection's crm_stages (which already apply the
-- connection's stage mapping). A stage missing from crm_stages falls back to the opportunity's status
-- and is flagged stage_known = false (a warn-severity test lists them).
with

opportunities as (

    select * from {{ ref('stg_oppsync__opportunities') }}

),

stages as (

    select * from {{ ref('stg_oppsync__crm_stages') }}

),

final as (

    select
        o.*,
        s.stage_label,
        coalesce(s.stage_category, o.status) as stage_category,
        s.stage_key is not null as stage_known
    from opportunities as o
    left join stages as s
        on s.connection = o.connection
        and s.stage_key = o.stage

)

select * from final
