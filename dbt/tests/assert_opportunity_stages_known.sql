-- Warns (does not fail the build) when opportunities carry a stage the connection's crm_stages do not
-- list: their stage_category then falls back to the CRM status. Fix: re-sync the stages, or add the
-- stage to the connection's stage mapping.
{{ config(severity='warn', tags=['stage_mapping']) }}

with

opportunities as (

    select * from {{ ref('opportunities') }}

),

final as (

    select
        connection,
        stage,
        count(*) as opportunities
    from opportunities
    where not stage_known
    group by connection, stage

)

select * from final
