-- One row per change event. user_id: the creator for 'created', the owner at the event otherwise
-- (closed_won / closed_lost credit the owner at close); 'unmapped' when that CRM user has no link.
with

events as (

    select * from {{ ref('stg_oppsync__opportunity_events') }}

),

attribution as (

    select * from {{ ref('int_crm_user_attribution') }}

),

credited as (

    select
        e.*,
        case when e.event_type = 'created' then e.created_by_crm_id else e.owner_crm_id end as user_crm_id
    from events as e

),

final as (

    select
        cast(c.event_id as text) as event_id,
        cast(c.connection as text) as connection,
        cast(c.crm as text) as crm,
        cast(c.source_id as text) as source_id,
        cast(c.event_type as text) as event_type,
        cast(c.occurred_at as timestamp) as occurred_at,
        cast({{ to_reporting_tz('c.occurred_at') }} as timestamp) as occurred_at_local,
        cast(c.recorded_at as timestamp) as recorded_at,
        cast(c.run_id as text) as run_id,
        cast(c.user_crm_id as text) as user_crm_id,
        cast(coalesce(a.user_id, '{{ var("unmapped_user_id") }}') as text) as user_id,
        cast(coalesce(a.user_name, '{{ var("unmapped_user_name") }}') as text) as user_name,
        cast(c.owner_crm_id as text) as owner_crm_id,
        cast(c.created_by_crm_id as text) as created_by_crm_id,
        cast(c.amount as double precision) as amount,
        cast(c.status as text) as status,
        cast(c.status as text) as crm_status,
        cast(c.changed_fields as text) as changed_fields,
        cast(c.old_value as text) as old_value,
        cast(c.new_value as text) as new_value,
        cast(c.change_id as text) as change_id
    from credited as c
    left join attribution as a
        on c.connection = a.connection
        and c.user_crm_id = a.crm_user_id

)

select * from final
