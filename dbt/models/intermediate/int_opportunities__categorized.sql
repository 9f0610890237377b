-- The stage as the connection's crm_stages know it. `stage` is the stage's name and `stage_id` its key (rows
-- synced before the stage model carry the key in `stage` and no stage_id: the join takes either).
-- stage_category is the opportunity's status (open / won / lost): the connector already applied the
-- connection's stage_categories / open_statuses to the CRM's flags. A stage missing from crm_stages is
-- flagged stage_known = false (a warn-severity test lists them).
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
        o.status as stage_category,
        s.stage_key is not null as stage_known
    from opportunities as o
    left join stages as s
        on o.connection = s.connection
        and s.stage_key = coalesce(o.stage_id, o.stage)

)

select * from final
