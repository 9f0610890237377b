with

enriched as (

    select * from {{ ref('int_opportunities__enriched') }}

),

final as (

    select
        cast(connection as text) as connection,
        cast(crm as text) as crm,
        cast(source_id as text) as source_id,
        cast(project_name as text) as project_name,
        cast(client_name as text) as client_name,
        cast(account_id as text) as account_id,
        cast(service_location as text) as service_location,
        cast(sales_executive as text) as sales_executive,
        cast(owner_crm_id as text) as owner_crm_id,
        cast(owner_crm_name as text) as owner_crm_name,
        cast(owner_user_id as text) as owner_user_id,
        cast(owner_user_name as text) as owner_user_name,
        cast(stage as text) as stage,
        cast(stage_id as text) as stage_id,
        cast(stage_label as text) as stage_label,
        cast(stage_category as text) as stage_category,
        cast(stage_known as boolean) as stage_known,
        cast(crm_status as text) as crm_status,
        cast(status as text) as status,
        cast(is_deleted as boolean) as is_deleted,
        cast(deleted_at as timestamp) as deleted_at,
        cast(is_in_scope as boolean) as is_in_scope,
        cast(scope_changed_at as timestamp) as scope_changed_at,
        cast(amount as double precision) as amount,
        cast(currency as text) as currency,
        cast(amount_base as double precision) as amount_base,
        cast(base_currency as text) as base_currency,
        cast(revenue_one_time as double precision) as revenue_one_time,
        cast(revenue_recurring as double precision) as revenue_recurring,
        cast(cost as double precision) as cost,
        cast(amount - cost as double precision) as margin,
        cast(close_date as date) as close_date,
        cast(probability as double precision) as probability,
        cast(expected_probability as double precision) as expected_probability,
        cast(probability_is_default as boolean) as probability_is_default,
        cast(expected_revenue as double precision) as expected_revenue,
        cast(expected_revenue_base as double precision) as expected_revenue_base,
        cast(lost_at_stage as text) as lost_at_stage,
        cast(lost_at_stage_id as text) as lost_at_stage_id,
        cast(is_qualified as boolean) as is_qualified,
        cast(created_at as timestamp) as created_at,
        cast(created_at_local as timestamp) as created_at_local,
        cast(created_at_is_estimated as boolean) as created_at_is_estimated,
        cast(created_by_crm_id as text) as created_by_crm_id,
        cast(created_by_crm_name as text) as created_by_crm_name,
        cast(created_by_user_id as text) as created_by_user_id,
        cast(created_by_user_name as text) as created_by_user_name,
        cast(closed_at as timestamp) as closed_at,
        cast(closed_at_local as timestamp) as closed_at_local,
        cast(closed_at_source as text) as closed_at_source,
        cast(owner_at_close_crm_id as text) as owner_at_close_crm_id,
        cast(owner_at_close_user_id as text) as owner_at_close_user_id,
        cast(owner_at_close_user_name as text) as owner_at_close_user_name,
        cast(modified_at as timestamp) as modified_at,
        cast(first_seen_at as timestamp) as first_seen_at,
        cast(last_synced_at as timestamp) as last_synced_at,
        cast(version as integer) as version
    from enriched

)

select * from final
