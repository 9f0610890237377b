-- Every id a CRM user is known by: the user's own id plus its alt_ids (HubSpot owners have an owner id
-- and a user id; creators reference the user id, owners the owner id). One row per (connection, person, id).
with

crm_users as (

    select * from {{ ref('stg_oppsync__crm_users') }}

),

own_ids as (

    select
        connection,
        crm_user_id as person_id,
        crm_user_id as crm_id,
        true as is_primary_id
    from crm_users

),

alt_id_parts as (

    select
        connection,
        crm_user_id as person_id,
        unnest({{ split_to_array('alt_ids', "','") }}) as alt_id
    from crm_users
    where alt_ids is not null and alt_ids <> ''

),

alt_ids as (

    select
        connection,
        person_id,
        trim(alt_id) as crm_id,
        false as is_primary_id
    from alt_id_parts
    where trim(alt_id) <> '' and trim(alt_id) <> person_id

),

unioned as (

    select * from own_ids
    union all
    select * from alt_ids

),

final as (

    select distinct
        connection,
        person_id,
        crm_id,
        is_primary_id
    from unioned

)

select * from final
