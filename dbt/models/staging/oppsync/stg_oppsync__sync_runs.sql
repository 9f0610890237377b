with

source as (

    select * from {{ source('oppsync', 'sync_runs') }}

),

renamed as (

    select
        cast(run_id as text) as run_id,
        cast(connection as text) as connection,
        cast(crm as text) as crm,
        cast(mode as text) as sync_mode,
        cast(started_at as timestamp) as started_at,
        cast(finished_at as timestamp) as finished_at,
        cast(status as text) as run_status,
        cast(fetched as integer) as fetched_count,
        cast(created as integer) as created_count,
        cast(updated as integer) as updated_count,
        cast(closed as integer) as closed_count,
        cast(reopened as integer) as reopened_count,
        cast(deleted as integer) as deleted_count,
        cast(restored as integer) as restored_count,
        cast(skipped as integer) as skipped_count,
        cast(api_requests as integer) as api_requests,
        cast(retries as integer) as retries,
        cast(seconds_waited as double precision) as seconds_waited,
        cast(quota_used as integer) as quota_used,
        cast(quota_limit as integer) as quota_limit,
        cast(error as text) as error_message

    from source

)

select * from renamed
