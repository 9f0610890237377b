with

source as (

    select * from {{ source('oppsync', 'opportunity_events') }}

),

renamed as (

    select
        cast(event_id as text) as event_id,
        cast(connection as text) as connection,
        cast(crm as text) as crm,
        cast(source_id as text) as source_id,
        cast(event_type as text) as event_type,
        cast(occurred_at as timestamp) as occurred_at,
        cast(recorded_at as timestamp) as recorded_at,
        cast(run_id as text) as run_id,
        cast(changed_fields as text) as changed_fields,
        cast(old_value as text) as old_value,
        cast(new_value as text) as new_value,
        cast(owner_crm_id as text) as owner_crm_id,
        cast(created_by_crm_id as text) as created_by_crm_id,
        cast(amount as double precision) as amount,
        cast(status as text) as status,
        cast(change_id as text) as change_id

    from source

)

select * from renamed
