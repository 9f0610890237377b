with

source as (

    select * from {{ source('oppsync', 'opportunity_history') }}

),

renamed as (

    select
        cast(connection as text) as connection,
        cast(source_id as text) as source_id,
        cast(version as integer) as version,
        cast(crm as text) as crm,
        cast(project_name as text) as project_name,
        cast(client_name as text) as client_name,
        cast(account_id as text) as account_id,
        cast(service_location as text) as service_location,
        cast(sales_executive as text) as sales_executive,
        cast(owner_crm_id as text) as owner_crm_id,
        cast(stage as text) as stage,
        cast(stage_id as text) as stage_id,
        cast(crm_status as text) as crm_status,
        cast(status as text) as status,
        cast(amount as double precision) as amount,
        cast(currency as text) as currency,
        cast(amount_base as double precision) as amount_base,
        cast(base_currency as text) as base_currency,
        cast(revenue_one_time as double precision) as revenue_one_time,
        cast(revenue_recurring as double precision) as revenue_recurring,
        cast(cost as double precision) as cost,
        cast(close_date as date) as close_date,
        cast(probability as double precision) as probability,
        cast(created_at as timestamp) as created_at,
        cast(created_by_crm_id as text) as created_by_crm_id,
        cast(modified_at as timestamp) as modified_at,
        cast(row_hash as text) as row_hash,
        cast(valid_from as timestamp) as valid_from,
        cast(valid_to as timestamp) as valid_to,
        cast(run_id as text) as run_id

    from source

)

select * from renamed
