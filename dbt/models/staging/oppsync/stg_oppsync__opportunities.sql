with

source as (

    select * from {{ source('oppsync', 'opportunities') }}

),

renamed as (

    select
        cast(connection as text) as connection,
        cast(source_id as text) as source_id,
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
        cast(crm_closed_at as timestamp) as crm_closed_at,
        cast(crm_closed_at_field as text) as crm_closed_at_field,
        cast(modified_at as timestamp) as modified_at,
        cast(raw as text) as raw_json,
        -- the connection's extra_fields: as JSON text (typed in marts.opportunity_fields)
        cast(extra_fields as text) as extra_fields_json,
        cast(row_hash as text) as row_hash,
        cast(version as integer) as version,
        cast(first_seen_at as timestamp) as first_seen_at,
        cast(last_seen_at as timestamp) as last_seen_at,
        cast(closed_at as timestamp) as closed_at,
        cast(closed_at_source as text) as closed_at_source,
        cast(deleted_at as timestamp) as deleted_at,
        -- rows written before scopes existed were all in scope
        cast(coalesce(in_scope, true) as boolean) as in_scope,
        cast(scope_changed_at as timestamp) as scope_changed_at,
        cast(last_run_id as text) as last_run_id

    from source

)

select * from renamed
