with

source as (

    select * from {{ source('oppsync', 'sync_state') }}

),

renamed as (

    select
        cast(connection as text) as connection,
        cast(cursor as timestamp) as sync_cursor,
        cast(last_full_sync_at as timestamp) as last_full_sync_at,
        cast(last_success_at as timestamp) as last_success_at,
        cast(last_run_id as text) as last_run_id

    from source

)

select * from renamed
